//! Frozen-feature extraction shared by the evaluation stages (`linear_probe`, `knn`,
//! `clevr_count`, `clevr_dist`), computed once per (encoder weights, dataset, images, layers,
//! transform) and reused by every head and every stage.
//!
//! Features are the outputs of the last `min(4, depth)` blocks, each passed through the encoder's
//! final norm and average-pooled over all patch tokens (I-JEPA / VISSL `lastPOOL` and
//! `concatPOOL4`, EVALS.md §1.3), for the train and the val split, under the eval transform.
//! Both feature sets a probe uses come from that one extraction: `last` = the last layer,
//! `last4` = the concatenation of the extracted layers (fewer than 4 for an encoder shallower
//! than 4 blocks).
//!
//! The cache lives beside the store ([`crate::store::feature_cache`]:
//! `<store>/cache/features/<digest>/`), where `digest` = blake3 over the canonical JSON of
//! {format version, blake3 of the encoder's weights and architecture, the dataset stage's key,
//! the ordered image lists (paths relative to the dataset root), the layers, the transform, and
//! `at_epoch` when the encoder is an upstream snapshot}. Each stage also hard-links the file into
//! its own artifacts (`features.safetensors`, a copy where a link is impossible), so a result
//! keeps its inputs even after the cache is cleared.
//!
//! An encoder from `checkpoint: random` is seeded from the stage key (`backbone::load`), so two
//! stages with random encoders hold different weights and do not share features; stages reading
//! the same upstream encoder or checkpoint file do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::backbone::{self, Backbone};
use super::{StageContext, StageOutput};
use crate::data::imagefolder::ImageFolder;
use crate::data::loader::{load_batch, ImageSamples};
use crate::data::Transform;
use crate::error::{Error, Result};
pub use crate::eval::embed::{batch_tensor, encode};
use crate::kind::job::UpstreamRef;
pub use crate::model::pooled::{extract_layers, pooled, FeatureSet};
use crate::store::feature_cache::{self, Entry, FeatureCache, Meta};

/// Version of the cache format and of the extraction (part of every cache digest).
pub const VERSION: u32 = 1;
pub use crate::store::feature_cache::FEATURES_FILE;

/// What to extract.
#[derive(Debug, Clone)]
pub struct FeatureRequest<'a> {
    /// The dataset stage the images come from (its key is hashed).
    pub dataset: &'a UpstreamRef,
    /// Dataset root (image paths are hashed relative to it).
    pub root: &'a Path,
    /// Train images, in label order.
    pub train: &'a [PathBuf],
    /// Val images, in label order.
    pub val: &'a [PathBuf],
    /// Preprocessing (the eval transform).
    pub transform: Transform,
    /// Images per forward pass (does not change the features).
    pub batch: usize,
}

/// Extracted (or cached) features, on the CPU.
#[derive(Debug, Clone)]
pub struct Features {
    /// Train features `(L, N_train, D)`.
    pub train: Tensor,
    /// Val features `(L, N_val, D)`.
    pub val: Tensor,
    /// The blocks, oldest first (`-1` = last).
    pub layers: Vec<i64>,
    /// Cache digest.
    pub digest: String,
    /// The cache entry.
    pub dir: PathBuf,
    /// True when this stage found the entry instead of computing it.
    pub cached: bool,
    /// Images per second of the extraction that produced the entry.
    pub images_per_sec: f64,
}

impl Features {
    /// Add `extract_images_per_sec` and `features_cached` (0 / 1).
    pub fn add_metrics(&self, out: &mut StageOutput) {
        out.metrics
            .insert("extract_images_per_sec".into(), self.images_per_sec);
        out.metrics.insert(
            "features_cached".into(),
            if self.cached { 1.0 } else { 0.0 },
        );
    }

    /// `info.features` of a stage.
    pub fn info(&self) -> Value {
        json!({
            "digest": self.digest,
            "cached": self.cached,
            "layers": self.layers,
            "dim": self.train.dim(2).unwrap_or(0),
            "train_images": self.train.dim(1).unwrap_or(0),
            "val_images": self.val.dim(1).unwrap_or(0),
            "images_per_sec": self.images_per_sec,
        })
    }

    /// Hard-link (or copy) the features file into a stage's artifact folder.
    pub fn link_into(&self, out_dir: &Path) -> Result<()> {
        feature_cache::link_into(&self.dir, out_dir)
    }

    /// Features read from (or just written to) a cache entry.
    fn of_entry(e: Entry, layers: Vec<i64>, digest: String, cached: bool) -> Features {
        Features {
            train: e.train,
            val: e.val,
            layers,
            digest,
            dir: e.dir,
            cached,
            images_per_sec: e.meta.images_per_sec,
        }
    }
}

/// The feature cache of the store a running stage works in.
pub fn cache(ctx: &StageContext) -> Result<FeatureCache> {
    FeatureCache::of_work_dir(&ctx.job.work_dir).ok_or_else(|| {
        Error::stage(
            &ctx.job.id,
            format!(
                "work folder {} is not <store>/work/<key>; cannot locate the feature cache",
                ctx.job.work_dir.display()
            ),
        )
    })
}

/// blake3 over the architecture and every weight (names sorted, shapes, f32 little-endian bytes).
pub fn weights_digest(bb: &Backbone) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(&serde_json::to_vec(&bb.cfg)?);
    let data = bb.varmap.data().lock().expect("varmap lock");
    let sorted: BTreeMap<&String, &candle_core::Var> = data.iter().collect();
    for (name, var) in sorted {
        h.update(name.as_bytes());
        h.update(&[0]);
        for d in var.dims() {
            h.update(&(*d as u64).to_le_bytes());
        }
        let v = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for x in v {
            h.update(&x.to_le_bytes());
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

fn rel_list(root: &Path, files: &[PathBuf]) -> String {
    let mut h = blake3::Hasher::new();
    for f in files {
        let r = f.strip_prefix(root).unwrap_or(f);
        h.update(r.to_string_lossy().replace('\\', "/").as_bytes());
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

/// The features of `req` from the cache, or extracted now and cached.
pub fn extract_or_load(
    ctx: &mut StageContext,
    bb: &Backbone,
    req: &FeatureRequest,
    dev: &Device,
) -> Result<Features> {
    let layers = extract_layers(bb.cfg.depth);
    let mut key_input = json!({
        "v": VERSION,
        "encoder": weights_digest(bb)?,
        "dataset": req.dataset.key,
        "train": rel_list(req.root, req.train),
        "val": rel_list(req.root, req.val),
        "layers": layers,
        "transform": req.transform,
    });
    // A snapshot's weights differ from the final ones (so does their digest); the epoch is
    // hashed too, so an entry says which checkpoint it came from. Absent for final weights:
    // the digests of existing entries stay valid.
    if let Some(k) = bb.at_epoch {
        key_input["at_epoch"] = json!(k);
    }
    let digest = crate::util::canon::hash(&key_input);
    let cache = cache(ctx)?;
    if let Some(e) = cache.get(&digest)? {
        ctx.log(format!(
            "features {} found in the cache ({} train, {} val)",
            &digest[..12],
            e.train.dim(1)?,
            e.val.dim(1)?
        ));
        return Ok(Features::of_entry(e, layers, digest, true));
    }
    ctx.log(format!(
        "extracting features {} (layers {:?}, {} train + {} val images, encoder {})",
        &digest[..12],
        layers,
        req.train.len(),
        req.val.len(),
        bb.source
    ));
    let t0 = Instant::now();
    let [train, val] = extract(ctx, bb, req, &layers, dev)?;
    let secs = t0.elapsed().as_secs_f64();
    let total = req.train.len() + req.val.len();
    let ips = total as f64 / secs.max(1e-9);
    let meta = Meta {
        key_input,
        images_per_sec: ips,
        secs,
        stage: ctx.job.id.clone(),
    };
    let (e, written) = cache.put(&digest, &train, &val, meta)?;
    if !written {
        // another stage finished the same entry first: theirs is used
        return Ok(Features::of_entry(e, layers, digest, true));
    }
    ctx.log(format!(
        "extracted {total} images in {secs:.1} s ({ips:.1} images/s)"
    ));
    Ok(Features::of_entry(e, layers, digest, false))
}

/// The train and val features `(layers, images, dim)` of `req`, batch by batch (interruptible).
fn extract(
    ctx: &mut StageContext,
    bb: &Backbone,
    req: &FeatureRequest,
    layers: &[i64],
    dev: &Device,
) -> Result<[Tensor; 2]> {
    let total = (req.train.len() + req.val.len()) as u64;
    let mut done = 0u64;
    let mut splits = Vec::new();
    for files in [req.train, req.val] {
        let src = ImageSamples {
            samples: files.iter().map(|p| (p.clone(), 0)).collect(),
            transform: req.transform.clone(),
        };
        let mut parts = Vec::new();
        for chunk in (0..files.len())
            .collect::<Vec<_>>()
            .chunks(req.batch.max(1))
        {
            if ctx.is_interrupted() {
                return Err(Error::Interrupted);
            }
            let b = load_batch(&src, chunk, 0, 0)
                .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?;
            parts.push(encode(&bb.encoder, &b, layers, dev)?);
            done += chunk.len() as u64;
            ctx.progress.set(done, total, "extracting features");
        }
        if parts.is_empty() {
            return Err(Error::stage(&ctx.job.id, "a split has no images"));
        }
        splits.push(Tensor::cat(&parts, 1)?);
    }
    let val = splits.pop().expect("two splits");
    let train = splits.pop().expect("two splits");
    Ok([train, val])
}

// ------------------------------------------------------------------------------------------------
// Helpers shared by the evaluation stages.

/// The one `dataset` stage among the upstream stages.
pub fn dataset_upstream(ctx: &StageContext) -> Result<&UpstreamRef> {
    let ds: Vec<&UpstreamRef> = ctx
        .job
        .upstream
        .values()
        .filter(|u| u.kind == "dataset")
        .collect();
    match ds.as_slice() {
        [u] => Ok(u),
        [] => Err(Error::stage(
            &ctx.job.id,
            "needs a `dataset` stage in `needs` (the images to evaluate on)",
        )),
        _ => Err(Error::stage(
            &ctx.job.id,
            format!("has {} dataset stages in `needs`; keep one", ds.len()),
        )),
    }
}

/// Check that a dataset stage has the expected format; return its root folder.
pub fn dataset_root(ctx: &StageContext, u: &UpstreamRef, format: &str) -> Result<PathBuf> {
    let got = u.info.get("format").and_then(Value::as_str).unwrap_or("");
    if got != format {
        return Err(Error::stage(
            &ctx.job.id,
            format!(
                "dataset stage `{}` has format `{got}`; kind `{}` needs a `{format}` dataset",
                u.id, ctx.job.kind
            ),
        ));
    }
    Ok(super::dataset::root_of(u))
}

/// Load the backbone selected by `checkpoint` with the stage's own `model:` (if any).
pub fn load_backbone(ctx: &StageContext, checkpoint: &str, dev: &Device) -> Result<Backbone> {
    load_backbone_at(ctx, checkpoint, None, dev)
}

/// Which frozen encoder a feature probe reads, at what input size and in batches of how many
/// images: the params `knn`,
/// `linear_probe`, `clevr_count` and `clevr_dist` share, flattened into each kind's own (a
/// pipeline writes them beside the kind's other params).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct FrozenEncoder {
    /// `upstream` (the pretrain / finetune encoder), `random`, or a safetensors path.
    pub checkpoint: String,
    /// Read the upstream pretrain stage's snapshot of this epoch (one of its
    /// `snapshot_epochs`) instead of its final weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_epoch: Option<u64>,
    /// Input side in pixels (default: the model's `img_size`); eval transform = resize the
    /// shorter side to `img_size * 256 / 224`, centre crop `img_size`.
    #[serde(alias = "img")]
    pub img_size: Option<u32>,
    /// Images per forward pass during extraction (does not change the features).
    pub extract_batch: usize,
}

impl Default for FrozenEncoder {
    fn default() -> Self {
        Self {
            checkpoint: "upstream".into(),
            at_epoch: None,
            img_size: None,
            extract_batch: 64,
        }
    }
}

impl FrozenEncoder {
    /// The plan-time check: `at_epoch` only with `checkpoint: upstream`.
    pub fn check(&self) -> std::result::Result<(), String> {
        backbone::check_at_epoch(&self.checkpoint, self.at_epoch)
    }

    /// Load the encoder (logged).
    pub fn load(&self, ctx: &StageContext, dev: &Device) -> Result<Backbone> {
        load_backbone_at(ctx, &self.checkpoint, self.at_epoch, dev)
    }

    /// The input side: `img_size`, else the encoder's own.
    pub fn img(&self, bb: &Backbone) -> u32 {
        self.img_size.unwrap_or(bb.cfg.img_size as u32)
    }

    /// The features of the upstream `imagefolder` dataset's train and val splits (extracted at
    /// [`Self::img`] with the eval transform, or read from the feature cache), linked into the
    /// stage's output folder; with the splits, whose samples the features follow.
    pub fn imagefolder_features(
        &self,
        ctx: &mut StageContext,
        bb: &Backbone,
        dev: &Device,
    ) -> Result<(ImageFolder, ImageFolder, Features)> {
        let (root, train, val) = imagefolder_splits(ctx)?;
        let paths = |f: &ImageFolder| f.samples.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
        let (tp, vp) = (paths(&train), paths(&val));
        let u = dataset_upstream(ctx)?.clone();
        let req = FeatureRequest {
            dataset: &u,
            root: &root,
            train: &tp,
            val: &vp,
            transform: Transform::imagenet_eval(self.img(bb)),
            batch: self.extract_batch,
        };
        let feats = extract_or_load(ctx, bb, &req, dev)?;
        feats.link_into(&ctx.job.out_dir)?;
        Ok((train, val, feats))
    }
}

/// ImageFolder train / val samples of the upstream dataset.
pub fn imagefolder_splits(ctx: &StageContext) -> Result<(PathBuf, ImageFolder, ImageFolder)> {
    let u = dataset_upstream(ctx)?;
    let root = dataset_root(ctx, u, "imagefolder")?;
    let open =
        |s: &str| ImageFolder::open(&root, s).map_err(|e| Error::stage(&ctx.job.id, e.to_string()));
    let (train, val) = (open("train")?, open("val")?);
    if train.classes != val.classes {
        return Err(Error::stage(
            &ctx.job.id,
            "train and val class folders differ; labels would not line up",
        ));
    }
    Ok((root, train, val))
}

/// [`load_backbone`], reading the upstream pretrain stage's snapshot of epoch `at_epoch` when
/// given (see [`backbone::load_at`]).
pub fn load_backbone_at(
    ctx: &StageContext,
    checkpoint: &str,
    at_epoch: Option<u64>,
    dev: &Device,
) -> Result<Backbone> {
    let model = ctx.job.config.get("model").cloned();
    let bb = backbone::load_at(ctx, checkpoint, at_epoch, model.as_ref(), dev)?;
    ctx.log(format!(
        "backbone: {} (D {}, depth {}, patch {})",
        bb.source, bb.cfg.embed_dim, bb.cfg.depth, bb.cfg.patch_size
    ));
    Ok(bb)
}

/// Key input of a stage whose `checkpoint` is a file: the blake3 of its bytes (so replacing the
/// file reruns the stage); `upstream` / `random` add nothing (the upstream key / the stage key
/// already cover them).
pub fn checkpoint_key_input(params: &Value, pipeline_dir: &Path) -> crate::kind::KeyInputs {
    let c = params
        .get("checkpoint")
        .and_then(Value::as_str)
        .unwrap_or("upstream");
    match backbone::CheckpointRef::parse(c, pipeline_dir) {
        backbone::CheckpointRef::Path(p) => {
            // A folder stands for its encoder.safetensors; the model.json stored with the
            // weights (in the folder or next to the file) gives the architecture, so it counts.
            let w = backbone::weights_file(&p);
            if !w.is_file() {
                // Only a path an upstream `command` stage may write gets here (planning
                // refuses other missing paths); the stage fails with the path if it is still missing.
                return Ok(json!({ "checkpoint": "missing" }));
            }
            let mut h = blake3::Hasher::new();
            let f = fs_err::File::open(&w).map_err(|e| e.to_string())?;
            h.update_reader(f).map_err(|e| e.to_string())?;
            let m = match p.is_dir() {
                true => p.join(backbone::MODEL_FILE),
                false => w.with_file_name(backbone::MODEL_FILE),
            };
            if m.is_file() {
                h.update(&fs_err::read(&m).map_err(|e| e.to_string())?);
            }
            Ok(json!({ "checkpoint": h.finalize().to_hex().to_string() }))
        }
        _ => Ok(Value::Null),
    }
}

/// Top-1 and top-5 hits of `(.., N, C)` logits against labels `(N,)` (u32): a sample is a top-k
/// hit when fewer than k classes score strictly higher than the true one. Returns counts over
/// the last-but-one axis, shaped like the leading axes.
pub fn topk_hits(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = logits.dim(D::Minus1)?;
    let onehot = one_hot(labels, c, logits.device())?;
    let truth = logits.broadcast_mul(&onehot)?.sum_keepdim(D::Minus1)?;
    let above = logits
        .broadcast_gt(&truth)?
        .to_dtype(DType::F32)?
        .sum(D::Minus1)?;
    let top1 = above.lt(0.5)?.to_dtype(DType::F32)?.sum(D::Minus1)?;
    let top5 = above.lt(4.5)?.to_dtype(DType::F32)?.sum(D::Minus1)?;
    Ok((top1, top5))
}

/// `(N, C)` one-hot f32 of u32 labels.
pub fn one_hot(labels: &Tensor, classes: usize, dev: &Device) -> Result<Tensor> {
    let n = labels.dim(0)?;
    let idx = labels.to_dtype(DType::U32)?.to_device(dev)?;
    let cls = Tensor::arange(0u32, classes as u32, dev)?;
    Ok(idx
        .reshape((n, 1))?
        .broadcast_eq(&cls.reshape((1, classes))?)?
        .to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests;

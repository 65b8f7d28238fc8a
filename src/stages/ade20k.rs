//! `ade20k_segmentation` stage: semantic segmentation on ADE20K (EVALS.md §3) with the exact
//! mmseg metric (`eval::segmentation`).
//!
//! - `protocol: linear` (cheap, iBOT): frozen backbone; the patch features of four blocks
//!   (`layers`, default blocks 4, 6, 8, 12 of 12 scaled to the depth), each through the final
//!   norm, concatenated; a 1×1 conv (linear classifier) to 150 classes trained with
//!   cross-entropy (ignore 255).
//! - `protocol: upernet` (full, MAE/BEiT): backbone fine-tuned with layer-wise lr decay under a
//!   compact UperNet (`model::seg_heads::UperNet`) with its auxiliary FCN head.
//!
//! Training follows mmseg: random resize (ratio 0.5–2) → random crop (`cat_max_ratio` 0.75) →
//! flip → normalise → pad; AdamW, linear warmup from 1e-6 then poly(1.0) decay to 0; the
//! cross-entropy is the mean over all crop pixels (ignored ones count 0, mmseg's default).
//! Inference: keep-ratio resize to `scale`, sliding windows (`crop`, `stride`), window logits
//! averaged, resized to the original image size, argmax; predictions are written as mode-L PNGs
//! (`predictions/<stem>.png`, classes 0..149) and scored by `evaluate_dirs`.
//!
//! Data parallel (`resources: { ranks: N }` / `gpus: N`, [`crate::train::parallel`]): each rank takes
//! every `N`-th image of each global batch (`batch_size` must be a multiple of `N`), the gradients are
//! averaged over the ranks (the loss is a mean over equal shards' pixels, so the mean of the
//! ranks' gradients is the global batch's); rank 0 checkpoints, predicts and scores. The linear
//! protocol thus trains the weights of one process. UperNet's BatchNorm layers normalise with
//! each rank's shard statistics and keep rank 0's running statistics (PyTorch DDP with plain
//! BatchNorm, not mmseg's SyncBN), and its Dropout2d draws per rank (rank 0: the one-process
//! stream), so an N-rank UperNet run is a different, equally valid run of the recipe.
//!
//! Resumable: model, optimiser state, step and loss series are checkpointed through `ctx.ckpt`;
//! every random draw is a function of (stage key, seed, step), so a resumed run on the CPU is
//! bit-identical. Not reproduced from mmseg: PhotoMetricDistortion, drop path, fp16.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{backbone, params_of, StageContext, StageOutput};
use crate::data::ade20k::{self, Ade20k, LabelMap};
use crate::data::seg_transforms::{self};
use crate::data::transforms::{self, Interpolation, IMAGENET_MEAN, IMAGENET_STD};
use crate::error::{Error, Result};
use crate::model::resize::resize_bilinear;
use crate::model::VisionTransformer;
use crate::train::run_loop::{self, LoopConfig, Points};
use crate::util::rng::stage_rng;

use crate::model::seg_net::{Heads, SegNet as Model};
pub use crate::train::cross_entropy::cross_entropy_ignore;

/// Model-layer errors (shapes, configs) as data errors of the stage.
fn merr(e: crate::model::ModelError) -> Error {
    Error::Data(format!("model: {e}"))
}

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

mod step;
use step::SegRecipe;

/// ADE20K classes.
const CLASSES: usize = ade20k::NUM_CLASSES;

/// Which protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Frozen backbone + linear (1×1 conv) head on concatenated block features.
    #[default]
    Linear,
    /// Fine-tuned backbone + UperNet.
    Upernet,
}

/// Params of an `ade20k_segmentation` stage (defaults: the mmseg / iBOT recipes at 512 px).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// `upstream` (pretrain / finetune encoder), `random`, or a safetensors path.
    pub checkpoint: String,
    /// `linear` (frozen backbone) or `upernet` (fine-tuned).
    pub protocol: Protocol,
    /// 0-based block indices whose outputs (after the final norm) feed the head; negative count
    /// from the end. Empty = blocks 4, 6, 8, 12 of a 12-block model scaled to the depth
    /// (`round(k * depth / 12) - 1`, i.e. 3, 5, 7, 11 for ViT-B). UperNet takes exactly four.
    pub layers: Vec<i64>,
    /// Training iterations (mmseg: 160k).
    pub iters: u64,
    /// Images per iteration (mmseg: 16).
    #[serde(alias = "batch")]
    pub batch_size: usize,
    /// Peak learning rate (default: 8e-4 linear, 1e-4 UperNet).
    pub lr: Option<f64>,
    /// AdamW weight decay (not on biases and norms).
    pub weight_decay: f64,
    /// Linear warmup iterations from 1e-6 × lr.
    pub warmup_iters: u64,
    /// Layer-wise lr decay of the backbone (UperNet only).
    pub layer_decay: f64,
    /// Training crop and sliding-window side in pixels (a multiple of the patch size).
    pub crop: usize,
    /// `[long, short]` resize target (train: times the sampled ratio; test: as is).
    pub scale: [usize; 2],
    /// Ratio range of the training random resize.
    pub ratio_range: [f64; 2],
    /// `cat_max_ratio` of the training random crop.
    pub cat_max_ratio: f64,
    /// Sliding-window stride (default: 2/3 of the crop for linear (341 at 512), 1/2 for UperNet).
    pub stride: Option<usize>,
    /// UperNet decode-head width.
    pub channels: usize,
    /// UperNet auxiliary FCN head width (0 = no auxiliary head).
    pub aux_channels: usize,
    /// Weight of the auxiliary loss.
    pub aux_weight: f64,
    /// Dropout2d before the UperNet classifiers.
    pub dropout: f64,
    /// Training split folder.
    pub train_split: String,
    /// Evaluation split folder.
    pub val_split: String,
    /// Checkpoint every N iterations (not hashed).
    pub checkpoint_every: u64,
    /// Checkpoint every N seconds (not hashed).
    pub checkpoint_secs: u64,
    /// Record the training loss every N iterations (not hashed).
    pub log_every: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            checkpoint: "upstream".into(),
            protocol: Default::default(),
            layers: Default::default(),
            iters: 160_000,
            batch_size: 16,
            lr: Default::default(),
            weight_decay: 0.05,
            warmup_iters: 1500,
            layer_decay: 0.65,
            crop: 512,
            scale: [2048, 512],
            ratio_range: [0.5, 2.0],
            cat_max_ratio: 0.75,
            stride: Default::default(),
            channels: 768,
            aux_channels: 256,
            aux_weight: 0.4,
            dropout: 0.1,
            train_split: "training".into(),
            val_split: "validation".into(),
            checkpoint_every: 1000,
            checkpoint_secs: 600,
            log_every: 50,
        }
    }
}

impl Params {
    fn lr(&self) -> f64 {
        self.lr.unwrap_or(match self.protocol {
            Protocol::Linear => 8e-4,
            Protocol::Upernet => 1e-4,
        })
    }

    fn stride(&self) -> usize {
        self.stride.unwrap_or(match self.protocol {
            Protocol::Linear => self.crop * 2 / 3,
            Protocol::Upernet => self.crop / 2,
        })
    }
}

/// Default feature blocks: 4, 6, 8, 12 of 12 scaled to `depth` (0-based).
pub fn default_layers(depth: usize) -> Vec<i64> {
    [4usize, 6, 8, 12]
        .iter()
        .map(|&k| ((k * depth) as f64 / 12.0).round().max(1.0) as i64 - 1)
        .collect()
}

fn dataset_root(ctx: &StageContext) -> Result<PathBuf> {
    Ok(ade20k::resolve_root(&super::dataset::upstream_root(
        ctx, "ade20k",
    )?))
}

fn read_labels(path: &Path) -> Result<LabelMap> {
    let mut m = ade20k::read_label_png(path).map_err(|e| Error::Data(e.to_string()))?;
    ade20k::reduce_zero_label(&mut m.data);
    Ok(m)
}

/// Sample `g` of the infinite shuffled stream: epoch `g / n` is a seeded permutation.
fn sample_index(key: &str, seed: u64, n: usize, g: u64) -> usize {
    let epoch = g / n as u64;
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut stage_rng(key, seed, &format!("epoch-{epoch}")));
    perm[(g % n as u64) as usize]
}

/// Run the stage: check, train ([`crate::train::run_loop`]), predict the val split, score.
/// The blocks the head reads (`layers`, or the protocol's default for this depth), once the
/// params are checked against the backbone and the number of ranks.
fn checked_layers(
    p: &Params,
    cfg: &crate::model::VitConfig,
    world: usize,
) -> std::result::Result<Vec<i64>, String> {
    let layers = if p.layers.is_empty() {
        default_layers(cfg.depth)
    } else {
        p.layers.clone()
    };
    check(p, &layers, cfg.patch_size)?;
    if p.protocol == Protocol::Upernet && p.batch_size / world < 2 {
        return Err(format!(
            "UperNet trains BatchNorm layers on each rank's shard: `batch_size` ({}) must be at \
             least 2 x the number of ranks ({world})",
            p.batch_size,
        ));
    }
    Ok(layers)
}

pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let id = ctx.job.id.clone();
    let dev = backbone::device(ctx)?;
    let mut ranks = crate::train::parallel::ranks::Ranks::connect(ctx, &dev)?;
    let root = dataset_root(ctx)?;
    let bad = |m: String| Error::stage(&id, m);
    let train = Ade20k::open(&root, &p.train_split).map_err(|e| bad(e.to_string()))?;
    let val = Ade20k::open(&root, &p.val_split).map_err(|e| bad(e.to_string()))?;
    if train.samples.is_empty() || val.samples.is_empty() {
        return Err(bad(format!(
            "ADE20K at {} has {} `{}` and {} `{}` images; both splits need images",
            root.display(),
            train.samples.len(),
            p.train_split,
            val.samples.len(),
            p.val_split
        )));
    }
    let bb = backbone::load(ctx, &p.checkpoint, ctx.job.config.get("model"), &dev)?;
    ranks.check_divides("batch_size", p.batch_size)?;
    let layers = checked_layers(&p, &bb.cfg, ranks.world()).map_err(&bad)?;
    ctx.log(format!(
        "ADE20K {:?} protocol on {} ({} blocks, patch {}), layers {:?}; {} train / {} val images",
        p.protocol,
        bb.source,
        bb.cfg.depth,
        bb.cfg.patch_size,
        layers,
        train.samples.len(),
        val.samples.len()
    ));
    let source = bb.source.clone();
    let mut r = SegRecipe::new(ctx, &p, bb, layers.clone(), &train, &ranks, &dev)?;
    let cfg = LoopConfig {
        log_every: p.log_every,
        points: Points::Means(p.log_every.max(1)),
        nan_hint: Some("lower `lr`".into()),
        unit: "iteration",
        ..LoopConfig::new(p.iters, vec!["loss"])
    };
    let done = run_loop::run(ctx, &mut ranks, &cfg, &mut r)?;
    if !ranks.is_leader() {
        // rank 0 holds the same weights, predicts, scores and writes
        return Ok(StageOutput::default());
    }
    // the trained model stays checkpointed while the predictions are written
    if ctx.ckpt.load()?.map(|c| c.step) != Some(p.iters) {
        run_loop::checkpoint(ctx, &done.state, &r)?;
    }
    let model = r.model;
    let rep = predict_and_score(ctx, &model, &p, &val, &root, &dev)?;
    model
        .head_vars
        .save(ctx.job.out_dir.join("head.safetensors"))?;
    let m = &rep.metrics;
    let mut out = StageOutput::default();
    out.metrics.insert("miou".into(), m.m_iou);
    out.metrics.insert("aacc".into(), m.a_acc);
    out.metrics.insert("macc".into(), m.m_acc);
    let loss = done.curve("loss");
    if let Some(&(_, l)) = loss.last() {
        out.metrics.insert("train_loss".into(), l);
    }
    out.series.insert("loss".into(), loss);
    out.info = json!({
        "protocol": p.protocol,
        "backbone": source,
        "layers": layers,
        "val_images": val.samples.len(),
        "predictions": "predictions/",
        "ranks": ranks.world(),
        "host_reads_in_steps": done.reads_in_steps,
    });
    Ok(out)
}

/// The params' checks that need the backbone's patch size.
fn check(p: &Params, layers: &[i64], patch: usize) -> std::result::Result<(), String> {
    if p.crop == 0 || p.crop % patch != 0 {
        return Err(format!(
            "`crop` {} must be a positive multiple of the patch size {patch}",
            p.crop
        ));
    }
    if p.protocol == Protocol::Upernet {
        if layers.len() != 4 {
            return Err(format!("UperNet takes exactly 4 `layers`, got {layers:?}"));
        }
        if p.batch_size < 2 {
            return Err("UperNet trains BatchNorm layers: `batch_size` must be at least 2".into());
        }
        if p.crop / patch < 2 {
            return Err(format!(
                "UperNet needs a feature grid of at least 2x2: `crop` must be at least {}",
                2 * patch
            ));
        }
    }
    if p.batch_size == 0 || p.iters == 0 {
        return Err("`batch_size` and `iters` must be positive".into());
    }
    Ok(())
}

/// Predict every val image into `predictions/` and score them with the mmseg metric.
fn predict_and_score(
    ctx: &mut StageContext,
    model: &Model,
    p: &Params,
    val: &Ade20k,
    root: &Path,
    dev: &Device,
) -> Result<crate::eval::segmentation::SegReport> {
    let bad = |m: String| Error::stage(&ctx.job.id, m);
    let (enc, head) = model.frozen(dev).map_err(merr)?;
    let pred_dir = ctx.job.out_dir.join("predictions");
    fs_err::create_dir_all(&pred_dir)?;
    let t0 = std::time::Instant::now();
    for (i, (img_path, _)) in val.samples.iter().enumerate() {
        if ctx.is_interrupted() {
            return Err(Error::Interrupted);
        }
        let pred = predict(model, &enc, head.as_ref(), img_path, p, dev)?;
        let stem = img_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        ade20k::write_label_png(&pred_dir.join(format!("{stem}.png")), &pred)
            .map_err(|e| Error::Data(e.to_string()))?;
        ctx.progress
            .set(i as u64 + 1, val.samples.len() as u64, "inference");
    }
    let infer_s = t0.elapsed().as_secs_f64();
    let gt_dir = root
        .join("annotations")
        .join(ade20k::split_dir(&p.val_split));
    let rep = crate::eval::segmentation::evaluate_dirs(&gt_dir, &pred_dir)
        .map_err(|e| bad(e.to_string()))?;
    fs_err::write(
        ctx.job.out_dir.join("metrics.json"),
        serde_json::to_vec_pretty(&rep.to_json())?,
    )?;
    fs_err::write(ctx.job.out_dir.join("per_class.txt"), rep.to_table(None))?;
    let m = &rep.metrics;
    ctx.log(format!(
        "mIoU {:.2}  aAcc {:.2}  mAcc {:.2} ({} val images, inference {infer_s:.1}s)",
        m.m_iou,
        m.a_acc,
        m.m_acc,
        val.samples.len()
    ));
    Ok(rep)
}

/// Sliding-window prediction of one image at its original size (classes 0..149).
fn predict(
    model: &Model,
    enc: &VisionTransformer,
    head: Heads<'_>,
    img_path: &Path,
    p: &Params,
    dev: &Device,
) -> Result<LabelMap> {
    let img = transforms::decode_rgb(img_path).map_err(|e| Error::Data(e.to_string()))?;
    let (h0, w0) = (img.height() as usize, img.width() as usize);
    let (nh, nw) = seg_transforms::rescale_size(h0, w0, (p.scale[0] as f64, p.scale[1] as f64));
    let img = transforms::resize(&img, nw as u32, nh as u32, Interpolation::Bilinear);
    let chw = transforms::to_chw_normalized(&img, IMAGENET_MEAN, IMAGENET_STD);
    let x = Tensor::from_vec(chw.data, (1, 3, nh, nw), dev)?;
    // Windows are padded (bottom/right, zeros) to a multiple of the patch (2x for UperNet, whose
    // pyramid halves the grid) and their logits resized to the window, as mmseg's corner padding.
    let unit = model.cfg.patch_size * if model.upernet.is_some() { 2 } else { 1 };
    let mut sum = Tensor::zeros((1, CLASSES, nh, nw), DType::F32, dev)?;
    let mut count = vec![0f32; nh * nw];
    for (y, x0, ch, cw) in seg_transforms::slide_windows(nh, nw, p.crop, p.stride()) {
        let win = x.narrow(2, y, ch)?.narrow(3, x0, cw)?;
        let (ph, pw) = (ch.div_ceil(unit) * unit, cw.div_ceil(unit) * unit);
        let win = win
            .pad_with_zeros(2, 0, ph - ch)?
            .pad_with_zeros(3, 0, pw - cw)?
            .contiguous()?;
        let (logits, _) = model.forward(enc, head, &win, false, None).map_err(merr)?;
        let logits = resize_bilinear(&logits, ch, cw).map_err(merr)?;
        let logits =
            logits
                .pad_with_zeros(2, y, nh - y - ch)?
                .pad_with_zeros(3, x0, nw - x0 - cw)?;
        sum = (sum + logits)?;
        for yy in y..y + ch {
            for c in &mut count[yy * nw + x0..yy * nw + x0 + cw] {
                *c += 1.0;
            }
        }
    }
    let count = Tensor::from_vec(count, (1, 1, nh, nw), dev)?;
    let logits = sum.broadcast_div(&count)?;
    let logits = resize_bilinear(&logits, h0, w0).map_err(merr)?;
    let pred: Vec<u32> = logits.argmax_keepdim(1)?.flatten_all()?.to_vec1()?;
    Ok(LabelMap {
        width: w0 as u32,
        height: h0 as u32,
        data: pred.into_iter().map(|v| v as u8).collect(),
    })
}

/// The `ade20k_segmentation` kind.
pub struct Ade20kSegmentation;

impl crate::kind::Kind for Ade20kSegmentation {
    fn renamed_params(&self) -> &'static [crate::kind::Rename] {
        &[crate::kind::hooks::BATCH]
    }

    kind_basics!(super::resolve::<Params>, run);

    /// `protocol: upernet` is `ade20k-upernet` (the published protocol), `protocol: linear`
    /// (the default) `ade20k-linear`.
    fn report_facts(&self, params: &Value) -> crate::kind::report_facts::ReportFacts {
        let proto = params
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("linear");
        crate::kind::report_facts::ReportFacts {
            protocol: Some(format!("ade20k-{proto}")),
            ..crate::kind::report_facts::ReportFacts::common(params)
        }
    }

    fn check_plan(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
        super::backbone::check_plan(stage)?;
        crate::train::parallel::ranks::check_plan(stage, |p: &Params, world, rf| {
            crate::train::parallel::ranks::batch_divides("batch_size", p.batch_size, world, rf)?;
            if p.protocol == Protocol::Upernet && p.batch_size / world < 2 {
                return Err(format!(
                    "UperNet trains BatchNorm layers on each rank's shard: `params.batch_size` ({}) \
                     must be at least 2 x the number of ranks (`{rf}`: {world}); raise \
                     `params.batch_size` to at least {} or lower `{rf}`",
                    p.batch_size,
                    2 * world
                ));
            }
            Ok(())
        })?;
        super::dataset::check_plan_upstream(stage, Some("ade20k"), false)
    }

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| {
            Cost::of(
                Pass::Train,
                Some(512),
                Schedule::iters(p.iters, p.batch_size),
            )
        })
    }
}

#[cfg(test)]
mod tests;

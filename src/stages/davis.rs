//! `davis_vos` stage: DAVIS-2017 semi-supervised video object segmentation by DINO label
//! propagation on frozen patch features (EVALS.md §4.2, `eval::label_propagation`), scored with
//! the official J&F (`eval::davis`). No training.
//!
//! Per sequence: every frame is read like DINO's `read_frame` (RGB, bilinear resize so the short
//! side is `size` and the long side is floored to a multiple of `multiple`, /255, normalised with
//! mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225)), encoded **once** (last block after
//! the final norm, L2-normalised patch features), then labels are propagated from the first
//! frame's annotation. Predictions are palette PNGs in `predictions/<seq>/<frame>.png`
//! (frame 0 = the ground truth). Metrics: `jf_mean`, `j_mean`, `j_recall`, `j_decay`, `f_mean`,
//! `f_recall`, `f_decay` (×100) and `frames_per_s` (frames propagated per second, features and
//! writing included).
//!
//! The frame resize is OpenCV's `INTER_LINEAR` rule computed in f32 and rounded to 8 bits (OpenCV
//! uses 11-bit fixed-point weights: values may differ by one level).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{backbone, params_of, StageContext, StageOutput};
use crate::data::davis::{self as davis_data, Davis};
use crate::data::transforms;
use crate::error::{Error, Result};
use crate::eval::davis::{evaluate_davis, read_palette_png, write_palette_png, DavisReport};
use crate::eval::label_propagation::{
    dino_frame_size, frame_output, nearest_resize_u8, one_hot, propagate_sequence,
    PropagationConfig,
};
use crate::model::resize::resize_plane;
use crate::model::VisionTransformer;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// DINO's normalisation (std[0] = 0.228 sic).
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.228, 0.224, 0.225];

/// Params of a `davis_vos` stage (defaults: DINO's `eval_video_segmentation.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// `upstream` (pretrain / finetune encoder), `random`, or a safetensors path.
    pub checkpoint: String,
    /// Image set (`ImageSets/2017/<split>.txt`).
    pub split: String,
    /// Short side of the resized frames (a multiple of the patch size).
    pub size: usize,
    /// The long side is floored to a multiple of this (a multiple of the patch size).
    pub multiple: usize,
    /// Recent frames used as context besides the first.
    pub n_last_frames: usize,
    /// Half-size of the spatial window of sources, in patches.
    pub size_mask_neighborhood: usize,
    /// Affinities kept per query, over all context frames.
    pub topk: usize,
    /// Softmax-free temperature of `exp(sim / t)` (DINO hard-codes 0.1).
    pub temperature: f64,
    /// Frames encoded at once.
    #[serde(alias = "batch")]
    pub batch_size: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            checkpoint: "upstream".into(),
            split: "val".into(),
            size: 480,
            multiple: 64,
            n_last_frames: 7,
            size_mask_neighborhood: 12,
            topk: 5,
            temperature: 0.1,
            batch_size: 8,
        }
    }
}

/// The numbers a run needs (sizes and `topk` positive, `temperature` > 0, `size` and `multiple`
/// multiples of the patch size when it is known). Called when planning (patch size from the
/// stage's `model:` or its upstream pretrain stage, when known) and again when the stage starts.
/// The error names the offending param and the fix.
pub fn check_params(
    p: &Params,
    patch: Option<usize>,
) -> std::result::Result<(), (&'static str, String)> {
    for (field, v) in [("size", p.size), ("multiple", p.multiple)] {
        let bad = match patch {
            Some(patch) => v == 0 || v % patch != 0,
            None => v == 0,
        };
        if bad {
            let of = match patch {
                Some(patch) => format!("the patch size {patch}"),
                None => "the patch size".into(),
            };
            return Err((
                field,
                format!(
                    "`size` ({}) and `multiple` ({}) must be positive multiples of {of}; set `params.{field}` (e.g. size 476, multiple 56 for patch 14; size 480, multiple 16 for patch 16)",
                    p.size, p.multiple
                ),
            ));
        }
    }
    if p.temperature.is_nan() || p.temperature <= 0.0 {
        return Err((
            "temperature",
            format!(
                "`temperature` ({}) must be > 0; set `params.temperature` (DINO uses 0.1)",
                p.temperature
            ),
        ));
    }
    if p.topk == 0 {
        return Err((
            "topk",
            "`topk` must be >= 1; set `params.topk` (DINO uses 5)".into(),
        ));
    }
    Ok(())
}

fn dataset_root(ctx: &StageContext) -> Result<PathBuf> {
    Ok(davis_data::resolve_root(&super::dataset::upstream_root(
        ctx, "davis",
    )?))
}

/// OpenCV `INTER_LINEAR` resize of an RGB frame to `th × tw`, rounded to 8 bits, then /255 and
/// normalised: CHW `f32`.
fn frame_tensor_data(img: &image::RgbImage, th: usize, tw: usize) -> Vec<f32> {
    let (h, w) = (img.height() as usize, img.width() as usize);
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * th * tw];
    for c in 0..3 {
        let plane: Vec<f32> = (0..h * w).map(|i| raw[i * 3 + c] as f32).collect();
        let r = resize_plane(&plane, h, w, th, tw);
        for (o, v) in out[c * th * tw..(c + 1) * th * tw].iter_mut().zip(r) {
            let v8 = v.round().clamp(0.0, 255.0);
            *o = (v8 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// L2-normalised `(h*w, D)` features of every frame, encoded in batches.
fn encode_frames(
    enc: &VisionTransformer,
    frames: &[PathBuf],
    th: usize,
    tw: usize,
    batch: usize,
    dev: &Device,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(frames.len());
    for chunk in frames.chunks(batch.max(1)) {
        let data: Vec<Result<Vec<f32>>> = chunk
            .par_iter()
            .map(|f| {
                let img = transforms::decode_rgb(f).map_err(|e| Error::Data(e.to_string()))?;
                Ok(frame_tensor_data(&img, th, tw))
            })
            .collect();
        let mut flat = Vec::with_capacity(chunk.len() * 3 * th * tw);
        for d in data {
            flat.extend(d?);
        }
        let x = Tensor::from_vec(flat, (chunk.len(), 3, th, tw), dev)?;
        let f = enc
            .forward_features(&x, None)
            .map_err(|e| Error::Data(format!("model: {e}")))?; // (B, hw, D)
        let norm = f
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        let f = f.broadcast_div(&norm)?;
        for i in 0..chunk.len() {
            out.push(f.get(i)?.contiguous()?);
        }
    }
    Ok(out)
}

/// Propagate one sequence and write its predictions; returns the number of frames.
fn run_sequence(
    enc: &VisionTransformer,
    seq: &davis_data::DavisSequence,
    p: &Params,
    cfg: &PropagationConfig,
    patch: usize,
    out_dir: &Path,
    dev: &Device,
) -> Result<usize> {
    let first_ann = seq
        .annotations
        .first()
        .filter(|a| {
            seq.frames
                .first()
                .is_some_and(|f| f.file_stem() == a.file_stem())
        })
        .ok_or_else(|| {
            Error::Data(format!(
                "sequence `{}`: no annotation for its first frame (Annotations/480p/{}/00000.png); semi-supervised VOS needs it",
                seq.name, seq.name
            ))
        })?;
    let (ah, aw, gt) = read_palette_png(first_ann).map_err(|e| Error::Data(e.to_string()))?;
    let (th, tw) = dino_frame_size(ah, aw, p.size, p.multiple);
    let (h, w) = (th / patch, tw / patch);
    if h == 0 || w == 0 {
        return Err(Error::Data(format!(
            "sequence `{}`: frames of {ah}x{aw} resize to {th}x{tw}, smaller than one patch; raise `size`",
            seq.name
        )));
    }
    let small = nearest_resize_u8(&gt, ah, aw, h, w);
    let (c, first) = one_hot(&small);
    let seq_dir = out_dir.join(&seq.name);
    fs_err::create_dir_all(&seq_dir)?;
    let name = |f: &Path| -> String {
        f.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let werr = |e: crate::eval::davis::DavisError| Error::Data(e.to_string());
    write_palette_png(
        &seq_dir.join(format!("{}.png", name(&seq.frames[0]))),
        ah,
        aw,
        &gt,
    )
    .map_err(werr)?;
    let feats = encode_frames(enc, &seq.frames, th, tw, p.batch_size, dev)?;
    propagate_sequence(cfg, &feats, first, c, h, w, |t, soft| {
        let seg = frame_output(soft, c, h, w, patch, ah, aw);
        write_palette_png(
            &seq_dir.join(format!("{}.png", name(&seq.frames[t]))),
            ah,
            aw,
            &seg,
        )
        .map_err(werr)
    })?;
    Ok(seq.frames.len())
}

/// Run the stage.
/// The backbone's weights as a ViT without gradients.
fn frozen_encoder(
    bb: &backbone::Backbone,
    dev: &candle_core::Device,
) -> std::result::Result<VisionTransformer, crate::model::ModelError> {
    let frozen: std::collections::HashMap<String, Tensor> = bb
        .varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    VisionTransformer::new(&bb.cfg, VarBuilder::from_tensors(frozen, DType::F32, dev))
}

/// The official tool's output files: `metrics.json`, the global and per-sequence CSVs.
fn write_results(out_dir: &Path, rep: &DavisReport, split: &str) -> Result<()> {
    fs_err::write(
        out_dir.join("metrics.json"),
        serde_json::to_vec_pretty(&rep.to_json())?,
    )?;
    fs_err::write(
        out_dir.join(format!("global_results-{split}.csv")),
        rep.global_csv(),
    )?;
    fs_err::write(
        out_dir.join(format!("per-sequence_results-{split}.csv")),
        rep.per_sequence_csv(),
    )?;
    Ok(())
}

pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let id = ctx.job.id.clone();
    let bad = |m: String| Error::stage(&id, m);
    let dev = backbone::device(ctx)?;
    let root = dataset_root(ctx)?;
    let ds = Davis::open(&root, &p.split).map_err(|e| bad(e.to_string()))?;
    if ds.sequences.is_empty() {
        return Err(bad(format!(
            "{}: ImageSets/2017/{}.txt lists no sequence",
            root.display(),
            p.split
        )));
    }
    let bb = backbone::load(ctx, &p.checkpoint, ctx.job.config.get("model"), &dev)?;
    let patch = bb.cfg.patch_size;
    check_params(&p, Some(patch)).map_err(|(_, m)| bad(m))?;
    let enc = frozen_encoder(&bb, &dev).map_err(|e| bad(e.to_string()))?;
    let cfg = PropagationConfig {
        n_last_frames: p.n_last_frames,
        size_mask_neighborhood: p.size_mask_neighborhood,
        topk: p.topk,
        temperature: p.temperature,
    };
    ctx.log(format!(
        "DAVIS {} ({} sequences) by label propagation on {} (patch {patch}, short side {})",
        p.split,
        ds.sequences.len(),
        bb.source,
        p.size
    ));
    let pred_dir = ctx.job.out_dir.join("predictions");
    fs_err::create_dir_all(&pred_dir)?;
    let t0 = Instant::now();
    let mut frames = 0usize;
    let n_seq = ds.sequences.len() as u64;
    for (i, seq) in ds.sequences.iter().enumerate() {
        if ctx.is_interrupted() {
            return Err(Error::Interrupted);
        }
        frames += run_sequence(&enc, seq, &p, &cfg, patch, &pred_dir, &dev)
            .map_err(|e| bad(e.to_string()))?;
        ctx.progress.set(i as u64 + 1, n_seq, seq.name.clone());
    }
    let secs = t0.elapsed().as_secs_f64();
    let fps = frames as f64 / secs.max(1e-9);
    let rep = evaluate_davis(&root, &pred_dir, &p.split).map_err(|e| bad(e.to_string()))?;
    write_results(&ctx.job.out_dir, &rep, &p.split)?;
    let g = rep.global;
    ctx.log(format!(
        "J&F {:.3}  J {:.3}  F {:.3}  ({frames} frames in {secs:.1}s, {fps:.1} frames/s)",
        g.jf_mean, g.j_mean, g.f_mean
    ));
    let mut out = StageOutput::default();
    // the official columns in snake case, in percent: `J&F-Mean` is `jf_mean`
    for (name, v) in g.named() {
        let key = name.replace('&', "").replace('-', "_").to_lowercase();
        out.metrics.insert(key, v * 100.0);
    }
    out.metrics.insert("frames_per_s".into(), fps);
    out.info = json!({
        "backbone": bb.source,
        "sequences": ds.sequences.len(),
        "frames": frames,
        "predictions": "predictions/",
    });
    Ok(out)
}

/// Plan-time check of the sizes against the patch size, when planning can tell it: the stage's
/// own complete `model:` (for `random` or a path), else an upstream `pretrain` stage's model as
/// it will train (with its `params.patch` applied).
fn check_plan(stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
    let p: Params = serde_json::from_value(stage.params.clone())
        .map_err(|e| crate::kind::PlanIssue::params("", e.to_string()))?;
    let own = || {
        serde_json::from_value::<crate::model::VitConfig>(serde_json::Value::Object(
            stage.model?.clone(),
        ))
        .ok()
    };
    let upstream = || {
        stage.upstream.iter().find_map(|u| {
            if u.kind != crate::kind::StageKind::Pretrain {
                return None;
            }
            let model = u.config.get("model")?.as_object()?;
            (stage.kinds)(u.kind).planned_model(model, &u.config["params"])
        })
    };
    let patch = match p.checkpoint.as_str() {
        "" | "upstream" => upstream(),
        "random" => own().or_else(upstream),
        _ => own(),
    }
    .map(|m| m.patch_size);
    check_params(&p, patch).map_err(|(field, m)| crate::kind::PlanIssue::params(field, m))
}

/// The `davis_vos` kind.
pub struct DavisVos;

impl crate::kind::Kind for DavisVos {
    fn renamed_params(&self) -> &'static [crate::kind::Rename] {
        &[crate::kind::hooks::BATCH]
    }

    kind_basics!(super::resolve::<Params>, run);

    fn check_plan(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
        super::backbone::check_plan(stage)?;
        check_plan(stage)?;
        super::dataset::check_plan_upstream(stage, Some("davis"), false)
    }

    fn cost(&self, _params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::of(Pass::Forward, Some(480), Schedule::OnePass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_preprocessing_normalises_like_dino() {
        let img = image::RgbImage::from_fn(4, 2, |_, _| image::Rgb([255, 0, 128]));
        let d = frame_tensor_data(&img, 2, 4);
        assert_eq!(d.len(), 3 * 8);
        assert!((d[0] - (1.0 - 0.485) / 0.228).abs() < 1e-6);
        assert!((d[8] - (0.0 - 0.456) / 0.224).abs() < 1e-6);
        assert!((d[16] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-6);
    }

    #[test]
    fn defaults_are_dino() {
        let p = Params::default();
        assert_eq!(
            (p.n_last_frames, p.size_mask_neighborhood, p.topk),
            (7, 12, 5)
        );
        assert_eq!(p.temperature, 0.1);
        assert_eq!((p.size, p.multiple), (480, 64));
    }
}

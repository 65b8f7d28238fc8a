//! `coco_detection` stage: COCO object detection and instance segmentation on the pretrained ViT
//! (the AP^box / AP^mask columns of C-JEPA's Table 1), with the detector of
//! [`crate::model::detect`] (simple feature pyramid + FCOS + Mask R-CNN mask head).
//!
//! Training (EVALS.md §2.4-2.5, scaled down): LSJ-style augmentation at `img_size`
//! ([`crate::data::detection`]), AdamW ([`crate::train::optim`]) with ViTDet's layer-wise lr
//! decay on the backbone (`rate^(depth + 1 - layer_id)`, patch embedding = layer 0, block i =
//! layer i + 1, everything else 1.0), no weight decay on biases and norms, linear warmup from
//! `warmup_factor` then cosine or step decay. `backbone: finetune` trains the encoder with the
//! heads (the paper's protocol); `backbone: frozen` trains only the pyramid and heads on detached
//! features (a cheap, clearly labelled variant). In-stage checkpoints hold the trainable weights,
//! the optimiser moments and the loss series; every random draw derives from the stage key, so a
//! resumed run is bit-identical on CPU.
//!
//! Data parallel (`resources: { ranks: N }` / `gpus: N`, [`crate::train::parallel`]): every rank draws
//! the same global batch and takes its shard (every N-th image). An image's augmentation and its
//! mask RoIs come from streams of that image (`aug/{epoch}/{index}`,
//! `mask-rois/{step}/{index}`), so each rank sees the images and RoIs of the one-process run.
//! The FCOS losses are divided by the positives and the centerness-target sum, the mask loss by
//! the RoIs: each rank sums those counts over the ranks before its loss, scales its loss by N,
//! and the mean of the ranks' gradients is then the one-process gradient up to float rounding.
//! Rank 0 checkpoints, evaluates and writes.
//!
//! Evaluation: every val image is resized (longer side `img_size`), detected, and its masks pasted
//! at the original resolution; the exact COCOeval ([`crate::eval::coco`]) gives the 12 + 12
//! stats, stored ×100 as `ap_box`, `ap50_box`, `ap75_box`, `aps_box`, `apm_box`, `apl_box`,
//! `ar1_box`, `ar10_box`, `ar100_box`, `ars_box`, `arm_box`, `arl_box` and the same with `_mask`
//! (a stat pycocotools reports as -1, i.e. no ground truth in that area range, is left out).
//! Artifacts: `results.json` (COCO results format, compressed RLE masks; `cjepa eval coco` on it
//! reproduces the metrics), `eval.json`, `eval.txt`, `detector.safetensors`, `config.json`.

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::backbone::{self, Backbone};
use super::{dataset, params_of, StageContext, StageOutput};
use crate::data::coco::CocoDataset;
use crate::data::detection::eval_image;
use crate::data::transforms::Chw;
use crate::error::{Error, Result};
use crate::eval::coco as ce;
use crate::model::detect::box_coding;
use crate::model::detect::fcos::Detection;
use crate::model::detect::mask_head::paste;
use crate::model::detect::{infer, Detector, DetectorConfig};
use crate::train::run_loop::{self, LoopConfig};

/// Implementation version (part of the key).
pub const VERSION: u32 = 2;

mod step;
use step::DetRecipe;

/// Whether the encoder is trained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackboneMode {
    /// Encoder trained with the heads (layer-wise lr decay).
    #[default]
    Finetune,
    /// Encoder frozen; pyramid and heads trained on its features.
    Frozen,
}

/// Shape of the learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Half-cosine to 0 at `steps`.
    #[default]
    Cosine,
    /// x0.1 at each of `milestones` (fractions of `steps`), ViTDet's schedule.
    Step,
}

/// Params of a `coco_detection` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Encoder weights: `upstream` (a pretrain / finetune stage in `needs`), `random` or a path.
    pub checkpoint: String,
    /// `finetune` (paper protocol) or `frozen` (cheap variant).
    pub backbone: BackboneMode,
    /// Side of the square input (a multiple of 2 x patch size).
    pub img_size: usize,
    /// Range of the LSJ scale factor.
    pub scale_range: [f64; 2],
    /// Horizontal flip probability.
    pub flip_prob: f64,
    /// Optimiser steps.
    pub steps: u64,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (not on biases and norms).
    pub weight_decay: f64,
    /// Layer-wise lr decay of the encoder (1 = none).
    pub layer_decay: f64,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// lr factor at step 0 of the warmup.
    pub warmup_factor: f64,
    /// Decay after warmup.
    pub schedule: LrSchedule,
    /// Fractions of `steps` where `schedule: step` multiplies the lr by 0.1.
    pub milestones: Vec<f64>,
    /// Clip the global gradient 2-norm (all parameters together) to this value.
    pub clip_grad_norm: Option<f64>,
    /// Detector architecture, loss and test settings.
    pub head: DetectorConfig,
    /// Images per evaluation forward pass.
    pub eval_batch_size: usize,
    /// Checkpoint every N steps (not hashed; 0 = by time only).
    pub checkpoint_every: u64,
    /// Log the losses every N steps (not hashed; 0 = never).
    pub log_every: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            checkpoint: "upstream".into(),
            backbone: Default::default(),
            img_size: 512,
            scale_range: [0.1, 2.0],
            flip_prob: 0.5,
            steps: 5000,
            batch_size: 16,
            lr: 1e-4,
            weight_decay: 0.1,
            layer_decay: 0.7,
            warmup_steps: 250,
            warmup_factor: 1e-3,
            schedule: Default::default(),
            milestones: // ViTDet: 163889 and 177546 of 184375 iterations
            vec![0.889, 0.963],
            clip_grad_norm: Default::default(),
            head: Default::default(),
            eval_batch_size: 4,
            checkpoint_every: Default::default(),
            log_every: Default::default(),
        }
    }
}

/// Validate and fill defaults (unknown keys rejected).
pub fn resolve(params: &serde_json::Map<String, Value>) -> std::result::Result<Value, String> {
    let v = super::resolve::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.validate()?;
    Ok(v)
}

impl Params {
    fn validate(&self) -> std::result::Result<(), String> {
        let [lo, hi] = self.scale_range;
        if !(lo > 0.0 && hi >= lo) {
            return Err(format!(
                "`scale_range` [{lo}, {hi}] must be positive with min <= max"
            ));
        }
        if !(0.0..=1.0).contains(&self.flip_prob) {
            return Err("`flip_prob` must lie in [0, 1]".into());
        }
        if self.steps == 0 || self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err("`steps`, `batch_size` and `eval_batch_size` must be positive".into());
        }
        if !(self.lr > 0.0) || !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return Err("`lr` must be > 0 and `layer_decay` in (0, 1]".into());
        }
        if self.milestones.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return Err("`milestones` are fractions of `steps` in [0, 1]".into());
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c > 0.0) {
                return Err("`clip_grad_norm` must be > 0 (or absent)".into());
            }
        }
        self.head.validate().map_err(|e| e.to_string())
    }

    /// Learning-rate factor (of `lr`) applied at 0-based `step`.
    pub fn lr_factor(&self, step: u64) -> f64 {
        let main = |s: u64| -> f64 {
            match self.schedule {
                LrSchedule::Cosine => {
                    0.5 * (1.0 + (std::f64::consts::PI * s as f64 / self.steps as f64).cos())
                }
                LrSchedule::Step => {
                    let passed = self
                        .milestones
                        .iter()
                        .filter(|&&m| s >= (m * self.steps as f64).round() as u64)
                        .count();
                    0.1f64.powi(passed as i32)
                }
            }
        };
        if step < self.warmup_steps {
            let a = step as f64 / self.warmup_steps as f64;
            let (start, end) = (self.warmup_factor * main(0), main(self.warmup_steps));
            start + (end - start) * a
        } else {
            main(step)
        }
    }
}

/// The upstream `dataset` stage of format coco.
fn coco_upstream(ctx: &StageContext) -> Result<&crate::kind::job::UpstreamRef> {
    let u = ctx.job.upstream.values().find(|u| {
        u.kind == "dataset" && u.info.get("format").and_then(|f| f.as_str()) == Some("coco")
    });
    u.ok_or_else(|| {
        Error::stage(
            &ctx.job.id,
            "coco_detection needs a `dataset` stage with `format: coco` in `needs`",
        )
    })
}

fn stack(images: &[&Chw], dev: &Device) -> Result<Tensor> {
    let c = images[0];
    let mut data = Vec::with_capacity(images.len() * c.data.len());
    for im in images {
        data.extend_from_slice(&im.data);
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), c.channels, c.height, c.width),
        dev,
    )?)
}

/// Run the stage: build the detector, train ([`crate::train::run_loop`]), evaluate, write.
/// The detector's results and weights, COCOeval's report and the run's config.
fn write_artifacts(
    out_dir: &std::path::Path,
    r: &DetRecipe,
    report: &ce::CocoReport,
    json_results: &[serde_json::Value],
    config: &serde_json::Value,
) -> Result<()> {
    crate::util::atomic::write_json(&out_dir.join("results.json"), &json_results)?;
    crate::util::atomic::write_json(&out_dir.join("eval.json"), &report.to_json())?;
    fs_err::write(out_dir.join("eval.txt"), report.to_text())?;
    candle_core::safetensors::save(&r.weights(), out_dir.join("detector.safetensors"))?;
    Ok(crate::util::atomic::write_json(
        &out_dir.join("config.json"),
        config,
    )?)
}

/// COCOeval's twelve statistics of boxes and masks, in percent (`ap_box`, `ap50_mask`, ...).
fn coco_metrics(report: &ce::CocoReport) -> std::collections::BTreeMap<String, f64> {
    let mut m = std::collections::BTreeMap::new();
    for (r, suffix) in [(&report.bbox, "box"), (&report.segm, "mask")] {
        let r = r.as_ref().expect("evaluated");
        for (name, v) in STAT_NAMES.iter().zip(r.stats) {
            if v >= 0.0 {
                m.insert(format!("{name}_{suffix}"), 100.0 * v);
            }
        }
    }
    m
}

pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let id = ctx.job.id.clone();
    let serr = |e: &dyn std::fmt::Display| Error::stage(&id, e.to_string());
    p.validate().map_err(|m| serr(&m))?;
    let dev = backbone::device(ctx)?;
    let mut ranks = crate::train::parallel::ranks::Ranks::connect(ctx, &dev)?;
    ranks.check_divides("batch_size", p.batch_size)?;
    let root = dataset::root_of(coco_upstream(ctx)?);
    let train = CocoDataset::open(&root, "train").map_err(|e| serr(&e))?;
    let val = CocoDataset::open(&root, "val").map_err(|e| serr(&e))?;
    if train.categories != val.categories {
        return Err(serr(
            &"the train and val splits have different `categories`",
        ));
    }
    let bb = backbone::load(ctx, &p.checkpoint, ctx.job.config.get("model"), &dev)?;
    let mut r = DetRecipe::new(ctx, &p, &bb, &train, ranks.world(), &dev)?;
    ctx.log(format!(
        "coco_detection: backbone {} ({:?}), {} classes, {} train / {} val images, input {}px, strides {:?}",
        bb.source,
        p.backbone,
        train.categories.len(),
        train.file.images.len(),
        val.file.images.len(),
        p.img_size,
        r.det.strides()
    ));
    let names = vec!["loss", "loss_cls", "loss_box", "loss_ctr", "loss_mask"];
    let cfg = LoopConfig {
        log_every: p.log_every,
        nan_hint: Some("lower `lr` or set `clip_grad_norm`".into()),
        ..LoopConfig::new(p.steps, names)
    };
    let done = run_loop::run(ctx, &mut ranks, &cfg, &mut r)?;
    if !ranks.is_leader() {
        // rank 0 holds the same weights, evaluates and writes the artifacts and the metrics
        return Ok(StageOutput::default());
    }
    let det = &r.det;
    ctx.log(format!(
        "evaluating on {} val images",
        val.file.images.len()
    ));
    let (report, json_results) = evaluate(ctx, det, &bb, &val, &root, &p, &dev)?;
    ctx.log(report.to_text());
    let config = json!({
        "params": p,
        "vit": bb.cfg,
        "backbone_source": bb.source,
        "num_classes": train.categories.len(),
        "category_ids": train.categories.ids(),
        "strides": det.strides(),
    });
    write_artifacts(&ctx.job.out_dir, &r, &report, &json_results, &config)?;
    let mut o = StageOutput::default();
    o.metrics = coco_metrics(&report);
    o.metrics.insert("steps".into(), done.state.step as f64);
    let loss = done.curve("loss");
    if let Some(&(_, l)) = loss.last() {
        o.metrics.insert("final_loss".into(), l);
    }
    o.series.insert("loss".into(), loss);
    o.series.insert("loss_cls".into(), done.curve("loss_cls"));
    o.series.insert("loss_mask".into(), done.curve("loss_mask"));
    o.info = json!({
        "backbone": bb.source,
        "protocol": match p.backbone { BackboneMode::Finetune => "fine-tune", BackboneMode::Frozen => "frozen" },
        "img_size": p.img_size,
        "steps": p.steps,
        "batch_size": p.batch_size,
        "ranks": ranks.world(),
        "detections": json_results.len(),
        "resumed_from": done.resumed_from,
        "host_reads_in_steps": done.reads_in_steps,
    });
    Ok(o)
}

/// Detect every val image and score the detections with the exact COCOeval.
fn evaluate(
    ctx: &mut StageContext,
    det: &Detector,
    bb: &Backbone,
    val: &CocoDataset,
    root: &std::path::Path,
    p: &Params,
    dev: &Device,
) -> Result<(ce::CocoReport, Vec<Value>)> {
    let (entries, json_results) = detect_all(ctx, det, bb, val, p, dev)?;
    let id = ctx.job.id.clone();
    let serr = |e: &dyn std::fmt::Display| Error::stage(&id, e.to_string());
    let gt_path = CocoDataset::annotation_path(root, "val");
    let gt = ce::CocoDataset::from_file(&gt_path).map_err(|e| serr(&e))?;
    let dt = ce::CocoResults::from_entries(entries, "results.json", &gt, ce::DetArea::LoadRes)
        .map_err(|e| serr(&e))?;
    let bbox = ce::evaluate(&gt, &dt, ce::IouType::Bbox).map_err(|e| serr(&e))?;
    let segm = ce::evaluate(&gt, &dt, ce::IouType::Segm).map_err(|e| serr(&e))?;
    let categories = gt.categories_by_id();
    let report = ce::CocoReport {
        bbox: Some(bbox),
        segm: Some(segm),
        categories,
    };
    Ok((report, json_results))
}

/// Names of the 12 COCOeval stats, in `stats` order.
pub const STAT_NAMES: [&str; 12] = [
    "ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar100", "ars", "arm", "arl",
];

fn model_err(e: crate::model::ModelError) -> Error {
    Error::Data(format!("detector: {e}"))
}

/// Detections of every val image: the in-memory results (for COCOeval) and their JSON form.
fn detect_all(
    ctx: &mut StageContext,
    det: &Detector,
    bb: &Backbone,
    val: &CocoDataset,
    p: &Params,
    dev: &Device,
) -> Result<(Vec<ce::ResultEntry>, Vec<Value>)> {
    let id = ctx.job.id.clone();
    let m = p.head.mask_size();
    let mut entries = Vec::new();
    let mut json_out = Vec::new();
    let n = val.file.images.len();
    for (ci, chunk) in val.file.images.chunks(p.eval_batch_size).enumerate() {
        if ctx.is_interrupted() {
            return Err(Error::Interrupted);
        }
        let ims = chunk
            .par_iter()
            .map(|im| eval_image(val, im, p.img_size))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::stage(&id, e.to_string()))?;
        let images = stack(&ims.iter().map(|e| &e.image).collect::<Vec<_>>(), dev)?;
        let valid: Vec<(f32, f32)> = ims
            .iter()
            .map(|e| (e.valid.0 as f32, e.valid.1 as f32))
            .collect();
        let found = infer::detect(det, &bb.encoder, &images, &valid).map_err(model_err)?;
        let flat: Vec<(usize, &Detection, &Vec<f32>)> = found
            .iter()
            .enumerate()
            .flat_map(|(b, f)| f.dets.iter().zip(&f.masks).map(move |(d, mk)| (b, d, mk)))
            .collect();
        let rows: Vec<(ce::ResultEntry, Value)> = flat
            .par_iter()
            .map(|&(b, d, probs)| {
                let e = &ims[b];
                let (w0, h0) = e.orig;
                let (sx, sy) = e.scale;
                let bx = [
                    d.bbox[0] / sx,
                    d.bbox[1] / sy,
                    d.bbox[2] / sx,
                    d.bbox[3] / sy,
                ];
                let bo = box_coding::clip(&bx, w0 as f32, h0 as f32);
                let rle = paste(probs, m, &bo, (h0, w0), 0.5).to_rle();
                let counts = rle.to_compressed();
                let cat = val
                    .categories
                    .to_category_id(d.class)
                    .expect("class in range");
                let xywh = box_coding::xyxy_to_xywh(&bo);
                let score = d.score as f64;
                let entry = ce::ResultEntry {
                    image_id: e.image_id as i64,
                    category_id: cat as i64,
                    score,
                    bbox: Some(xywh),
                    segmentation: Some(ce::Segmentation::Rle(rle)),
                };
                let js = json!({
                    "image_id": e.image_id,
                    "category_id": cat,
                    "bbox": xywh,
                    "score": score,
                    "segmentation": {"size": [h0, w0], "counts": counts},
                });
                (entry, js)
            })
            .collect();
        for (e, j) in rows {
            entries.push(e);
            json_out.push(j);
        }
        let done = ((ci + 1) * p.eval_batch_size).min(n) as u64;
        ctx.progress.set(done, n as u64, "evaluating");
    }
    Ok((entries, json_out))
}

/// The `coco_detection` kind.
pub struct CocoDetection;

impl crate::kind::Kind for CocoDetection {
    kind_basics!(resolve, run);

    /// Our detector is an FCOS-style box head with a RoIAlign mask head, not Mask R-CNN: its
    /// protocol is `coco-fcos` (`coco-fcos-frozen` with `backbone: frozen`), never sharing a
    /// cell with the published `coco-maskrcnn` numbers.
    fn report_facts(&self, params: &Value) -> crate::kind::report_facts::ReportFacts {
        let frozen = params.get("backbone").and_then(Value::as_str) == Some("frozen");
        crate::kind::report_facts::ReportFacts {
            protocol: Some(
                if frozen {
                    "coco-fcos-frozen"
                } else {
                    "coco-fcos"
                }
                .into(),
            ),
            ..crate::kind::report_facts::ReportFacts::common(params)
        }
    }

    fn check_plan(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
        super::backbone::check_plan(stage)?;
        crate::train::parallel::ranks::check_plan(stage, |p: &Params, world, rf| {
            crate::train::parallel::ranks::batch_divides("batch_size", p.batch_size, world, rf)
        })?;
        super::dataset::check_plan_upstream(stage, Some("coco"), false)
    }

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| {
            Cost::of(
                Pass::Train,
                Some(p.img_size),
                Schedule::iters(p.steps, p.batch_size),
            )
        })
    }
}

#[cfg(test)]
mod tests;

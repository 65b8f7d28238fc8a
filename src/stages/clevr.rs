//! `clevr_count` and `clevr_dist` stages: linear probes on frozen features with the VISSL
//! recipe I-JEPA used (EVALS.md §5; VISSL `clevr_{count,dist}/eval_resnet_8gpu_transfer_*` +
//! `models/vit_h16_no_cls.yaml`).
//!
//! * Labels (`data::clevr`, VTAB): Count = #objects - 3 (8 classes), Dist = bucketed depth of the
//!   closest object (6 classes). Train on all of CLEVR train, test on CLEVR val (VISSL splits).
//! * Transform: `Resize((img, img))` (bilinear, aspect not kept) -> Normalize; VISSL adds a
//!   random horizontal flip at train time, which `augment: true` reproduces (features are then
//!   recomputed every epoch); by default the cached eval-transform features are used.
//! * Heads: {`last4`, `last`} x {BN + linear, linear} (4 heads, trained together).
//! * SGD, Nesterov momentum 0.9, weight decay 5e-4 (not on BN), lr 0.01 per 256 images with
//!   cosine to 1e-4 per epoch; 50 epochs (Count) / 100 epochs (Dist).
//!
//! Both tasks read the same images with the same transform, so they share one feature-cache
//! entry. Metric: `top1` of the best head (and `head/<name>/top1`). `at_epoch: k` probes the
//! upstream pretrain stage's snapshot of epoch k (see [`super::backbone`]) instead of its final
//! weights.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::features::{self, FeatureRequest, FeatureSet, FrozenEncoder};
use super::linear_probe::{self, Augment, HeadKind, LrSchedule, OptimKind, ProbeData, Sweep};
use super::{params_of, StageContext, StageOutput};
use crate::data::clevr::{Clevr, ClevrTask};
use crate::data::loader::ImageSamples;
use crate::data::Transform;
use crate::error::{Error, Result};
use crate::kind::checkpoint::Cadence;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// Params of `clevr_count` / `clevr_dist` (defaults: the VISSL recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// The frozen encoder (`checkpoint`, `at_epoch`, `img_size`, `extract_batch`).
    #[serde(flatten)]
    pub encoder: FrozenEncoder,
    /// Epochs (default: 50 for Count, 100 for Dist).
    pub epochs: Option<u32>,
    /// Batch size (VISSL: 32 x 8 GPUs).
    pub batch_size: usize,
    /// Learning rate per 256 images at epoch 0.
    pub base_lr: f64,
    /// Cosine end learning rate per 256 images.
    pub end_lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// Weight decay (linear weights and biases).
    pub weight_decay: f64,
    /// Feature sets.
    pub feature_sets: Vec<FeatureSet>,
    /// Head kinds.
    pub heads: Vec<HeadKind>,
    /// Recompute train features every epoch with VISSL's random horizontal flip.
    pub augment: bool,
    /// How often it checkpoints (`checkpoint_every`, `checkpoint_secs`).
    #[serde(flatten)]
    pub cadence: Cadence,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            encoder: FrozenEncoder::default(),
            epochs: Default::default(),
            batch_size: 256,
            base_lr: 0.01,
            end_lr: 1e-4,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            feature_sets: vec![FeatureSet::Last4, FeatureSet::Last],
            heads: vec![HeadKind::BnLinear, HeadKind::Linear],
            augment: Default::default(),
            cadence: Cadence::default(),
        }
    }
}

impl Params {
    fn sweep(&self, task: ClevrTask) -> Sweep {
        Sweep {
            feature_sets: self.feature_sets.clone(),
            heads: self.heads.clone(),
            lr_mults: vec![1.0],
            weight_decays: vec![self.weight_decay],
            optimizer: OptimKind::Sgd,
            momentum: self.momentum,
            nesterov: self.nesterov,
            eta: 0.0,
            base_lr: self.base_lr,
            schedule: LrSchedule::Cosine,
            milestones: Vec::new(),
            gamma: 1.0,
            end_lr: self.end_lr,
            epochs: self.epochs.unwrap_or(default_epochs(task)),
            batch_size: self.batch_size,
        }
    }
}

/// VISSL epochs: 50 (Count), 100 (Dist).
pub fn default_epochs(task: ClevrTask) -> u32 {
    match task {
        ClevrTask::Count => 50,
        ClevrTask::Dist => 100,
    }
}

/// Validate params.
pub fn resolve(params: &serde_json::Map<String, Value>) -> std::result::Result<Value, String> {
    let v = super::resolve_flattened::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.encoder.check()?;
    p.sweep(ClevrTask::Count).validate()?;
    Ok(v)
}

/// Run the probe of `task`.
pub fn run(ctx: &mut StageContext, task: ClevrTask) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let dev = super::backbone::device(ctx)?;
    let bb = p.encoder.load(ctx, &dev)?;
    let u = features::dataset_upstream(ctx)?.clone();
    let root = features::dataset_root(ctx, &u, "clevr")?;
    let open = |s: &str| -> Result<Vec<(std::path::PathBuf, usize)>> {
        Clevr::open(&root, s)
            .and_then(|c| c.samples(task))
            .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))
    };
    let (train, val) = (open("train")?, open("val")?);
    let img = p.encoder.img(&bb);
    let tp: Vec<_> = train.iter().map(|s| s.0.clone()).collect();
    let vp: Vec<_> = val.iter().map(|s| s.0.clone()).collect();
    let req = FeatureRequest {
        dataset: &u,
        root: &root,
        train: &tp,
        val: &vp,
        transform: Transform::clevr(img, false),
        batch: p.encoder.extract_batch,
    };
    let feats = features::extract_or_load(ctx, &bb, &req, &dev)?;
    feats.link_into(&ctx.job.out_dir)?;
    let ty: Vec<usize> = train.iter().map(|s| s.1).collect();
    let vy: Vec<usize> = val.iter().map(|s| s.1).collect();
    let augment = p.augment.then(|| Augment {
        encoder: &bb.encoder,
        source: ImageSamples {
            samples: train.clone(),
            transform: Transform::clevr(img, true),
        },
        layers: feats.layers.clone(),
    });
    let data = ProbeData {
        train: &feats.train,
        train_labels: &ty,
        val: &feats.val,
        val_labels: &vy,
        classes: task.num_classes(),
        augment,
    };
    let r = linear_probe::train_sweep(ctx, &p.sweep(task), &data, &dev)?;
    let mut out = linear_probe::sweep_output(&r, &feats, &bb.source);
    out.info["task"] = json!(task);
    let best = &r.heads[r.best];
    ctx.log(format!(
        "CLEVR {task:?}: best head {} top1 {:.2}",
        best.spec.name, best.top1
    ));
    Ok(out)
}

/// The `clevr_count` / `clevr_dist` kinds: one probe recipe, two label sets.
pub struct ClevrProbe(ClevrTask);

/// `clevr_count`.
pub static CLEVR_COUNT: ClevrProbe = ClevrProbe(ClevrTask::Count);
/// `clevr_dist`.
pub static CLEVR_DIST: ClevrProbe = ClevrProbe(ClevrTask::Dist);

impl crate::kind::Kind for ClevrProbe {
    kind_basics!(resolve);

    encoder_hooks!(Some("clevr"));

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| Cost {
            pass: Pass::Forward,
            img_size: p.encoder.img_size.map(|i| i as usize),
            schedule: p.epochs.map(|e| Schedule::Epochs(e as f64)),
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<StageOutput> {
        run(ctx, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_defaults() {
        let p = Params::default();
        let c = p.sweep(ClevrTask::Count);
        let d = p.sweep(ClevrTask::Dist);
        assert_eq!((c.epochs, d.epochs), (50, 100));
        assert_eq!(c.head_specs().len(), 4);
        assert!((c.lr_at_epoch(0) - 0.01).abs() < 1e-12);
        assert!((c.lr_at_epoch(50) - 1e-4).abs() < 1e-12);
        assert!(c.nesterov && c.optimizer == OptimKind::Sgd);
    }
}

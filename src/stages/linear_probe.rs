//! `linear_probe` stage: the I-JEPA / VISSL linear-probe sweep on frozen features (EVALS.md §1.3,
//! VISSL `linear_image_classification/imagenet1k/models/vit_h16_no_cls.yaml`).
//!
//! Heads: {`last`, `last4`} features x {`bn_linear` = BatchNorm1d (affine, eps 1e-5, momentum
//! 0.1) -> Linear, `linear` = Linear} x lr multipliers {1, 0.1} x weight decays {5e-4, 0} = 16
//! heads, all trained at once on the cached features (`features.rs`). Heads of one (feature set,
//! head kind) form a bank whose weights are one `(D_in, H C)` matrix, so a training step is one
//! GEMM per bank (a BN head's affine is folded into its weights); 16 heads cost a few times one.
//! Each head's loss is its own cross-entropy; their sum is differentiated once per bank.
//!
//! Optimiser (`optimizer: lars`, the VISSL ImageNet recipe): LARS of Barlow Twins / VISSL
//! (`vissl/optimizers/lars.py`): `d = g + wd p`; for a head's weight matrix (not its bias or BN
//! parameters, `exclude_bias_and_norm`) `d *= eta ||p|| / ||d||` (eta 0.001, norms per head);
//! momentum 0.9 `mu = m mu + d`; `p -= lr mu`. `optimizer: sgd` is PyTorch SGD with momentum
//! (optionally Nesterov), the VISSL CLEVR recipe. Weight decay applies to the linear weight and
//! bias, never to BN parameters (VISSL `regularize_bn: false`). Learning rate: `base_lr` per 256
//! images, scaled by `batch_size / 256` (VISSL auto-scaling), updated per epoch: `multistep`
//! multiplies by `gamma` at each milestone (fractions of `epochs`: 0.3, 0.6, 0.9 = epochs 15, 30,
//! 45 of 50) or `cosine` from `base_lr` to `end_lr` (both scaled). Head init: weight N(0, 0.01),
//! bias 0 (VISSL MLP init).
//!
//! Reported: `top1` / `top5` of the best head on val (the sweep is reported the way VISSL's
//! is: the best of all heads; `info.best_head` names it), `head/<name>/top1` for every head,
//! `extract_images_per_sec`, `features_cached`, `train_secs` (head training + evaluation). The train loss of every head is summed per epoch
//! into the `loss` series (mean over heads). `augment: true` recomputes the train features every
//! epoch from augmented images (RandomResizedCrop + flip, the VISSL train transform) instead of
//! reading the cache: slower by the cost of an encoder forward per image per epoch.
//!
//! Checkpoints (heads, momentum buffers, BN running stats, step) are taken at batch boundaries,
//! so a resumed run is bit-identical on CPU.
//!
//! `at_epoch: k` probes the upstream pretrain stage's snapshot of epoch k (one of its
//! `snapshot_epochs`, see [`super::backbone`]) instead of its final weights: the points of a
//! convergence curve from one pretraining run.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::features::{FeatureSet, FrozenEncoder};
pub use super::probe_sweep::{
    sweep_output, train_sweep, Augment, HeadKind, LrSchedule, OptimKind, ProbeData, Sweep,
};
use super::{params_of, StageContext, StageOutput};
use crate::data::imagefolder::ImageFolder;
use crate::data::loader::ImageSamples;
use crate::data::Transform;
use crate::error::Result;
use crate::kind::checkpoint::Cadence;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// Params of a `linear_probe` stage (defaults: the VISSL ImageNet recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// The frozen encoder (`checkpoint`, `at_epoch`, `img_size`, `extract_batch`).
    #[serde(flatten)]
    pub encoder: FrozenEncoder,
    /// Training epochs (VISSL: 50).
    pub epochs: u32,
    /// Batch size (the lr scales with it).
    pub batch_size: usize,
    /// `lars` (VISSL ImageNet) or `sgd`.
    pub optimizer: OptimKind,
    /// Learning rate per 256 images.
    pub base_lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum (sgd only).
    pub nesterov: bool,
    /// LARS trust coefficient.
    pub eta: f64,
    /// `multistep` or `cosine`.
    pub schedule: LrSchedule,
    /// Multistep milestones, fractions of `epochs`.
    pub milestones: Vec<f64>,
    /// Multistep factor.
    pub gamma: f64,
    /// Cosine end learning rate per 256 images.
    pub end_lr: f64,
    /// Feature sets of the sweep.
    pub feature_sets: Vec<FeatureSet>,
    /// Head kinds of the sweep.
    pub heads: Vec<HeadKind>,
    /// Learning-rate multipliers of the sweep.
    pub lr_mults: Vec<f64>,
    /// Weight decays of the sweep.
    pub weight_decays: Vec<f64>,
    /// Recompute train features from augmented images every epoch.
    pub augment: bool,
    /// How often it checkpoints (`checkpoint_every`, `checkpoint_secs`).
    #[serde(flatten)]
    pub cadence: Cadence,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            encoder: FrozenEncoder::default(),
            epochs: 50,
            batch_size: 256,
            optimizer: OptimKind::Lars,
            base_lr: 0.1,
            momentum: 0.9,
            nesterov: Default::default(),
            eta: 0.001,
            schedule: LrSchedule::Multistep,
            milestones: vec![0.3, 0.6, 0.9],
            gamma: 0.1,
            end_lr: Default::default(),
            feature_sets: vec![FeatureSet::Last4, FeatureSet::Last],
            heads: vec![HeadKind::BnLinear, HeadKind::Linear],
            lr_mults: vec![1.0, 0.1],
            weight_decays: vec![5e-4, 0.0],
            augment: Default::default(),
            cadence: Cadence::default(),
        }
    }
}

impl Params {
    pub(crate) fn sweep(&self) -> Sweep {
        Sweep {
            feature_sets: self.feature_sets.clone(),
            heads: self.heads.clone(),
            lr_mults: self.lr_mults.clone(),
            weight_decays: self.weight_decays.clone(),
            optimizer: self.optimizer,
            momentum: self.momentum,
            nesterov: self.nesterov,
            eta: self.eta,
            base_lr: self.base_lr,
            schedule: self.schedule,
            milestones: self.milestones.clone(),
            gamma: self.gamma,
            end_lr: self.end_lr,
            epochs: self.epochs,
            batch_size: self.batch_size,
        }
    }
}

/// Validate params.
pub fn resolve(params: &serde_json::Map<String, Value>) -> std::result::Result<Value, String> {
    let v = super::resolve_flattened::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.encoder.check()?;
    p.sweep().validate()?;
    Ok(v)
}

/// Run the sweep.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let dev = super::backbone::device(ctx)?;
    let bb = p.encoder.load(ctx, &dev)?;
    let img = p.encoder.img(&bb);
    let (train, val, feats) = p.encoder.imagefolder_features(ctx, &bb, &dev)?;
    let labels = |f: &ImageFolder| f.samples.iter().map(|s| s.1).collect::<Vec<_>>();
    let (ty, vy) = (labels(&train), labels(&val));
    let augment = p.augment.then(|| Augment {
        encoder: &bb.encoder,
        source: ImageSamples {
            samples: train.samples.clone(),
            transform: Transform::imagenet_train(img),
        },
        layers: feats.layers.clone(),
    });
    let data = ProbeData {
        train: &feats.train,
        train_labels: &ty,
        val: &feats.val,
        val_labels: &vy,
        classes: train.num_classes(),
        augment,
    };
    let r = train_sweep(ctx, &p.sweep(), &data, &dev)?;
    let best = &r.heads[r.best];
    ctx.log(format!(
        "best head {}: top1 {:.2} top5 {:.2}",
        best.spec.name, best.top1, best.top5
    ));
    Ok(sweep_output(&r, &feats, &bb.source))
}

/// The `linear_probe` kind.
pub struct LinearProbe;

impl crate::kind::Kind for LinearProbe {
    kind_basics!(resolve, run);

    encoder_hooks!(Some("imagefolder"));

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| {
            let img = p.encoder.img_size.map(|i| i as usize);
            Cost::of(Pass::Forward, img, Schedule::Epochs(p.epochs as f64))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_the_vissl_sweep() {
        let p = Params::default();
        let sw = p.sweep();
        let specs = sw.head_specs();
        assert_eq!(specs.len(), 16);
        assert_eq!(specs[0].name, "last4_bn_lr1_wd0.0005");
        assert_eq!(specs[15].name, "last_linear_lr0.1_wd0");
        // lr 0.1 per 256, multistep at 15 / 30 / 45 of 50 epochs
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(sw.lr_at_epoch(0), 0.1));
        assert!(close(sw.lr_at_epoch(14), 0.1));
        assert!(close(sw.lr_at_epoch(15), 0.01));
        assert!(close(sw.lr_at_epoch(45), 1e-4));
        let big = Sweep {
            batch_size: 16384,
            ..sw.clone()
        };
        assert!(close(big.lr_at_epoch(0), 6.4));
        let cos = Sweep {
            schedule: LrSchedule::Cosine,
            base_lr: 0.01,
            end_lr: 1e-4,
            ..sw
        };
        assert!(close(cos.lr_at_epoch(0), 0.01));
        assert!(close(cos.lr_at_epoch(25), 0.5 * (0.01 + 1e-4)));
    }

    #[test]
    fn bad_params_are_named() {
        let mut m = serde_json::Map::new();
        m.insert("lr_mults".into(), json!([]));
        assert!(resolve(&m).unwrap_err().contains("lr_mults"));
        let mut m = serde_json::Map::new();
        m.insert("epoch".into(), json!(3));
        assert!(resolve(&m).is_err());
    }
}

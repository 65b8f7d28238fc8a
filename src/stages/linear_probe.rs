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

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::features::{self, FeatureRequest, FeatureSet, Features};
use super::{params_of, StageContext, StageOutput};
use crate::data::imagefolder::ImageFolder;
use crate::data::loader::{epoch_permutation, load_batch, ImageSamples};
use crate::data::Transform;
use crate::error::{Error, Result};
use crate::model::VisionTransformer;
use crate::train::cross_entropy::cross_entropy;
use crate::train::parallel::ranks::Ranks;
use crate::train::run_loop::{self, LoopConfig, Recipe, Step};

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// Head architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// VISSL `eval_mlp`: BatchNorm1d (affine, eps 1e-5, momentum 0.1) then Linear.
    BnLinear,
    /// VISSL `mlp`: Linear only.
    Linear,
}

impl HeadKind {
    /// Name used in head names.
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::BnLinear => "bn",
            HeadKind::Linear => "linear",
        }
    }
}

/// Optimiser of the heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// LARS (VISSL / Barlow Twins), trust ratio on weight matrices only.
    Lars,
    /// SGD with momentum (PyTorch semantics).
    Sgd,
}

/// Learning-rate schedule, updated once per epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Multiply by `gamma` at each milestone.
    Multistep,
    /// Half cosine from `base_lr` to `end_lr` over `epochs`.
    Cosine,
}

/// A sweep of linear heads and how to train them.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// Feature sets.
    pub feature_sets: Vec<FeatureSet>,
    /// Head kinds.
    pub heads: Vec<HeadKind>,
    /// Learning-rate multipliers.
    pub lr_mults: Vec<f64>,
    /// Weight decays.
    pub weight_decays: Vec<f64>,
    /// Optimiser.
    pub optimizer: OptimKind,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum (SGD only).
    pub nesterov: bool,
    /// LARS trust coefficient.
    pub eta: f64,
    /// Learning rate per 256 images.
    pub base_lr: f64,
    /// Schedule.
    pub schedule: LrSchedule,
    /// Multistep milestones as fractions of `epochs`.
    pub milestones: Vec<f64>,
    /// Multistep factor.
    pub gamma: f64,
    /// Cosine end value per 256 images.
    pub end_lr: f64,
    /// Epochs.
    pub epochs: u32,
    /// Batch size.
    pub batch_size: usize,
}

/// One head of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadSpec {
    /// `<set>_<kind>_lr<mult>_wd<wd>`.
    pub name: String,
    /// Feature set.
    pub set: FeatureSet,
    /// Architecture.
    pub kind: HeadKind,
    /// Learning-rate multiplier.
    pub lr_mult: f64,
    /// Weight decay.
    pub wd: f64,
}

impl Sweep {
    /// Check ranges; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let empty = |n: &str| Err(format!("`{n}` must not be empty"));
        if self.feature_sets.is_empty() {
            return empty("feature_sets");
        }
        if self.heads.is_empty() {
            return empty("heads");
        }
        if self.lr_mults.is_empty() {
            return empty("lr_mults");
        }
        if self.weight_decays.is_empty() {
            return empty("weight_decays");
        }
        if self.epochs == 0 {
            return Err("`epochs` must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("`batch_size` must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err("`momentum` must lie in [0, 1)".into());
        }
        if self.base_lr <= 0.0 || self.base_lr.is_nan() {
            return Err("`base_lr` must be > 0".into());
        }
        if self.milestones.iter().any(|m| !(0.0..=1.0).contains(m)) {
            return Err(
                "`milestones` are fractions of `epochs` in [0, 1] (0.3 = epoch 15 of 50)".into(),
            );
        }
        Ok(())
    }

    /// Learning rate of epoch `e` (0-based), scaled by `batch_size / 256`.
    pub fn lr_at_epoch(&self, e: u32) -> f64 {
        let scale = self.batch_size as f64 / 256.0;
        let v = match self.schedule {
            LrSchedule::Multistep => {
                let passed = self
                    .milestones
                    .iter()
                    .filter(|m| e as f64 >= (*m * self.epochs as f64).round())
                    .count();
                self.base_lr * self.gamma.powi(passed as i32)
            }
            LrSchedule::Cosine => {
                let w = e as f64 / self.epochs as f64;
                self.end_lr
                    + 0.5 * (self.base_lr - self.end_lr) * (1.0 + (std::f64::consts::PI * w).cos())
            }
        };
        v * scale
    }

    /// Every head, bank by bank: feature set, then kind, then lr multiplier, then weight decay.
    pub fn head_specs(&self) -> Vec<HeadSpec> {
        let mut out = Vec::new();
        for &set in &self.feature_sets {
            for &kind in &self.heads {
                for &lr_mult in &self.lr_mults {
                    for &wd in &self.weight_decays {
                        out.push(HeadSpec {
                            name: format!("{}_{}_lr{lr_mult}_wd{wd}", set.name(), kind.name()),
                            set,
                            kind,
                            lr_mult,
                            wd,
                        });
                    }
                }
            }
        }
        out
    }
}

/// BN constants (VISSL `eval_mlp` = torch BatchNorm1d defaults).
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// Init std of the linear weights.
const INIT_STD: f64 = 0.01;

/// Heads of one (feature set, kind), laid out so that a forward pass is one GEMM for all of
/// them: weights `(D_in, H, C)` viewed as `(D_in, H C)`, bias `(H, C)`, BN affine `(D_in, H)`
/// and one pair of running statistics (every BN head sees the same input). A BN head's affine
/// is folded into its weights: `(x_n g + b) W = x_n (g * W) + b W`.
struct Bank {
    set: FeatureSet,
    kind: HeadKind,
    heads: Vec<usize>,
    w: Var,
    b: Var,
    gamma: Option<Var>,
    beta: Option<Var>,
    /// Momentum buffers by parameter name.
    mom: HashMap<&'static str, Tensor>,
    run_mean: Option<Tensor>,
    run_var: Option<Tensor>,
    /// Per-head learning-rate multipliers `(H,)`.
    lr_mult: Tensor,
    /// Per-head weight decays `(H,)`.
    wd: Tensor,
}

impl Bank {
    #[allow(clippy::too_many_arguments)]
    fn new(
        set: FeatureSet,
        kind: HeadKind,
        heads: Vec<usize>,
        specs: &[HeadSpec],
        din: usize,
        classes: usize,
        rng: &mut rand_chacha::ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let h = heads.len();
        // Drawn head by head, each as PyTorch's (C, D_in) weight, then laid out (D_in, H, C).
        let mut w = vec![0f32; din * h * classes];
        for j in 0..h {
            let hw = crate::model::init::trunc_normal(rng, classes * din, INIT_STD);
            for c in 0..classes {
                for d in 0..din {
                    w[(d * h + j) * classes + c] = hw[c * din + d];
                }
            }
        }
        let w = Var::from_tensor(&Tensor::from_vec(w, (din, h, classes), dev)?)?;
        let b = Var::zeros((h, classes), DType::F32, dev)?;
        let bn = kind == HeadKind::BnLinear;
        let col = |f: &dyn Fn(&HeadSpec) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = heads.iter().map(|&i| f(&specs[i]) as f32).collect();
            Ok(Tensor::from_vec(v, h, dev)?)
        };
        Ok(Bank {
            set,
            kind,
            w,
            b,
            gamma: bn
                .then(|| Var::ones((din, h), DType::F32, dev))
                .transpose()?,
            beta: bn
                .then(|| Var::zeros((din, h), DType::F32, dev))
                .transpose()?,
            mom: HashMap::new(),
            run_mean: bn
                .then(|| Tensor::zeros((1, din), DType::F32, dev))
                .transpose()?,
            run_var: bn
                .then(|| Tensor::ones((1, din), DType::F32, dev))
                .transpose()?,
            lr_mult: col(&|s: &HeadSpec| s.lr_mult)?,
            wd: col(&|s: &HeadSpec| s.wd)?,
            heads,
        })
    }

    fn tag(&self) -> String {
        format!("{}_{}", self.set.name(), self.kind.name())
    }

    /// Logits `(H, B, C)` of `x (B, D_in)`; in training the BN running stats are updated.
    fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (din, h, c) = self.w.dims3()?;
        let n = x.dim(0)?;
        let (inp, w, bias) = match (&self.gamma, &self.beta) {
            (Some(g), Some(bt)) => {
                let (mean, var) = if train {
                    let mean = x.mean_keepdim(0)?;
                    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
                    let unbiased = if n > 1 {
                        (var.detach() * (n as f64 / (n as f64 - 1.0)))?
                    } else {
                        var.detach()
                    };
                    let rm = self.run_mean.take().expect("bn");
                    let rv = self.run_var.take().expect("bn");
                    let rm = ((rm * (1.0 - BN_MOMENTUM))? + (mean.detach() * BN_MOMENTUM)?)?;
                    let rv = ((rv * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
                    self.run_mean = Some(rm);
                    self.run_var = Some(rv);
                    (mean, var)
                } else {
                    (
                        self.run_mean.clone().expect("bn"),
                        self.run_var.clone().expect("bn"),
                    )
                };
                let xn = x
                    .broadcast_sub(&mean)?
                    .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
                let w3 = self.w.as_tensor();
                let w = w3.broadcast_mul(&g.as_tensor().unsqueeze(2)?)?;
                let bias = w3
                    .broadcast_mul(&bt.as_tensor().unsqueeze(2)?)?
                    .sum(0)?
                    .add(self.b.as_tensor())?;
                (xn, w, bias)
            }
            _ => (
                x.clone(),
                self.w.as_tensor().clone(),
                self.b.as_tensor().clone(),
            ),
        };
        let logits = crate::model::precision::matmul(&inp, &w.reshape((din, h * c))?)?
            .reshape((n, h, c))?
            .broadcast_add(&bias)?;
        Ok(logits.transpose(0, 1)?)
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        let mut v = vec![("w", &self.w), ("b", &self.b)];
        if let (Some(g), Some(b)) = (&self.gamma, &self.beta) {
            v.push(("gamma", g));
            v.push(("beta", b));
        }
        v
    }

    /// A per-head `(H,)` vector shaped to broadcast against parameter `name`.
    fn per_head(v: &Tensor, name: &str) -> Result<Tensor> {
        let h = v.dim(0)?;
        Ok(match name {
            "w" => v.reshape((1, h, 1))?,
            "b" => v.reshape((h, 1))?,
            _ => v.reshape((1, h))?,
        })
    }

    /// One optimiser step from `grads` at learning rate `lr`.
    fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        sw: &Sweep,
    ) -> Result<()> {
        let m = sw.momentum;
        let mut new_mom = Vec::new();
        for (name, var) in self.params() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_detached_tensor();
            let mut d = g.detach();
            if name == "w" || name == "b" {
                d = (d + p.broadcast_mul(&Self::per_head(&self.wd, name)?)?)?;
            }
            if sw.optimizer == OptimKind::Lars && name == "w" {
                // Trust ratio per head: norms over each head's (D_in, C) slice.
                let pn = p.sqr()?.sum_keepdim((0, 2))?.sqrt()?;
                let un = d.sqr()?.sum_keepdim((0, 2))?.sqrt()?;
                let ok = (&pn * &un)?.gt(0.0)?;
                let safe = (&un + ok.to_dtype(DType::F32)?.affine(-1.0, 1.0)?)?;
                let q = ok.where_cond(&(pn * sw.eta)?.div(&safe)?, &Tensor::ones_like(&un)?)?;
                d = d.broadcast_mul(&q)?;
            }
            let mu = match self.mom.get(name) {
                Some(b) => ((b * m)? + &d)?,
                None => d.clone(),
            };
            let upd = if sw.nesterov && sw.optimizer == OptimKind::Sgd {
                (&d + (&mu * m)?)?
            } else {
                mu.clone()
            };
            let step = upd.broadcast_mul(&(Self::per_head(&self.lr_mult, name)? * lr)?)?;
            var.set(&(p - step)?)?;
            new_mom.push((name, mu));
        }
        for (n, t) in new_mom {
            self.mom.insert(n, t);
        }
        Ok(())
    }

    fn state(&self, out: &mut HashMap<String, Tensor>) {
        let t = self.tag();
        for (n, v) in self.params() {
            out.insert(format!("{t}.{n}"), v.as_tensor().clone());
        }
        for (n, m) in &self.mom {
            out.insert(format!("{t}.mom.{n}"), m.clone());
        }
        if let (Some(m), Some(v)) = (&self.run_mean, &self.run_var) {
            out.insert(format!("{t}.running_mean"), m.clone());
            out.insert(format!("{t}.running_var"), v.clone());
        }
    }

    fn load(&mut self, st: &HashMap<String, Tensor>, dev: &Device) -> Result<()> {
        let t = self.tag();
        let get = |k: String| -> Result<Tensor> {
            st.get(&k)
                .ok_or_else(|| Error::Data(format!("probe checkpoint lacks `{k}`")))
                .and_then(|x| Ok(x.to_device(dev)?))
        };
        for (n, v) in self.params() {
            v.set(&get(format!("{t}.{n}"))?)?;
        }
        self.mom.clear();
        for n in ["w", "b", "gamma", "beta"] {
            if let Some(m) = st.get(&format!("{t}.mom.{n}")) {
                self.mom.insert(n, m.to_device(dev)?);
            }
        }
        if self.run_mean.is_some() {
            self.run_mean = Some(get(format!("{t}.running_mean"))?);
            self.run_var = Some(get(format!("{t}.running_var"))?);
        }
        Ok(())
    }
}

/// Train-time augmentation: images are re-encoded every epoch.
pub struct Augment<'a> {
    /// The frozen encoder.
    pub encoder: &'a VisionTransformer,
    /// Train images with the train transform.
    pub source: ImageSamples,
    /// Blocks to pool.
    pub layers: Vec<i64>,
}

/// Inputs of a sweep.
pub struct ProbeData<'a> {
    /// Cached train features `(L, N, D)`.
    pub train: &'a Tensor,
    /// Train labels.
    pub train_labels: &'a [usize],
    /// Cached val features `(L, N_val, D)`.
    pub val: &'a Tensor,
    /// Val labels.
    pub val_labels: &'a [usize],
    /// Number of classes.
    pub classes: usize,
    /// Recompute train features from augmented images each epoch.
    pub augment: Option<Augment<'a>>,
}

/// Accuracy of every head.
#[derive(Debug, Clone, Serialize)]
pub struct HeadResult {
    /// The head.
    pub spec: HeadSpec,
    /// Val top-1 in percent.
    pub top1: f64,
    /// Val top-5 in percent.
    pub top5: f64,
}

/// Result of a sweep.
#[derive(Debug, Clone)]
pub struct SweepResult {
    /// Every head, in sweep order.
    pub heads: Vec<HeadResult>,
    /// Index of the best head (highest top-1, first on ties).
    pub best: usize,
    /// Mean train loss over heads per epoch.
    pub loss: Vec<(u64, f64)>,
    /// Step the run resumed from (0 = fresh).
    pub resumed_from: u64,
    /// Wall seconds of head training and evaluation in this run.
    pub secs: f64,
}

const TENSORS_FILE: &str = "heads.safetensors";

/// Train every head of `sw` and evaluate it on val.
pub fn train_sweep(
    ctx: &mut StageContext,
    sw: &Sweep,
    data: &ProbeData,
    dev: &Device,
) -> Result<SweepResult> {
    sw.validate().map_err(|m| Error::stage(&ctx.job.id, m))?;
    let specs = sw.head_specs();
    let n = data.train_labels.len();
    if n == 0 || data.val_labels.is_empty() {
        return Err(Error::stage(&ctx.job.id, "empty train or val split"));
    }
    let bs = sw.batch_size.min(n);
    // The learning rate scales with the batch actually used.
    let sw = &Sweep {
        batch_size: bs,
        ..sw.clone()
    };
    let nb = (n / bs).max(1);
    let total = nb as u64 * sw.epochs as u64;
    // Inputs of every feature set, on the device.
    let mut train_sets: HashMap<FeatureSet, Tensor> = HashMap::new();
    let mut val_sets: HashMap<FeatureSet, Tensor> = HashMap::new();
    for &s in &sw.feature_sets {
        if data.augment.is_none() {
            train_sets.insert(s, s.select(data.train)?.to_device(dev)?);
        }
        val_sets.insert(s, s.select(data.val)?.to_device(dev)?);
    }
    let labels_of = |v: &[usize]| -> Result<Tensor> {
        let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
        let n = v.len();
        Ok(Tensor::from_vec(v, n, dev)?)
    };
    let train_y = labels_of(data.train_labels)?;
    let val_y = labels_of(data.val_labels)?;
    let mut rng = crate::util::rng::stage_rng(&ctx.job.key, ctx.job.seed, "heads");
    let mut banks = Vec::new();
    for &set in &sw.feature_sets {
        let din = val_sets[&set].dim(1)?;
        for &kind in &sw.heads {
            let idx: Vec<usize> = specs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.set == set && s.kind == kind)
                .map(|(i, _)| i)
                .collect();
            banks.push(Bank::new(
                set,
                kind,
                idx,
                &specs,
                din,
                data.classes,
                &mut rng,
                dev,
            )?);
        }
    }
    let t0 = std::time::Instant::now();
    ctx.log(format!(
        "training {} heads in {} banks: {} epochs x {nb} batches of {bs}, {:?}",
        specs.len(),
        banks.len(),
        sw.epochs,
        sw.optimizer
    ));
    let mut recipe = ProbeRecipe {
        sw,
        data,
        banks,
        train_sets,
        train_y,
        heads: specs.len(),
        n,
        nb,
        bs,
        seed: crate::util::rng::derive_seed(&ctx.job.key, ctx.job.seed, "probe-data"),
        order: (u32::MAX, Vec::new()),
        dev: dev.clone(),
    };
    let cfg = LoopConfig {
        total,
        log_every: nb as u64,
        curve_every: nb as u64,
        names: vec!["loss_mean_of_heads"],
        // a head whose lr diverges is one outcome of the sweep: it is scored, not fatal
        nan_hint: None,
        unit: "step",
    };
    let done = run_loop::run(ctx, &mut Ranks::single(dev), &cfg, &mut recipe)?;
    let mut banks = recipe.banks;
    // Evaluate every head on val.
    let mut hits1 = vec![0f64; specs.len()];
    let mut hits5 = vec![0f64; specs.len()];
    let nv = data.val_labels.len();
    for bank in banks.iter_mut() {
        let xv = &val_sets[&bank.set];
        let mut start = 0;
        while start < nv {
            let len = 1024.min(nv - start);
            let x = xv.narrow(0, start, len)?;
            let y = val_y.narrow(0, start, len)?;
            let logits = bank.forward(&x, false)?;
            let (t1, t5) = features::topk_hits(&logits, &y)?;
            let (t1, t5) = (t1.to_vec1::<f32>()?, t5.to_vec1::<f32>()?);
            for (j, &hi) in bank.heads.iter().enumerate() {
                hits1[hi] += t1[j] as f64;
                hits5[hi] += t5[j] as f64;
            }
            start += len;
        }
    }
    let heads: Vec<HeadResult> = specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| HeadResult {
            spec,
            top1: 100.0 * hits1[i] / nv as f64,
            top5: 100.0 * hits5[i] / nv as f64,
        })
        .collect();
    let mut best = 0;
    for (i, h) in heads.iter().enumerate() {
        if h.top1 > heads[best].top1 {
            best = i;
        }
    }
    // The trained heads, for inspection.
    let mut t = HashMap::new();
    for b in &banks {
        b.state(&mut t);
    }
    candle_core::safetensors::save(&t, ctx.job.out_dir.join(TENSORS_FILE))?;
    Ok(SweepResult {
        heads,
        best,
        loss: done
            .curve("loss_mean_of_heads")
            .into_iter()
            .map(|(s, v)| (s / nb as u64, v))
            .collect(),
        resumed_from: done.resumed_from,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// One step of a probe sweep: a batch through every head bank.
struct ProbeRecipe<'a> {
    sw: &'a Sweep,
    data: &'a ProbeData<'a>,
    banks: Vec<Bank>,
    train_sets: HashMap<FeatureSet, Tensor>,
    train_y: Tensor,
    heads: usize,
    n: usize,
    nb: usize,
    bs: usize,
    seed: u64,
    order: (u32, Vec<usize>),
    dev: Device,
}

impl Recipe for ProbeRecipe<'_> {
    fn step(&mut self, _: &mut StageContext, _: &mut Ranks, step: u64) -> Result<Step> {
        let (nb, bs, dev) = (self.nb as u64, self.bs, &self.dev);
        let epoch = (step / nb) as u32;
        let k = (step % nb) as usize;
        let lr = self.sw.lr_at_epoch(epoch);
        if self.order.0 != epoch {
            self.order = (epoch, epoch_permutation(self.n, self.seed, epoch as u64));
        }
        let idx: Vec<u32> = self.order.1[k * bs..(k + 1) * bs]
            .iter()
            .map(|&i| i as u32)
            .collect();
        let idx_t = Tensor::from_vec(idx.clone(), bs, dev)?;
        let y = self.train_y.index_select(&idx_t, 0)?;
        let onehot = features::one_hot(&y, self.data.classes, dev)?;
        let aug_feats = match &self.data.augment {
            Some(a) => {
                let ids: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
                let b = load_batch(&a.source, &ids, self.seed, epoch as u64)
                    .map_err(|e| Error::Data(e.to_string()))?;
                Some(features::encode(a.encoder, &b, &a.layers, dev)?)
            }
            None => None,
        };
        let mut sum: Option<Tensor> = None;
        for bank in self.banks.iter_mut() {
            let x = match &aug_feats {
                Some(f) => bank.set.select(f)?.to_device(dev)?,
                None => self.train_sets[&bank.set].index_select(&idx_t, 0)?,
            };
            let logits = bank.forward(&x, true)?;
            let loss = cross_entropy(&logits, &onehot)?.sum_all()?; // over the bank's heads
            let grads = loss.backward()?;
            bank.step(&grads, lr, self.sw)?;
            let l = loss.detach().to_dtype(DType::F64)?;
            sum = Some(match sum {
                Some(s) => (s + l)?,
                None => l,
            });
        }
        let mean = (sum.expect("a sweep has a bank") / self.heads as f64)?;
        Ok(Step {
            losses: vec![mean],
            host: vec![("lr", lr)],
        })
    }

    fn save(&self, dir: &std::path::Path) -> Result<()> {
        let mut t = HashMap::new();
        for b in &self.banks {
            b.state(&mut t);
        }
        candle_core::safetensors::save(&t, dir.join(TENSORS_FILE))?;
        Ok(())
    }

    fn load(&mut self, dir: &std::path::Path) -> Result<()> {
        let t = candle_core::safetensors::load(dir.join(TENSORS_FILE), &self.dev)?;
        for b in self.banks.iter_mut() {
            b.load(&t, &self.dev)?;
        }
        Ok(())
    }
}

/// Metrics and info of a finished sweep.
pub fn sweep_output(r: &SweepResult, feats: &Features, source: &str) -> StageOutput {
    let mut out = StageOutput::default();
    let best = &r.heads[r.best];
    out.metrics.insert("top1".into(), best.top1);
    out.metrics.insert("top5".into(), best.top5);
    for h in &r.heads {
        out.metrics
            .insert(format!("head/{}/top1", h.spec.name), h.top1);
    }
    feats.add_metrics(&mut out);
    out.metrics.insert("train_secs".into(), r.secs);
    out.series.insert("loss".into(), r.loss.clone());
    out.info = json!({
        "best_head": best.spec.name,
        "protocol": "frozen-linear",
        "backbone": source,
        "heads": r.heads,
        "features": feats.info(),
        "resumed_from": r.resumed_from,
    });
    out
}

// ------------------------------------------------------------------------------------------------
// The stage.

/// Params of a `linear_probe` stage (defaults: the VISSL ImageNet recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
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
    /// Images per forward pass during extraction.
    pub extract_batch: usize,
    /// Checkpoint every N steps (0 = by time only; not hashed).
    pub checkpoint_every: u64,
    /// Checkpoint every N seconds (not hashed).
    pub checkpoint_secs: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            checkpoint: "upstream".into(),
            at_epoch: Default::default(),
            img_size: Default::default(),
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
            extract_batch: 64,
            checkpoint_every: Default::default(),
            checkpoint_secs: 300,
        }
    }
}

impl Params {
    fn sweep(&self) -> Sweep {
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
    let v = super::resolve::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    super::backbone::check_at_epoch(&p.checkpoint, p.at_epoch)?;
    p.sweep().validate()?;
    Ok(v)
}

/// ImageFolder train / val samples of the upstream dataset.
pub fn imagefolder_splits(
    ctx: &StageContext,
) -> Result<(std::path::PathBuf, ImageFolder, ImageFolder)> {
    let u = features::dataset_upstream(ctx)?;
    let root = features::dataset_root(ctx, u, "imagefolder")?;
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

/// Run the sweep.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let dev = super::backbone::device(ctx)?;
    let bb = features::load_backbone_at(ctx, &p.checkpoint, p.at_epoch, &dev)?;
    let (root, train, val) = imagefolder_splits(ctx)?;
    let img = p.img_size.unwrap_or(bb.cfg.img_size as u32);
    let paths = |f: &ImageFolder| f.samples.iter().map(|s| s.0.clone()).collect::<Vec<_>>();
    let (tp, vp) = (paths(&train), paths(&val));
    let u = features::dataset_upstream(ctx)?.clone();
    let req = FeatureRequest {
        dataset: &u,
        root: &root,
        train: &tp,
        val: &vp,
        transform: Transform::imagenet_eval(img),
        batch: p.extract_batch,
    };
    let feats = features::extract_or_load(ctx, &bb, &req, &dev)?;
    feats.link_into(&ctx.job.out_dir)?;
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
    fn renamed_params(&self) -> &'static [crate::kind::Rename] {
        &[crate::kind::hooks::IMG]
    }

    kind_basics!(resolve, run);

    encoder_hooks!(Some("imagefolder"));

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        let Ok(p) = serde_json::from_value::<Params>(params.clone()) else {
            return crate::kind::Cost::NONE;
        };
        crate::kind::Cost {
            pass: crate::kind::Pass::Forward,
            img_size: p.img_size.map(|i| i as usize),
            schedule: Some(crate::kind::Schedule::Epochs(p.epochs as f64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn synthetic(n: usize, seed: u64) -> (Tensor, Vec<usize>) {
        // 3 classes, class c shifts dims 2c, 2c+1 of both layers.
        let mut r = crate::util::rng::stage_rng("data", seed, "x");
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let mut v = crate::model::init::trunc_normal(&mut r, 2 * n * 6, 1.0);
        for l in 0..2 {
            for (i, &y) in labels.iter().enumerate() {
                v[(l * n + i) * 6 + 2 * y] += 2.0;
                v[(l * n + i) * 6 + 2 * y + 1] += 2.0;
            }
        }
        (
            Tensor::from_vec(v, (2, n, 6), &Device::Cpu).unwrap(),
            labels,
        )
    }

    fn tiny_sweep(opt: OptimKind) -> Sweep {
        Sweep {
            epochs: 4,
            batch_size: 16,
            optimizer: opt,
            base_lr: if opt == OptimKind::Sgd { 4.0 } else { 16.0 },
            ..Params::default().sweep()
        }
    }

    /// A sweep interrupted after every single step and resumed each time ends bit-identical to
    /// an uninterrupted one (heads, momentum, BN statistics and the loss series are restored).
    #[test]
    fn resume_after_every_step_is_bit_identical() {
        let (xt, yt) = synthetic(48, 1);
        let (xv, yv) = synthetic(30, 2);
        let data = ProbeData {
            train: &xt,
            train_labels: &yt,
            val: &xv,
            val_labels: &yv,
            classes: 3,
            augment: None,
        };
        for opt in [OptimKind::Lars, OptimKind::Sgd] {
            let sw = tiny_sweep(opt);
            let tmp = tempfile::tempdir().unwrap();
            let mut a = crate::kind::context::test_context(
                &tmp.path().join("a"),
                "k",
                Default::default(),
                tmp.path(),
            );
            let ra = train_sweep(&mut a, &sw, &data, &Device::Cpu).unwrap();
            assert_eq!(ra.resumed_from, 0);
            assert_eq!(ra.loss.len(), 4);
            let best = &ra.heads[ra.best];
            if opt == OptimKind::Sgd {
                assert!(best.top1 > 80.0, "{opt:?}: {:?}", ra.heads);
            }
            assert!(ra.loss[3].1 < ra.loss[0].1, "{opt:?}: {:?}", ra.loss);
            let mut calls = 0;
            let rb = loop {
                calls += 1;
                let mut b = crate::kind::context::test_context(
                    &tmp.path().join("b"),
                    "k",
                    Default::default(),
                    tmp.path(),
                );
                b.interrupted
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                match train_sweep(&mut b, &sw, &data, &Device::Cpu) {
                    Err(Error::Interrupted) => continue,
                    Ok(r) => break r,
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(calls, 12, "3 batches x 4 epochs, one step per call");
            assert!(rb.resumed_from > 0);
            assert_eq!(ra.loss, rb.loss);
            for (x, y) in ra.heads.iter().zip(&rb.heads) {
                assert_eq!((x.top1, x.top5), (y.top1, y.top5));
            }
            let read = |d: &str| {
                fs_err::read(tmp.path().join(d).join("tmp/k/out").join(TENSORS_FILE)).unwrap()
            };
            assert_eq!(read("a"), read("b"));
        }
    }

    /// The batched heads learn a separable problem, at the speed their lr multiplier sets.
    #[test]
    fn heads_train_independently() {
        let dev = Device::Cpu;
        let sw = Sweep {
            epochs: 3,
            batch_size: 8,
            optimizer: OptimKind::Sgd,
            base_lr: 8.0,
            ..Params::default().sweep()
        };
        let specs = sw.head_specs();
        let mut rng = crate::util::rng::stage_rng("k", 0, "t");
        let mut bank = Bank::new(
            FeatureSet::Last,
            HeadKind::BnLinear,
            vec![0, 1, 2, 3],
            &specs,
            3,
            2,
            &mut rng,
            &dev,
        )
        .unwrap();
        let x = Tensor::new(
            &[
                [1f32, 0., 0.5],
                [0.9, 0.1, 0.],
                [0., 1., 0.2],
                [0.1, 0.8, 0.],
            ],
            &dev,
        )
        .unwrap();
        let y = Tensor::new(&[0u32, 0, 1, 1], &dev).unwrap();
        let oh = features::one_hot(&y, 2, &dev).unwrap();
        let before = cross_entropy(&bank.forward(&x, true).unwrap(), &oh).unwrap();
        for _ in 0..20 {
            let l = cross_entropy(&bank.forward(&x, true).unwrap(), &oh).unwrap();
            let g = l.sum_all().unwrap().backward().unwrap();
            bank.step(&g, 0.5, &sw).unwrap();
        }
        let after = cross_entropy(&bank.forward(&x, true).unwrap(), &oh).unwrap();
        let (b, a) = (
            before.to_vec1::<f32>().unwrap(),
            after.to_vec1::<f32>().unwrap(),
        );
        assert!(a[0] < b[0] * 0.5, "{a:?} vs {b:?}");
        // lr multiplier 0.1 heads (2, 3) learn slower than lr 1 heads (0, 1)
        assert!(a[2] > a[0]);
    }
}

//! The linear-probe sweep shared by `linear_probe` and the CLEVR probes: many linear heads
//! ([`crate::model::head_bank`]) trained at once on frozen features through the shared training
//! loop, each scored on val; the sweep is reported the way VISSL's is, by its best head.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::features::{self, FeatureSet, Features};
use super::{StageContext, StageOutput};
use crate::data::loader::{epoch_permutation, load_batch, ImageSamples};
use crate::error::{Error, Result};
use crate::model::head_bank::{HeadBank, HeadOptim};
use crate::model::VisionTransformer;
use crate::train::cross_entropy::cross_entropy;
use crate::train::parallel::ranks::Ranks;
use crate::train::run_loop::{self, LoopConfig, Points, Recipe, Step};

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

    /// The heads' optimiser.
    pub fn optim(&self) -> HeadOptim {
        HeadOptim {
            momentum: self.momentum,
            nesterov: self.nesterov,
            lars_eta: (self.optimizer == OptimKind::Lars).then_some(self.eta),
        }
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
    let banks = head_banks(sw, &specs, &val_sets, data.classes, &mut rng, dev)?;
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
    // a head whose lr diverges is one outcome of the sweep: it is scored, not fatal (no NaN stop)
    let cfg = LoopConfig {
        log_every: nb as u64,
        points: Points::Means(nb as u64),
        ..LoopConfig::new(total, vec!["loss_mean_of_heads"])
    };
    let done = run_loop::run(ctx, &mut Ranks::single(dev), &cfg, &mut recipe)?;
    let mut banks = recipe.banks;
    let heads = score_heads(&mut banks, specs, &val_sets, &val_y)?;
    let mut best = 0;
    for (i, h) in heads.iter().enumerate() {
        if h.top1 > heads[best].top1 {
            best = i;
        }
    }
    // The trained heads, for inspection.
    let mut t = HashMap::new();
    for (_, b) in &banks {
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

/// One bank per (feature set, head kind): the heads of `specs` that read that set with that kind,
/// each with its lr multiplier and weight decay.
fn head_banks(
    sw: &Sweep,
    specs: &[HeadSpec],
    val_sets: &HashMap<FeatureSet, Tensor>,
    classes: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
    dev: &Device,
) -> Result<Vec<(FeatureSet, HeadBank)>> {
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
            let lr_mults: Vec<f64> = idx.iter().map(|&i| specs[i].lr_mult).collect();
            let wds: Vec<f64> = idx.iter().map(|&i| specs[i].wd).collect();
            let tag = format!("{}_{}", set.name(), kind.name());
            let bn = kind == HeadKind::BnLinear;
            let bank = HeadBank::new(tag, bn, idx, &lr_mults, &wds, din, classes, rng, dev)?;
            banks.push((set, bank));
        }
    }
    Ok(banks)
}

/// Every head's top-1 / top-5 on the validation features (in chunks of 1024 rows).
fn score_heads(
    banks: &mut [(FeatureSet, HeadBank)],
    specs: Vec<HeadSpec>,
    val_sets: &HashMap<FeatureSet, Tensor>,
    val_y: &Tensor,
) -> Result<Vec<HeadResult>> {
    let mut hits1 = vec![0f64; specs.len()];
    let mut hits5 = vec![0f64; specs.len()];
    let nv = val_y.dim(0)?;
    for (set, bank) in banks.iter_mut() {
        let xv = &val_sets[set];
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
    Ok(specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| HeadResult {
            spec,
            top1: 100.0 * hits1[i] / nv as f64,
            top5: 100.0 * hits5[i] / nv as f64,
        })
        .collect())
}

/// One step of a probe sweep: a batch through every head bank.
struct ProbeRecipe<'a> {
    sw: &'a Sweep,
    data: &'a ProbeData<'a>,
    banks: Vec<(FeatureSet, HeadBank)>,
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
        let opt = self.sw.optim();
        for (set, bank) in self.banks.iter_mut() {
            let x = match &aug_feats {
                Some(f) => set.select(f)?.to_device(dev)?,
                None => self.train_sets[set].index_select(&idx_t, 0)?,
            };
            let logits = bank.forward(&x, true)?;
            let loss = cross_entropy(&logits, &onehot)?.sum_all()?; // over the bank's heads
            let grads = loss.backward()?;
            bank.step(&grads, lr, &opt)?;
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
        for (_, b) in &self.banks {
            b.state(&mut t);
        }
        candle_core::safetensors::save(&t, dir.join(TENSORS_FILE))?;
        Ok(())
    }

    fn load(&mut self, dir: &std::path::Path, _step: u64) -> Result<()> {
        let t = candle_core::safetensors::load(dir.join(TENSORS_FILE), &self.dev)?;
        for (_, b) in self.banks.iter_mut() {
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

#[cfg(test)]
mod tests;

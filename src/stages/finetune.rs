//! `finetune` stage: end-to-end fine-tuning with the MAE recipe (EVALS.md §1.4; mae
//! `main_finetune.py`, `util/lr_decay.py`, `util/lr_sched.py`), scaled down by its params.
//!
//! * Model: the encoder from `checkpoint:` (trainable), global average pool over the patch tokens
//!   of its normed output, `fc_norm` LayerNorm (eps 1e-6), `head` Linear (weight N(0, 2e-5),
//!   bias 0). Unlike MAE's `global_pool` mode the encoder's own final `norm` stays in the path, so
//!   the fine-tuned `encoder.safetensors` is a complete encoder for the probes downstream.
//! * Stochastic depth: rate `drop_path * i / (depth - 1)` for block `i` (timm linspace), one
//!   per-sample draw for each residual branch.
//! * Optimiser: AdamW (betas 0.9 / 0.999, `train::optim`), no decay on 1-D parameters and biases,
//!   weight decay 0.05; layer-wise lr decay (BEiT): layer id 0 = `patch_embed`, block `i` ->
//!   `i + 1`, everything else (`norm`, `fc_norm`, `head`) -> `depth + 1`; lr scale
//!   `layer_decay^(depth + 1 - id)`. One AdamW per layer id carries its scale.
//! * Schedule: lr = `blr * batch_size / 256`, linear warmup from 0 over `warmup_epochs`, then
//!   half-cosine to `min_lr`, set per iteration from the fractional epoch. `batch_size` is the
//!   effective batch; `accum_iter` splits it into micro-batches whose gradients are summed.
//! * Data: RandomResizedCrop (bicubic, scale 0.08-1) -> flip 0.5 -> RandAugment
//!   `rand-m9-mstd0.5-inc1` (`data::augment`, documented subset) -> Normalize -> RandomErasing
//!   (p 0.25, pixel mode); Mixup 0.8 / CutMix 1.0 (prob 1, switch 0.5, batch mode) with label
//!   smoothing 0.1 folded into the soft targets (soft-target cross-entropy).
//! * Eval: the eval transform of EVALS.md §1.2 on val; `top1`, `top5` after the last epoch.
//!
//! Data parallel (`resources: { ranks: N }` / `gpus: N`, [`crate::train::parallel`]): every rank takes
//! its share of each micro-batch, averaged gradients make every rank apply the one-process
//! update. Mixup / CutMix pair image `i` with image `B-1-i` of the micro-batch, so a rank holds
//! whole pairs: rank `r` of `N` takes positions `[r*h, (r+1)*h)` and `[B-(r+1)*h, B-r*h)` with
//! `h = B/(2N)` (then the micro-batch must be a multiple of `2N`; without mixing, any multiple
//! of `N`, every `N`-th image); the batch's mixing draws and the per-sample drop-path draws are
//! those of the whole micro-batch, so the mixed images, targets and losses are the one-process
//! ones. There is no batch-statistics layer (LayerNorm only). Rank 0 evaluates and writes.
//!
//! Every random draw is a function of (stage key, seed, epoch, sample / iteration), and the
//! checkpoint holds the weights, the optimiser moments and the loss sums, so a run resumed at any
//! step boundary is bit-identical on CPU to an uninterrupted one. The stage writes
//! `encoder.safetensors` + `model.json` (it is a producer: probes can read it as `upstream`)
//! and `head.safetensors`.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::features;
use super::{params_of, StageContext, StageOutput};
use crate::data::loader::{load_batch, ImageSamples};
use crate::data::Transform;
use crate::error::{Error, Result};
use crate::kind::checkpoint::Cadence;
use crate::model::classifier_head::ClassifierHead;
use crate::train::run_loop::{self, LoopConfig, Points};

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

mod step;
use step::FtRecipe;

/// Params of a `finetune` stage (defaults: MAE ViT-B/16).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// `upstream`, `random`, or a safetensors path.
    pub checkpoint: String,
    /// Input side in pixels (default: the model's `img_size`).
    #[serde(alias = "img")]
    pub img_size: Option<u32>,
    /// Epochs (MAE: 100 for B, 50 for L/H).
    pub epochs: u32,
    /// Effective batch size (MAE: 1024).
    pub batch_size: usize,
    /// Micro-batches per step (gradient accumulation); must divide `batch_size`.
    pub accum_iter: usize,
    /// Base learning rate per 256 images.
    pub blr: f64,
    /// Floor of the cosine.
    pub min_lr: f64,
    /// Linear warmup, in epochs.
    pub warmup_epochs: f64,
    /// AdamW weight decay (not on 1-D parameters and biases).
    pub weight_decay: f64,
    /// Layer-wise lr decay (B 0.65, L/H 0.75).
    pub layer_decay: f64,
    /// Stochastic depth of the last block (B 0.1, L 0.2, H 0.3).
    pub drop_path: f64,
    /// Mixup alpha (0 = off).
    pub mixup: f64,
    /// CutMix alpha (0 = off).
    pub cutmix: f64,
    /// Probability of mixing a batch.
    pub mixup_prob: f64,
    /// Probability of CutMix when both are on.
    pub mixup_switch_prob: f64,
    /// Label smoothing.
    pub smoothing: f64,
    /// RandAugment ops per image (0 = off).
    pub randaug_n: usize,
    /// RandAugment magnitude.
    pub randaug_m: f64,
    /// RandAugment magnitude std.
    pub randaug_mstd: f64,
    /// RandomErasing probability.
    pub reprob: f64,
    /// Std of the head weight init.
    pub head_init_std: f64,
    /// Images per forward pass in the evaluation.
    pub eval_batch: usize,
    /// How often it checkpoints (`checkpoint_every`, `checkpoint_secs`).
    #[serde(flatten)]
    pub cadence: Cadence,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            checkpoint: "upstream".into(),
            img_size: Default::default(),
            epochs: 100,
            batch_size: 1024,
            accum_iter: 1,
            blr: 5e-4,
            min_lr: 1e-6,
            warmup_epochs: 5.0,
            weight_decay: 0.05,
            layer_decay: 0.65,
            drop_path: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            smoothing: 0.1,
            randaug_n: 2,
            randaug_m: 9.0,
            randaug_mstd: 0.5,
            reprob: 0.25,
            head_init_std: 2e-5,
            eval_batch: 64,
            cadence: Cadence::default(),
        }
    }
}

impl Params {
    /// Whether Mixup / CutMix mix image pairs (then a rank's shard holds whole pairs).
    pub fn mixes_pairs(&self) -> bool {
        (self.mixup > 0.0 || self.cutmix > 0.0) && self.mixup_prob > 0.0
    }

    /// Check ranges; messages name the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.epochs == 0 {
            return Err("`epochs` must be at least 1".into());
        }
        if self.batch_size == 0
            || self.accum_iter == 0
            || !self.batch_size.is_multiple_of(self.accum_iter)
        {
            return Err(format!(
                "`accum_iter` ({}) must divide `batch_size` ({}), both at least 1",
                self.accum_iter, self.batch_size
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err("`drop_path` must lie in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.layer_decay) || self.layer_decay == 0.0 {
            return Err("`layer_decay` must lie in (0, 1]".into());
        }
        if !(0.0..1.0).contains(&self.smoothing) {
            return Err("`smoothing` must lie in [0, 1)".into());
        }
        if self.warmup_epochs < 0.0 || self.blr <= 0.0 {
            return Err("`warmup_epochs` must be >= 0 and `blr` > 0".into());
        }
        Ok(())
    }

    /// MAE `adjust_learning_rate` at fractional epoch `ep` for peak `lr`.
    pub fn lr_at(&self, ep: f64, lr: f64) -> f64 {
        if ep < self.warmup_epochs {
            lr * ep / self.warmup_epochs
        } else {
            let span = (self.epochs as f64 - self.warmup_epochs).max(1e-12);
            self.min_lr
                + (lr - self.min_lr)
                    * 0.5
                    * (1.0 + (std::f64::consts::PI * (ep - self.warmup_epochs) / span).cos())
        }
    }
}

/// Validate params.
pub fn resolve(params: &serde_json::Map<String, Value>) -> std::result::Result<Value, String> {
    let v = super::resolve_flattened::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.validate()?;
    Ok(v)
}

/// Head weights in the artifacts.
pub const HEAD_FILE: &str = "head.safetensors";

/// Run the fine-tuning: set up, train ([`crate::train::run_loop`]), evaluate, write.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    p.validate().map_err(|m| Error::stage(&ctx.job.id, m))?;
    let dev = super::backbone::device(ctx)?;
    let mut ranks = crate::train::parallel::ranks::Ranks::connect(ctx, &dev)?;
    let bb = features::load_backbone(ctx, &p.checkpoint, &dev)?;
    let (_, train, val) = super::features::imagefolder_splits(ctx)?;
    let mut r = FtRecipe::new(ctx, &p, &bb, &train, ranks.world(), ranks.rank(), &dev)?;
    ctx.log(format!(
        "fine-tuning {} ({} classes, {} images): {} epochs x {} steps of {} ({} x {}), peak lr {:.3e}",
        bb.source, r.classes, r.n, p.epochs, r.ipe, r.bs, p.accum_iter, r.micro, r.peak
    ));
    let total = r.ipe as u64 * p.epochs as u64;
    let cfg = LoopConfig {
        log_every: r.ipe as u64,
        points: Points::Means(r.ipe as u64),
        nan_hint: Some("lower `blr`".into()),
        ..LoopConfig::new(total, vec!["loss"])
    };
    let done = run_loop::run(ctx, &mut ranks, &cfg, &mut r)?;
    if !ranks.is_leader() {
        // rank 0 holds the same weights, evaluates and writes the artifacts and the metrics
        return Ok(StageOutput::default());
    }
    let (top1, top5) = evaluate(ctx, &p, &bb, &r.head, &val, r.img, &dev)?;
    ctx.log(format!("fine-tuned: top1 {top1:.2} top5 {top5:.2}"));

    // Artifacts: the encoder (producer contract) and the head.
    super::backbone::save(&ctx.job.out_dir, &bb.cfg, &tensors(&r.enc_vars))?;
    candle_core::safetensors::save(&tensors(&r.head_vars), ctx.job.out_dir.join(HEAD_FILE))?;

    let steps_run = done.state.step - done.resumed_from;
    let ipe = r.ipe as u64;
    let loss: Vec<(u64, f64)> = done
        .curve("loss")
        .into_iter()
        .map(|(s, v)| (s / ipe, v))
        .collect();
    let mut out = StageOutput::default();
    out.metrics.insert("top1".into(), top1);
    out.metrics.insert("top5".into(), top5);
    if let Some((_, l)) = loss.last() {
        out.metrics.insert("train_loss".into(), *l);
    }
    if steps_run > 0 {
        let ips = (steps_run as f64 * r.bs as f64) / done.secs.max(1e-9);
        out.metrics.insert("train_images_per_sec".into(), ips);
    }
    out.series.insert("loss".into(), loss);
    out.info = json!({
        "protocol": "fine-tune",
        "backbone": bb.source,
        "classes": r.classes,
        "img": r.img,
        "steps": cfg.total,
        "resumed_from": done.resumed_from,
        "peak_lr": r.peak,
        "ranks": ranks.world(),
        "host_reads_in_steps": done.reads_in_steps,
    });
    Ok(out)
}

fn merr(e: crate::model::ModelError) -> Error {
    Error::Data(format!("model: {e}"))
}

fn tensors(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// Top-1 and top-5 accuracy (in %) of the fine-tuned model on `val`.
fn evaluate(
    ctx: &mut StageContext,
    p: &Params,
    bb: &super::backbone::Backbone,
    head: &ClassifierHead,
    val: &crate::data::imagefolder::ImageFolder,
    img: u32,
    dev: &Device,
) -> Result<(f64, f64)> {
    let eval = ImageSamples {
        samples: val.samples.clone(),
        transform: Transform::imagenet_eval(img),
    };
    let (mut h1, mut h5) = (0f64, 0f64);
    let ids: Vec<usize> = (0..val.len()).collect();
    let batches = val.len().div_ceil(p.eval_batch.max(1)) as u64;
    for (i, chunk) in ids.chunks(p.eval_batch.max(1)).enumerate() {
        let b =
            load_batch(&eval, chunk, 0, 0).map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?;
        let x = features::batch_tensor(&b, dev)?;
        let tokens = bb
            .encoder
            .forward_features(&x, None)
            .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?;
        let logits = head.forward(&tokens).map_err(merr)?.detach();
        let y: Vec<u32> = b.labels.iter().map(|&l| l as u32).collect();
        let y = Tensor::from_vec(y, chunk.len(), dev)?;
        let (t1, t5) = features::topk_hits(&logits, &y)?;
        h1 += t1.to_scalar::<f32>()? as f64;
        h5 += t5.to_scalar::<f32>()? as f64;
        ctx.progress.set(i as u64 + 1, batches, "evaluating");
    }
    Ok((100.0 * h1 / val.len() as f64, 100.0 * h5 / val.len() as f64))
}

/// The `finetune` kind.
pub struct Finetune;

impl crate::kind::Kind for Finetune {
    kind_basics!(resolve, run);

    encoder_hooks!(own_check_plan);

    fn check_plan(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
        super::backbone::check_plan(stage)?;
        crate::train::parallel::ranks::check_plan(stage, |p: &Params, world, rf| {
            let micro = p.batch_size / p.accum_iter.max(1);
            let need = if p.mixes_pairs() { 2 * world } else { world };
            if micro.is_multiple_of(need) {
                return Ok(());
            }
            let why = if p.mixes_pairs() {
                format!(
                    "2 x the number of ranks (`{rf}`: {world}) = {need}: Mixup / CutMix mix image \
                     pairs and each rank holds whole pairs"
                )
            } else {
                format!("the number of ranks (`{rf}`: {world})")
            };
            Err(format!(
                "`params.batch_size` ({}) / `params.accum_iter` ({}) = {micro} images per \
                 micro-batch must be divisible by {why}; change `params.batch_size` or \
                 `params.accum_iter` (a micro-batch of a multiple of {need}) or `{rf}`",
                p.batch_size, p.accum_iter
            ))
        })
    }

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| {
            let img = p.img_size.map(|i| i as usize);
            Cost::of(Pass::Train, img, Schedule::Epochs(p.epochs as f64))
        })
    }
}

#[cfg(test)]
mod tests;

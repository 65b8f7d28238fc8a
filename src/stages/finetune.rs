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

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::features;
use super::{params_of, StageContext, StageOutput};
use crate::data::augment::{self, MixupConfig, RandAugment};
use crate::data::loader::{epoch_permutation, load_batch, ImageSamples, Source};
use crate::data::transforms::{decode_rgb, IMAGENET_MEAN, IMAGENET_STD};
use crate::data::transforms::{random_hflip, to_chw_normalized, Chw, RandomResizedCrop};
use crate::data::{DataError, Transform};
use crate::error::{Error, Result};
use crate::model::classifier_head::ClassifierHead;
use crate::train::layer_decay::layer_id;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::ranks::Ranks;
use crate::train::run_loop::{self, LoopConfig, Recipe, Step};

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

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
    /// Checkpoint every N steps (0 = by time only; not hashed).
    pub checkpoint_every: u64,
    /// Checkpoint every N seconds (not hashed).
    pub checkpoint_secs: u64,
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
            checkpoint_every: Default::default(),
            checkpoint_secs: 300,
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
    let v = super::resolve::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.validate()?;
    Ok(v)
}

/// Train-time source: RRC -> flip -> RandAugment -> Normalize -> RandomErasing.
struct TrainSource {
    samples: Vec<(std::path::PathBuf, usize)>,
    rrc: RandomResizedCrop,
    ra: Option<RandAugment>,
    reprob: f64,
}

impl Source for TrainSource {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn get(
        &self,
        index: usize,
        rng: &mut ChaCha8Rng,
    ) -> std::result::Result<(Chw, usize), DataError> {
        let (path, label) = &self.samples[index];
        let img = decode_rgb(path)?;
        let img = random_hflip(self.rrc.apply(&img, rng), 0.5, rng);
        let img = match &self.ra {
            Some(ra) => ra.apply(&img, rng),
            None => img,
        };
        let mut chw = to_chw_normalized(&img, IMAGENET_MEAN, IMAGENET_STD);
        augment::random_erasing(&mut chw, self.reprob, rng);
        Ok((chw, *label))
    }
}

const WEIGHTS_FILE: &str = "weights.safetensors";
const OPTIM_FILE: &str = "optim.safetensors";
/// Head weights in the artifacts.
pub const HEAD_FILE: &str = "head.safetensors";

fn named_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Per-sample drop-path scales of every block for one forward.
fn drop_path_scales(
    depth: usize,
    rate: f64,
    b: usize,
    rng: &mut ChaCha8Rng,
    dev: &Device,
) -> Result<Vec<(Option<Tensor>, Option<Tensor>)>> {
    let mut out = Vec::with_capacity(depth);
    for i in 0..depth {
        let r = if depth > 1 {
            rate * i as f64 / (depth - 1) as f64
        } else {
            0.0
        };
        if r <= 0.0 {
            out.push((None, None));
            continue;
        }
        let keep = 1.0 - r;
        let mut draw = || -> Result<Tensor> {
            let v: Vec<f32> = (0..b)
                .map(|_| ((keep + rng.gen::<f64>()).floor() / keep) as f32)
                .collect();
            Ok(Tensor::from_vec(v, (b, 1, 1), dev)?)
        };
        let a = draw()?;
        let m = draw()?;
        out.push((Some(a), Some(m)));
    }
    Ok(out)
}

/// Run the fine-tuning: set up, train ([`crate::train::run_loop`]), evaluate, write.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    p.validate().map_err(|m| Error::stage(&ctx.job.id, m))?;
    let dev = super::backbone::device(ctx)?;
    let mut ranks = crate::train::parallel::ranks::Ranks::connect(ctx, &dev)?;
    let bb = features::load_backbone(ctx, &p.checkpoint, &dev)?;
    let (_, train, val) = super::linear_probe::imagefolder_splits(ctx)?;
    let mut r = FtRecipe::new(ctx, &p, &bb, &train, ranks.world(), ranks.rank(), &dev)?;
    ctx.log(format!(
        "fine-tuning {} ({} classes, {} images): {} epochs x {} steps of {} ({} x {}), peak lr {:.3e}",
        bb.source, r.classes, r.n, p.epochs, r.ipe, r.bs, p.accum_iter, r.micro, r.peak
    ));
    let cfg = LoopConfig {
        total: r.ipe as u64 * p.epochs as u64,
        log_every: r.ipe as u64,
        curve_every: r.ipe as u64,
        names: vec!["loss"],
        nan_hint: Some("lower `blr`".into()),
        unit: "step",
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

/// Fine-tuning's step: the model, its optimiser groups and the data recipe.
struct FtRecipe<'a> {
    p: &'a Params,
    encoder: &'a crate::model::VisionTransformer,
    head: ClassifierHead,
    enc_vars: Vec<(String, Var)>,
    head_vars: Vec<(String, Var)>,
    all_vars: Vec<(String, Var)>,
    opts: Groups,
    src: TrainSource,
    mix: MixupConfig,
    key: String,
    seed: u64,
    data_seed: u64,
    classes: usize,
    depth: usize,
    img: u32,
    n: usize,
    bs: usize,
    micro: usize,
    ipe: usize,
    peak: f64,
    rank: usize,
    world: usize,
    dev: Device,
    order: (u64, Vec<usize>),
}

impl<'a> FtRecipe<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &StageContext,
        p: &'a Params,
        bb: &'a super::backbone::Backbone,
        train: &crate::data::imagefolder::ImageFolder,
        world: usize,
        rank: usize,
        dev: &Device,
    ) -> Result<Self> {
        let classes = train.num_classes();
        let img = p.img_size.unwrap_or(bb.cfg.img_size as u32);
        let depth = bb.cfg.depth;
        let mut init_rng = crate::util::rng::stage_rng(&ctx.job.key, ctx.job.seed, "head-init");
        let head = ClassifierHead::new(
            bb.cfg.embed_dim,
            classes,
            p.head_init_std,
            &mut init_rng,
            dev,
        )
        .map_err(merr)?;
        // Optimiser groups by layer id.
        let enc_vars = named_vars(&bb.varmap);
        let head_vars = named_vars(&head.varmap);
        let all_vars: Vec<(String, Var)> =
            enc_vars.iter().chain(head_vars.iter()).cloned().collect();
        let opts = layer_groups(&all_vars, depth, p.layer_decay)
            .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?;
        let n = train.len();
        let bs = p.batch_size.min(n);
        let micro = (bs / p.accum_iter).max(1);
        check_split(p, bs, micro, world).map_err(|m| Error::stage(&ctx.job.id, m))?;
        Ok(Self {
            p,
            encoder: &bb.encoder,
            head,
            enc_vars,
            head_vars,
            all_vars,
            opts,
            src: TrainSource {
                samples: train.samples.clone(),
                rrc: RandomResizedCrop::new(img),
                ra: (p.randaug_n > 0).then_some(RandAugment {
                    num_ops: p.randaug_n,
                    magnitude: p.randaug_m,
                    magnitude_std: p.randaug_mstd,
                    prob: 0.5,
                }),
                reprob: p.reprob,
            },
            mix: MixupConfig {
                mixup_alpha: p.mixup,
                cutmix_alpha: p.cutmix,
                prob: p.mixup_prob,
                switch_prob: p.mixup_switch_prob,
                smoothing: p.smoothing,
            },
            key: ctx.job.key.clone(),
            seed: ctx.job.seed,
            data_seed: crate::util::rng::derive_seed(&ctx.job.key, ctx.job.seed, "finetune-data"),
            classes,
            depth,
            img,
            n,
            bs,
            micro,
            ipe: (n / bs).max(1),
            peak: p.blr * bs as f64 / 256.0,
            rank,
            world,
            dev: dev.clone(),
            order: (u64::MAX, Vec::new()),
        })
    }

    /// Forward + backward of micro-batch `mi` (images `chunk`) of step `step`: its loss and
    /// gradients added into `grads`.
    fn micro_batch(
        &self,
        step: u64,
        epoch: u64,
        mi: usize,
        chunk: &[usize],
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<Tensor> {
        let pos = shard_positions(chunk.len(), self.rank, self.world);
        let mine: Vec<usize> = pos.iter().map(|&i| chunk[i]).collect();
        let mut b = load_batch(&self.src, &mine, self.data_seed, epoch)
            .map_err(|e| Error::Data(e.to_string()))?;
        let mut rng =
            crate::util::rng::stage_rng(&self.key, self.seed, &format!("step{step}.{mi}"));
        let targets = augment::mix_batch(
            &mut b.images,
            b.shape,
            &b.labels,
            self.classes,
            &self.mix,
            &mut rng,
        );
        let x = features::batch_tensor(&b, &self.dev)?;
        let y = Tensor::from_vec(targets, (mine.len(), self.classes), &self.dev)?;
        // the draws of the whole micro-batch, this rank's rows of them
        let mut scales = drop_path_scales(
            self.depth,
            self.p.drop_path,
            chunk.len(),
            &mut rng,
            &self.dev,
        )?;
        if self.world > 1 {
            let rows: Vec<u32> = pos.iter().map(|&i| i as u32).collect();
            let rows = Tensor::from_vec(rows, pos.len(), &self.dev)?;
            let pick = |t: Option<Tensor>| -> Result<Option<Tensor>> {
                Ok(t.map(|t| t.index_select(&rows, 0)).transpose()?)
            };
            scales = scales
                .into_iter()
                .map(|(a, m)| Ok((pick(a)?, pick(m)?)))
                .collect::<Result<_>>()?;
        }
        accumulate(
            self.encoder,
            &self.head,
            &self.all_vars,
            &x,
            &y,
            &scales,
            self.p.accum_iter,
            grads,
        )
    }
}

impl Recipe for FtRecipe<'_> {
    fn step(&mut self, _: &mut StageContext, ranks: &mut Ranks, step: u64) -> Result<Step> {
        let ipe = self.ipe as u64;
        let (epoch, k) = (step / ipe, (step % ipe) as usize);
        let lr = self
            .p
            .lr_at(epoch as f64 + k as f64 / ipe as f64, self.peak);
        if self.order.0 != epoch {
            self.order = (epoch, epoch_permutation(self.n, self.data_seed, epoch));
        }
        let idx = self.order.1[k * self.bs..(k + 1) * self.bs].to_vec();
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss: Option<Tensor> = None;
        for (mi, chunk) in idx.chunks(self.micro).enumerate() {
            // summed in f64 on the device, as the host summed the f32 values before
            let l = self
                .micro_batch(step, epoch, mi, chunk, &mut grads)?
                .to_dtype(DType::F64)?;
            loss = Some(match loss {
                Some(s) => (s + l)?,
                None => l,
            });
        }
        if self.world > 1 {
            // the mean of equal shards' means: the global batch's gradient
            grads = ranks.mean_grads(grads)?;
        }
        apply(&mut self.opts, &grads, lr, self.p.weight_decay)?;
        Ok(Step {
            losses: vec![loss.expect("a step has at least one micro-batch")],
            host: vec![("lr", lr)],
        })
    }

    fn save(&self, dir: &std::path::Path) -> Result<()> {
        let mut o = HashMap::new();
        for (_, _, opt) in &self.opts {
            o.extend(
                opt.state_tensors()
                    .map_err(|e| Error::Data(e.to_string()))?,
            );
        }
        candle_core::safetensors::save(&tensors(&self.all_vars), dir.join(WEIGHTS_FILE))?;
        candle_core::safetensors::save(&o, dir.join(OPTIM_FILE))?;
        Ok(())
    }

    fn load(&mut self, dir: &std::path::Path) -> Result<()> {
        let w = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &self.dev)?;
        for (name, var) in &self.all_vars {
            let t = w.get(name).ok_or_else(|| {
                Error::Data(format!("checkpoint {} lacks `{name}`", dir.display()))
            })?;
            var.set(t)?;
        }
        let o = candle_core::safetensors::load(dir.join(OPTIM_FILE), &self.dev)?;
        for (_, names, opt) in self.opts.iter_mut() {
            let mine: HashMap<String, Tensor> = o
                .iter()
                .filter(|(k, _)| {
                    k.rsplit_once('.')
                        .is_some_and(|(base, _)| names.iter().any(|n| n == base))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            opt.load_state(&mine)
                .map_err(|e| Error::Data(e.to_string()))?;
        }
        Ok(())
    }
}

/// Fails unless each micro-batch splits over the ranks (whole Mixup pairs per rank).
fn check_split(
    p: &Params,
    bs: usize,
    micro: usize,
    world: usize,
) -> std::result::Result<(), String> {
    let mixing = p.mixes_pairs();
    let need = if mixing { 2 * world } else { world };
    if world <= 1 || (micro.is_multiple_of(need) && bs.is_multiple_of(micro)) {
        return Ok(());
    }
    let by = if mixing {
        format!(
            "2 x the number of ranks ({need}): Mixup / CutMix mix image pairs and each rank \
             holds whole pairs"
        )
    } else {
        format!("the number of ranks ({world})")
    };
    Err(format!(
        "`batch_size` ({bs}) / `accum_iter` ({}) = {micro} images per micro-batch must be \
         divisible by {by}; change `batch_size` or `resources`",
        p.accum_iter
    ))
}

/// Positions in a micro-batch of `m` images that rank `rank` of `world` trains on (see the
/// module doc): whole Mixup pairs `(i, m-1-i)` when `m` is a multiple of `2 * world`, laid out so
/// that the rank's own mirror pairing matches the micro-batch's; otherwise every `world`-th.
fn shard_positions(m: usize, rank: usize, world: usize) -> Vec<usize> {
    if world <= 1 {
        return (0..m).collect();
    }
    if m.is_multiple_of(2 * world) {
        let h = m / (2 * world);
        (rank * h..(rank + 1) * h)
            .chain(m - (rank + 1) * h..m - rank * h)
            .collect()
    } else {
        crate::train::parallel::comm::shard_rows(&(0..m).collect::<Vec<_>>(), rank, world)
    }
}

/// One AdamW per BEiT layer id, with its lr scale `layer_decay^(depth + 1 - id)` and its
/// parameter names.
type Groups = Vec<(f64, Vec<String>, AdamW)>;

fn layer_groups(vars: &[(String, Var)], depth: usize, layer_decay: f64) -> Result<Groups> {
    let mut groups: BTreeMap<usize, Vec<(String, Var)>> = BTreeMap::new();
    for (n, v) in vars {
        groups
            .entry(layer_id(n, depth))
            .or_default()
            .push((n.clone(), v.clone()));
    }
    let mut out = Vec::new();
    for (id, vars) in groups {
        let scale = layer_decay.powi((depth + 1 - id) as i32);
        let names = vars.iter().map(|v| v.0.clone()).collect();
        let opt =
            AdamW::new(vars, AdamWConfig::default()).map_err(|e| Error::Data(e.to_string()))?;
        out.push((scale, names, opt));
    }
    Ok(out)
}

/// Forward + backward of one micro-batch: the soft-target loss divided by `accum` (returned,
/// on the device) and
/// its gradients added into `grads` by parameter name.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    encoder: &crate::model::VisionTransformer,
    head: &ClassifierHead,
    vars: &[(String, Var)],
    x: &Tensor,
    y: &Tensor,
    scales: &[(Option<Tensor>, Option<Tensor>)],
    accum: usize,
    grads: &mut HashMap<String, Tensor>,
) -> Result<Tensor> {
    let tokens = encoder
        .forward_features_drop_path(x, scales)
        .map_err(|e| Error::Data(e.to_string()))?;
    let logits = head.forward(&tokens).map_err(merr)?;
    let loss = soft_ce(&logits, y)?.affine(1.0 / accum as f64, 0.0)?;
    let g = loss.backward()?;
    for (name, var) in vars {
        if let Some(t) = g.get(var.as_tensor()) {
            let t = t.detach();
            let sum = match grads.remove(name) {
                Some(prev) => (prev + t)?,
                None => t,
            };
            grads.insert(name.clone(), sum);
        }
    }
    Ok(loss.detach())
}

/// One AdamW step of every layer group at `lr * scale`.
fn apply(opts: &mut Groups, grads: &HashMap<String, Tensor>, lr: f64, wd: f64) -> Result<()> {
    for (scale, names, opt) in opts.iter_mut() {
        let mine: HashMap<String, Tensor> = names
            .iter()
            .filter_map(|n| grads.get(n).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step_named(&mine, lr * *scale, wd)
            .map_err(|e| Error::Data(e.to_string()))?;
    }
    Ok(())
}

/// Soft-target cross-entropy of `(B, C)` logits (mean over the batch).
pub fn soft_ce(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?
        .broadcast_mul(target)?
        .sum(D::Minus1)?
        .neg()?
        .mean_all()?)
}

/// The `finetune` kind.
pub struct Finetune;

impl crate::kind::Kind for Finetune {
    fn renamed_params(&self) -> &'static [crate::kind::Rename] {
        &[crate::kind::hooks::IMG]
    }

    kind_basics!(resolve, run);

    encoder_hooks!(key_inputs);

    fn check_plan(
        &self,
        stage: &crate::kind::PlanView,
    ) -> std::result::Result<(), crate::kind::PlanIssue> {
        super::backbone::check_plan(stage)?;
        crate::train::parallel::ranks::check_plan(stage, |world, rf| {
            let p: Params =
                serde_json::from_value(stage.params.clone()).map_err(|e| e.to_string())?;
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
        let Ok(p) = serde_json::from_value::<Params>(params.clone()) else {
            return crate::kind::Cost::NONE;
        };
        crate::kind::Cost {
            pass: crate::kind::Pass::Train,
            img_size: p.img_size.map(|i| i as usize),
            schedule: Some(crate::kind::Schedule::Epochs(p.epochs as f64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_mae() {
        let p = Params {
            epochs: 10,
            warmup_epochs: 2.0,
            min_lr: 0.0,
            ..Params::default()
        };
        assert_eq!(p.lr_at(0.0, 1.0), 0.0);
        assert!((p.lr_at(1.0, 1.0) - 0.5).abs() < 1e-12);
        assert!((p.lr_at(2.0, 1.0) - 1.0).abs() < 1e-12);
        assert!((p.lr_at(6.0, 1.0) - 0.5).abs() < 1e-12);
        assert!(p.lr_at(10.0, 1.0).abs() < 1e-12);
        let bad = Params {
            accum_iter: 3,
            batch_size: 8,
            ..Params::default()
        };
        assert!(bad.validate().unwrap_err().contains("accum_iter"));
    }

    /// Encoder + head with layer-decayed AdamW groups and drop path fit a fixed batch: the
    /// gradients reach every group and the loss falls.
    #[test]
    fn fits_a_fixed_batch() {
        let dev = Device::Cpu;
        let cfg = crate::model::VitConfig {
            img_size: 16,
            patch_size: 8,
            in_chans: 3,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 2.0,
            qkv_bias: true,
            ln_eps: 1e-6,
            pred_embed_dim: 16,
            pred_depth: 1,
            pred_num_heads: 2,
            init_std: 0.02,
        };
        let nets = crate::model::JepaNetworks::new_random(&cfg, 1, &dev).unwrap();
        let enc: HashMap<String, Tensor> = nets
            .state_tensors()
            .into_iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("target_encoder.")
                    .map(|k| (k.to_string(), v))
            })
            .collect();
        let bb = super::super::backbone::build("t", cfg, &enc, &dev, "t".into()).unwrap();
        let mut rng = crate::util::rng::stage_rng("t", 0, "t");
        let head = ClassifierHead::new(16, 2, 2e-5, &mut rng, &dev).unwrap();
        let vars: Vec<(String, Var)> = named_vars(&bb.varmap)
            .into_iter()
            .chain(named_vars(&head.varmap))
            .collect();
        let mut opts = layer_groups(&vars, 2, 0.75).unwrap();
        assert_eq!(opts.len(), 4, "patch_embed, 2 blocks, top");
        assert!((opts[0].0 - 0.75f64.powi(3)).abs() < 1e-12 && opts[3].0 == 1.0);
        let x = Tensor::from_vec(
            crate::model::init::trunc_normal(&mut rng, 4 * 3 * 16 * 16, 1.0),
            (4, 3, 16, 16),
            &dev,
        )
        .unwrap();
        let y = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 0.], [0., 1.]], &dev).unwrap();
        let before: Vec<f32> = enc["blocks.0.attn.qkv.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..60 {
            let scales = drop_path_scales(2, 0.1, 4, &mut rng, &dev).unwrap();
            let mut g = HashMap::new();
            last = accumulate(&bb.encoder, &head, &vars, &x, &y, &scales, 1, &mut g)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            first.get_or_insert(last);
            assert_eq!(g.len(), vars.len(), "every parameter gets a gradient");
            apply(&mut opts, &g, 3e-3, 0.05).unwrap();
        }
        let first = first.unwrap();
        assert!((first - 2f64.ln()).abs() < 1e-3, "{first}");
        assert!(last < 0.3 * first, "{first} -> {last}");
        let after: Vec<f32> = bb.varmap.data().lock().unwrap()["blocks.0.attn.qkv.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_ne!(before, after, "the encoder is trained");
    }

    #[test]
    fn shards_hold_whole_mixup_pairs() {
        let (m, world) = (8, 2);
        let mut seen = Vec::new();
        for r in 0..world {
            let pos = shard_positions(m, r, world);
            let l = pos.len();
            for (i, &g) in pos.iter().enumerate() {
                // the rank's mirror partner is the micro-batch's mirror partner
                assert_eq!(pos[l - 1 - i], m - 1 - g, "rank {r}: {pos:?}");
            }
            seen.extend(pos);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..m).collect::<Vec<_>>(), "every image once");
        assert_eq!(shard_positions(6, 1, 2), vec![1, 3, 5]);
        assert_eq!(shard_positions(5, 0, 1), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn soft_ce_matches_hard_ce() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 0.0, -1.0], [0.0, 1.0, 0.0]], &dev).unwrap();
        let t = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev).unwrap();
        let a = soft_ce(&logits, &t).unwrap().to_scalar::<f32>().unwrap();
        let lse0 = (2f32.exp() + 1.0 + (-1f32).exp()).ln();
        let lse1 = (2.0 + 1f32.exp()).ln();
        let want = ((lse0 - 2.0) + (lse1 - 1.0)) / 2.0;
        assert!((a - want).abs() < 1e-6);
        let b = crate::train::cross_entropy::cross_entropy(&logits.unsqueeze(0).unwrap(), &t)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((b[0] - want).abs() < 1e-6);
    }
}

//! One fine-tuning step: the model, its layer-decayed AdamW groups, Mixup / CutMix and the micro-
//! batches of one effective batch.

use super::{merr, tensors, Params};
use crate::data::augment::{self, MixupConfig, RandAugment};
use crate::data::loader::{epoch_permutation, load_batch, Source};
use crate::data::transforms::RandomResizedCrop;
use crate::data::transforms::{
    decode_rgb, random_hflip, to_chw_normalized, Chw, IMAGENET_MEAN, IMAGENET_STD,
};
use crate::data::DataError;
use crate::error::{Error, Result};
use crate::model::classifier_head::ClassifierHead;
use crate::stages::features;
use crate::stages::StageContext;
use crate::train::layer_decay::layer_id;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::ranks::Ranks;
use crate::train::run_loop::{Recipe, Step};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};

/// Fine-tuning's step: the model, its optimiser groups and the data recipe.
pub(super) struct FtRecipe<'a> {
    pub(super) p: &'a Params,
    pub(super) encoder: &'a crate::model::VisionTransformer,
    pub(super) head: ClassifierHead,
    pub(super) enc_vars: Vec<(String, Var)>,
    pub(super) head_vars: Vec<(String, Var)>,
    pub(super) all_vars: Vec<(String, Var)>,
    pub(super) opts: Groups,
    pub(super) src: TrainSource,
    pub(super) mix: MixupConfig,
    pub(super) key: String,
    pub(super) seed: u64,
    pub(super) data_seed: u64,
    pub(super) classes: usize,
    pub(super) depth: usize,
    pub(super) img: u32,
    pub(super) n: usize,
    pub(super) bs: usize,
    pub(super) micro: usize,
    pub(super) ipe: usize,
    pub(super) peak: f64,
    pub(super) rank: usize,
    pub(super) world: usize,
    pub(super) dev: Device,
    pub(super) order: (u64, Vec<usize>),
}

impl<'a> FtRecipe<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        ctx: &StageContext,
        p: &'a Params,
        bb: &'a crate::stages::backbone::Backbone,
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
    pub(super) fn micro_batch(
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

    fn load(&mut self, dir: &std::path::Path, _step: u64) -> Result<()> {
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

/// Positions in a micro-batch of `m` images that rank `rank` of `world` trains on (see the
/// module doc): whole Mixup pairs `(i, m-1-i)` when `m` is a multiple of `2 * world`, laid out so
/// that the rank's own mirror pairing matches the micro-batch's; otherwise every `world`-th.
pub(super) fn shard_positions(m: usize, rank: usize, world: usize) -> Vec<usize> {
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
pub(super) type Groups = Vec<(f64, Vec<String>, AdamW)>;

pub(super) fn layer_groups(
    vars: &[(String, Var)],
    depth: usize,
    layer_decay: f64,
) -> Result<Groups> {
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
pub(super) fn accumulate(
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
pub(super) fn apply(
    opts: &mut Groups,
    grads: &HashMap<String, Tensor>,
    lr: f64,
    wd: f64,
) -> Result<()> {
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

/// Train-time source: RRC -> flip -> RandAugment -> Normalize -> RandomErasing.
pub(super) struct TrainSource {
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

pub(super) const WEIGHTS_FILE: &str = "weights.safetensors";
pub(super) const OPTIM_FILE: &str = "optim.safetensors";

pub(super) fn named_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Per-sample drop-path scales of every block for one forward.
pub(super) fn drop_path_scales(
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

/// Fails unless each micro-batch splits over the ranks (whole Mixup pairs per rank).
pub(super) fn check_split(
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

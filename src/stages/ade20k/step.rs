//! One segmentation training iteration: the network, its AdamW and the global batch of the
//! iteration (each rank's share).

use super::{merr, read_labels, sample_index, Params, Protocol, CLASSES};
use crate::data::ade20k::Ade20k;
use crate::data::seg_transforms::{self, TrainAug};
use crate::data::transforms;
use crate::error::{Error, Result};
use crate::model::seg_heads::UperNetConfig;
use crate::model::seg_net::{SegHeadConfig, SegNet as Model};
use crate::stages::{backbone, StageContext};
use crate::train::cross_entropy::cross_entropy_ignore;
use crate::train::layer_decay::prefixed_layer_scale as layer_scale;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::ranks::Ranks;
use crate::train::run_loop::{Recipe, Step};
use crate::train::schedules::poly_with_warmup as lr_at;
use crate::util::rng::{derive_seed, stage_rng};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One segmentation training iteration: the model, its optimiser and the data recipe.
pub(super) struct SegRecipe<'a> {
    pub(super) p: &'a Params,
    pub(super) model: Model,
    pub(super) opt: AdamW,
    pub(super) train: &'a Ade20k,
    pub(super) aug: TrainAug,
    pub(super) shard: Vec<usize>,
    pub(super) rank: usize,
    pub(super) depth: usize,
    pub(super) dev: Device,
}

impl<'a> SegRecipe<'a> {
    pub(super) fn new(
        ctx: &StageContext,
        p: &'a Params,
        bb: backbone::Backbone,
        layers: Vec<i64>,
        train: &'a Ade20k,
        ranks: &Ranks,
        dev: &Device,
    ) -> Result<Self> {
        let depth = bb.cfg.depth;
        let head_seed = derive_seed(&ctx.job.key, ctx.job.seed, "head-init");
        let head = match p.protocol {
            Protocol::Linear => SegHeadConfig::Linear { classes: CLASSES },
            Protocol::Upernet => SegHeadConfig::Upernet(UperNetConfig {
                in_dim: bb.cfg.embed_dim,
                channels: p.channels,
                aux_channels: p.aux_channels,
                classes: CLASSES,
                dropout: p.dropout,
            }),
        };
        let model = Model::new(
            head,
            (bb.cfg, bb.encoder, bb.varmap),
            layers,
            head_seed,
            dev,
        )
        .map_err(merr)?;
        let opt = AdamW::new(model.trainable(), AdamWConfig::default())
            .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?;
        Ok(Self {
            p,
            model,
            opt,
            train,
            aug: TrainAug {
                scale: (p.scale[0] as f64, p.scale[1] as f64),
                ratio_range: (p.ratio_range[0], p.ratio_range[1]),
                crop: p.crop,
                cat_max_ratio: p.cat_max_ratio,
                flip: 0.5,
            },
            shard: ranks.shard(&(0..p.batch_size).collect::<Vec<_>>()),
            rank: ranks.rank(),
            depth,
            dev: dev.clone(),
        })
    }
}

impl Recipe for SegRecipe<'_> {
    fn step(&mut self, ctx: &mut StageContext, ranks: &mut Ranks, step: u64) -> Result<Step> {
        let p = self.p;
        let (x, labels) = train_batch(ctx, self.train, p, &self.aug, step, &self.shard, &self.dev)?;
        let stream = if self.rank == 0 {
            format!("dropout-{step}")
        } else {
            format!("dropout-{step}/rank-{}", self.rank)
        };
        let mut drop_rng = stage_rng(&ctx.job.key, ctx.job.seed, &stream);
        let m = &self.model;
        let (logits, aux) = m
            .forward(&m.encoder, m.heads(), &x, true, Some(&mut drop_rng))
            .map_err(merr)?;
        let mut loss = cross_entropy_ignore(&logits, &labels)?;
        if let Some(a) = aux {
            loss = (loss + (cross_entropy_ignore(&a, &labels)? * p.aux_weight)?)?;
        }
        let grads = loss.backward()?;
        let named = ranks.mean_grads(self.opt.named_grads(&grads))?;
        let lr = lr_at(p.lr(), step, p.warmup_iters, p.iters);
        // Parameter groups by layer-decay scale (one group for the linear protocol).
        let mut groups: BTreeMap<u64, HashMap<String, Tensor>> = BTreeMap::new();
        for (k, g) in named {
            let s = match p.protocol {
                Protocol::Linear => 1.0,
                Protocol::Upernet => layer_scale(&k, self.depth, p.layer_decay),
            };
            groups.entry(s.to_bits()).or_default().insert(k, g);
        }
        for (s, g) in &groups {
            self.opt
                .step_named(g, lr * f64::from_bits(*s), p.weight_decay)
                .map_err(|e| Error::Data(e.to_string()))?;
        }
        Ok(Step {
            losses: vec![loss.detach()],
            host: vec![("lr", lr)],
        })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let state = self
            .opt
            .state_tensors()
            .map_err(|e| Error::Data(e.to_string()))?;
        self.model.save(dir).map_err(merr)?;
        candle_core::safetensors::save(&state, dir.join("optim.safetensors"))?;
        Ok(())
    }

    fn load(&mut self, dir: &Path, _step: u64) -> Result<()> {
        self.model.load(dir).map_err(merr)?;
        let t = candle_core::safetensors::load(dir.join("optim.safetensors"), &self.dev)?;
        self.opt
            .load_state(&t)
            .map_err(|e| Error::Data(e.to_string()))
    }
}

/// Positions `shard` of the global batch of iteration `step`: images `(b, 3, crop, crop)` and
/// labels `b*crop*crop`.
pub(super) fn train_batch(
    ctx: &StageContext,
    ds: &Ade20k,
    p: &Params,
    aug: &TrainAug,
    step: u64,
    shard: &[usize],
    dev: &Device,
) -> Result<(Tensor, Vec<u8>)> {
    let n = ds.samples.len();
    let (key, seed) = (ctx.job.key.as_str(), ctx.job.seed);
    let items: Vec<Result<(Vec<f32>, Vec<u8>)>> = shard
        .par_iter()
        .map(|&b| {
            let g = step * p.batch_size as u64 + b as u64;
            let (img_path, ann_path) = &ds.samples[sample_index(key, seed, n, g)];
            let img = transforms::decode_rgb(img_path).map_err(|e| Error::Data(e.to_string()))?;
            let lab = read_labels(ann_path)?;
            if (lab.width, lab.height) != (img.width(), img.height()) {
                return Err(Error::Data(format!(
                    "{}: annotation is {}x{} but the image is {}x{}",
                    ann_path.display(),
                    lab.width,
                    lab.height,
                    img.width(),
                    img.height()
                )));
            }
            let mut rng = stage_rng(key, seed, &format!("aug-{step}-{b}"));
            Ok(seg_transforms::train_sample(&img, &lab.data, aug, &mut rng))
        })
        .collect();
    let c = p.crop;
    let mut xs = Vec::with_capacity(shard.len() * 3 * c * c);
    let mut ls = Vec::with_capacity(shard.len() * c * c);
    for it in items {
        let (x, l) = it?;
        xs.extend(x);
        ls.extend(l);
    }
    Ok((Tensor::from_vec(xs, (shard.len(), 3, c, c), dev)?, ls))
}

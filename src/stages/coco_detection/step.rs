//! One detection training step: the Mask R-CNN detector, its optimiser groups, the gradient mean
//! over the ranks and the clip.

use super::{stack, BackboneMode, Params};
use crate::data::coco::CocoDataset;
use crate::data::detection::{train_sample, Instance, LsjConfig, TrainSample};
use crate::error::{Error, Result};
use crate::model::detect::init::SeededInit;
use crate::model::detect::{train, Detector};
use crate::stages::backbone::Backbone;
use crate::stages::StageContext;
use crate::train::layer_decay::layer_scale;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::ranks::Ranks;
use crate::train::run_loop::{Recipe, Step};
use crate::util::rng::{derive_seed, stage_rng};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};

/// One optimiser per lr scale (the AdamW has one lr per step).
pub(super) struct Group {
    pub(super) scale: f64,
    pub(super) names: HashSet<String>,
    pub(super) opt: AdamW,
}

pub(super) const WEIGHTS: &str = "weights.safetensors";
pub(super) const OPTIM: &str = "optim.safetensors";

/// One detection training step: the detector, its optimiser groups and the data recipe.
pub(super) struct DetRecipe<'a> {
    pub(super) p: &'a Params,
    pub(super) det: Detector,
    pub(super) encoder: &'a crate::model::VisionTransformer,
    pub(super) trainable: Vec<(String, Var, f64)>,
    pub(super) groups: Vec<Group>,
    pub(super) train: &'a CocoDataset,
    pub(super) ids: Vec<u64>,
    pub(super) lsj: LsjConfig,
    pub(super) bpe: usize,
    pub(super) perm: Option<(u64, Vec<usize>)>,
    pub(super) key: String,
    pub(super) seed: u64,
    pub(super) world: usize,
    pub(super) dev: Device,
}

impl<'a> DetRecipe<'a> {
    pub(super) fn new(
        ctx: &StageContext,
        p: &'a Params,
        bb: &'a Backbone,
        train: &'a CocoDataset,
        world: usize,
        dev: &Device,
    ) -> Result<Self> {
        let serr = |e: &dyn std::fmt::Display| Error::stage(&ctx.job.id, e.to_string());
        let patch = bb.cfg.patch_size;
        if p.img_size % (2 * patch) != 0 {
            return Err(serr(&format!(
                "`img_size` {} must be a multiple of 2 x patch_size = {}",
                p.img_size,
                2 * patch
            )));
        }
        let det_vars = VarMap::new();
        let init_seed = derive_seed(&ctx.job.key, ctx.job.seed, "detector-init");
        let det = Detector::new(
            &p.head,
            train.categories.len(),
            bb.cfg.embed_dim,
            patch,
            SeededInit::var_builder(&det_vars, init_seed, dev),
        )
        .map_err(|e| serr(&e))?;
        // Trainable variables (sorted names) and their optimiser groups.
        let mut trainable: Vec<(String, Var, f64)> = sorted_vars(&det_vars, "det.")
            .into_iter()
            .map(|(n, v)| (n, v, 1.0))
            .collect();
        if p.backbone == BackboneMode::Finetune {
            for (n, v) in sorted_vars(&bb.varmap, "backbone.") {
                let s = layer_scale(&n["backbone.".len()..], bb.cfg.depth, p.layer_decay);
                trainable.push((n, v, s));
            }
        }
        let mut by_scale: BTreeMap<u64, Vec<(String, Var)>> = BTreeMap::new();
        for (n, v, s) in &trainable {
            by_scale
                .entry(s.to_bits())
                .or_default()
                .push((n.clone(), v.clone()));
        }
        let groups: Vec<Group> = by_scale
            .into_iter()
            .map(|(bits, vars)| {
                Ok(Group {
                    scale: f64::from_bits(bits),
                    names: vars.iter().map(|(n, _)| n.clone()).collect(),
                    opt: AdamW::new(vars, AdamWConfig::default()).map_err(|e| serr(&e))?,
                })
            })
            .collect::<Result<_>>()?;
        let ids: Vec<u64> = train.file.images.iter().map(|i| i.id).collect();
        let bpe = ids.len() / p.batch_size;
        if bpe == 0 {
            return Err(serr(&format!(
                "{} training images are fewer than batch_size {}",
                ids.len(),
                p.batch_size
            )));
        }
        Ok(Self {
            p,
            det,
            encoder: &bb.encoder,
            trainable,
            groups,
            train,
            ids,
            lsj: LsjConfig {
                size: p.img_size,
                scale_range: (p.scale_range[0], p.scale_range[1]),
                flip_prob: p.flip_prob,
            },
            bpe,
            perm: None,
            key: ctx.job.key.clone(),
            seed: ctx.job.seed,
            world,
            dev: dev.clone(),
        })
    }

    pub(super) fn weights(&self) -> HashMap<String, Tensor> {
        self.trainable
            .iter()
            .map(|(n, v, _)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// This rank's images of step `step`'s global batch, augmented, on the device.
    pub(super) fn batch(
        &mut self,
        ranks: &Ranks,
        step: u64,
    ) -> Result<(Tensor, Vec<Vec<Instance>>, Vec<usize>)> {
        let (bpe, bs) = (self.bpe as u64, self.p.batch_size);
        let (epoch, kb) = (step / bpe, (step % bpe) as usize);
        if self.perm.as_ref().map(|x| x.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.ids.len()).collect();
            order.shuffle(&mut stage_rng(
                &self.key,
                self.seed,
                &format!("perm/{epoch}"),
            ));
            self.perm = Some((epoch, order));
        }
        let order = &self.perm.as_ref().expect("set").1;
        let batch = ranks.shard(&order[kb * bs..(kb + 1) * bs]);
        let (key, seed, lsj, train, ids) = (&self.key, self.seed, &self.lsj, self.train, &self.ids);
        let samples: Vec<TrainSample> = batch
            .par_iter()
            .map(|&i| {
                let mut rng = stage_rng(key, seed, &format!("aug/{epoch}/{i}"));
                train_sample(train, ids[i], lsj, &mut rng)
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Data(e.to_string()))?;
        let images = stack(
            &samples.iter().map(|s| &s.image).collect::<Vec<_>>(),
            &self.dev,
        )?;
        let instances = samples.into_iter().map(|s| s.instances).collect();
        Ok((images, instances, batch))
    }
}

impl Recipe for DetRecipe<'_> {
    fn step(&mut self, _: &mut StageContext, ranks: &mut Ranks, step: u64) -> Result<Step> {
        let (images, instances, batch) = self.batch(ranks, step)?;
        let mut rngs: Vec<_> = batch
            .iter()
            .map(|i| stage_rng(&self.key, self.seed, &format!("mask-rois/{step}/{i}")))
            .collect();
        let at_step = |e: crate::model::ModelError| Error::Data(format!("step {step}: {e}"));
        let frozen = self.p.backbone == BackboneMode::Frozen;
        let fwd = train::forward(
            &self.det,
            self.encoder,
            frozen,
            &images,
            &instances,
            &mut rngs,
        )
        .map_err(at_step)?;
        // the global batch's normalisers: each rank's loss is its share of the global loss
        let norms = train::Norms::from_array(&ranks.sum_scalars(&fwd.norms().to_array())?);
        let out = fwd
            .losses(&self.det, &norms, self.world as f64)
            .map_err(at_step)?;
        let grads = out.total.backward()?;
        let mut named: Vec<HashMap<String, Tensor>> = self
            .groups
            .iter()
            .map(|g| g.opt.named_grads(&grads))
            .collect();
        drop(grads);
        if self.world > 1 {
            named = mean_grads(ranks, &self.trainable, &self.groups, named)?;
        }
        if let Some(max) = self.p.clip_grad_norm {
            clip_global_norm(&mut named, max)?;
        }
        let lr = self.p.lr * self.p.lr_factor(step);
        for (g, m) in self.groups.iter_mut().zip(&named) {
            g.opt
                .step_named(m, lr * g.scale, self.p.weight_decay)
                .map_err(|e| Error::Data(e.to_string()))?;
        }
        Ok(Step {
            losses: vec![out.total.detach(), out.cls, out.reg, out.ctr, out.mask],
            host: vec![
                ("lr", lr),
                ("positives", norms.fcos.num_pos),
                ("mask_rois", norms.rois),
            ],
        })
    }

    fn save(&self, dir: &std::path::Path) -> Result<()> {
        let mut optim = HashMap::new();
        for g in &self.groups {
            optim.extend(
                g.opt
                    .state_tensors()
                    .map_err(|e| Error::Data(e.to_string()))?,
            );
        }
        candle_core::safetensors::save(&self.weights(), dir.join(WEIGHTS))?;
        candle_core::safetensors::save(&optim, dir.join(OPTIM))?;
        Ok(())
    }

    fn load(&mut self, dir: &std::path::Path, _step: u64) -> Result<()> {
        let w = candle_core::safetensors::load(dir.join(WEIGHTS), &self.dev)?;
        for (n, v, _) in &self.trainable {
            let t = w
                .get(n)
                .ok_or_else(|| Error::Data(format!("checkpoint {} has no `{n}`", dir.display())))?;
            v.set(t)?;
        }
        let o = candle_core::safetensors::load(dir.join(OPTIM), &self.dev)?;
        for g in &mut self.groups {
            let mine: HashMap<String, Tensor> = o
                .iter()
                .filter(|(key, _)| {
                    key.rsplit_once('.')
                        .is_some_and(|(n, _)| g.names.contains(n))
                })
                .map(|(key, t)| (key.clone(), t.clone()))
                .collect();
            g.opt
                .load_state(&mine)
                .map_err(|e| Error::Data(e.to_string()))?;
        }
        Ok(())
    }
}

/// Scale every gradient by `min(1, max / (global norm + 1e-6))`, on the device (no read): the
/// per-parameter sums of squares are added in f64 in parameter order.
pub(super) fn clip_global_norm(named: &mut [HashMap<String, Tensor>], max: f64) -> Result<()> {
    let parts = named
        .iter()
        .flat_map(|m| m.values())
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    if parts.is_empty() {
        return Ok(());
    }
    let norm = Tensor::stack(&parts, 0)?.sum_all()?.sqrt()?;
    let coef = (norm + 1e-6)?.recip()?.affine(max, 0.0)?.minimum(1.0)?;
    for m in named.iter_mut() {
        for g in m.values_mut() {
            *g = g.broadcast_mul(&coef.to_dtype(g.dtype())?)?;
        }
    }
    Ok(())
}

/// The mean over the ranks of each group's gradients. A variable without a gradient on a rank
/// (the mask head of a shard without RoIs) counts as zero there, and one without a gradient on
/// every rank stays without one, as in the one-process run.
pub(super) fn mean_grads(
    ranks: &mut crate::train::parallel::ranks::Ranks,
    trainable: &[(String, Var, f64)],
    groups: &[Group],
    named: Vec<HashMap<String, Tensor>>,
) -> Result<Vec<HashMap<String, Tensor>>> {
    let mut all: HashMap<String, Tensor> = named.into_iter().flatten().collect();
    let has: Vec<f32> = trainable
        .iter()
        .map(|(n, _, _)| all.contains_key(n) as u8 as f32)
        .collect();
    let has = ranks.sum_scalars(&has)?;
    for (n, v, _) in trainable {
        if !all.contains_key(n) {
            all.insert(n.clone(), v.as_tensor().zeros_like()?);
        }
    }
    let mut mean = ranks.mean_grads(all)?;
    for ((n, _, _), h) in trainable.iter().zip(has) {
        if h == 0.0 {
            mean.remove(n);
        }
    }
    Ok(groups
        .iter()
        .map(|g| {
            g.names
                .iter()
                .filter_map(|n| mean.remove_entry(n))
                .collect()
        })
        .collect())
}

pub(super) fn sorted_vars(vm: &VarMap, prefix: &str) -> Vec<(String, Var)> {
    let data = vm.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data
        .iter()
        .map(|(n, v)| (format!("{prefix}{n}"), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

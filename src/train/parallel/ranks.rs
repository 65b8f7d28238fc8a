//! Data-parallel plumbing shared by the stages that train over `resources.ranks` /
//! `resources.gpus` processes (`pretrain`, `finetune`, `ade20k_segmentation`,
//! `coco_detection`; see
//! [`crate::kind::StageKind::data_parallel`]).
//!
//! Every rank runs the same loop on the same global batches, schedules and seeded draws; it takes
//! its shard of each global batch ([`Ranks::shard`]: every `world`-th image), and after the
//! backward pass the gradients are averaged over the ranks ([`Ranks::mean_grads`]) so every rank
//! applies the same update. Because each rank's loss is a mean over an equal shard, the mean of
//! the ranks' gradients is the gradient of the mean over the global batch, the one-process
//! gradient up to float rounding. On an interrupt the ranks agree on the step to stop at
//! ([`Ranks::stop_if_interrupted`]) and rank 0 alone checkpoints; rank 0 alone writes
//! artifacts and metrics (the other ranks return an empty output, the launcher keeps rank 0's).
//! With one rank every operation is the identity and costs nothing.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::comm::{self as dist, AllReduce, DistError};
use crate::error::{Error, Result};
use crate::kind::StageContext;
use crate::kind::{PlanIssue, PlanView};

/// This process's place in the stage's data-parallel group.
pub struct Ranks {
    comm: Box<dyn AllReduce>,
    dev: Device,
    id: String,
}

impl Ranks {
    /// Join the stage's group on `dev` (one process: a group of one).
    pub fn connect(ctx: &StageContext, dev: &Device) -> Result<Self> {
        Ok(Self {
            comm: crate::train::parallel::group::connect(ctx, dev)?,
            dev: dev.clone(),
            id: ctx.job.id.clone(),
        })
    }

    /// A group of one (no other process), e.g. for tests and one-process tools.
    pub fn single(dev: &Device) -> Self {
        Self {
            comm: Box::new(dist::Single),
            dev: dev.clone(),
            id: String::new(),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// Whether this rank writes checkpoints, artifacts and metrics.
    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// The collective operations.
    pub fn comm(&mut self) -> &mut dyn AllReduce {
        self.comm.as_mut()
    }

    fn err(&self, e: DistError) -> Error {
        Error::stage(&self.id, e.to_string())
    }

    /// Fails unless the global batch `value` (param `field`) splits evenly over the ranks.
    pub fn check_divides(&self, field: &str, value: usize) -> Result<()> {
        self.check_multiple(field, value, 1, "")
    }

    /// Fails unless `value` (param `field`) is a multiple of `factor` × the number of ranks;
    /// `why` ends the message.
    pub fn check_multiple(
        &self,
        field: &str,
        value: usize,
        factor: usize,
        why: &str,
    ) -> Result<()> {
        let world = self.world();
        if world > 1 && !value.is_multiple_of(factor * world) {
            let by = if factor == 1 {
                format!("the number of ranks ({world})")
            } else {
                format!("{factor} x the number of ranks ({world})")
            };
            return Err(Error::stage(
                &self.id,
                format!(
                    "`{field}` ({value}) is the global batch and must be divisible by {by}{why}; \
                     change `{field}` or `resources`"
                ),
            ));
        }
        Ok(())
    }

    /// This rank's rows of a global batch: rows `rank, rank + world, ...`.
    pub fn shard<T: Clone>(&self, rows: &[T]) -> Vec<T> {
        dist::shard_rows(rows, self.rank(), self.world())
    }

    /// The mean over ranks of named gradients.
    pub fn mean_grads(&mut self, g: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
        dist::mean_grads(self.comm.as_mut(), g).map_err(|e| self.err(e))
    }

    /// The mean over ranks of a few scalars.
    pub fn mean_scalars(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        dist::mean_scalars(self.comm.as_mut(), v, &self.dev).map_err(|e| self.err(e))
    }

    /// The sum over ranks of a few scalars.
    pub fn sum_scalars(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        dist::sum_scalars(self.comm.as_mut(), v, &self.dev).map_err(|e| self.err(e))
    }

    /// Each flag, true on every rank when it is true on at least one (one all-reduce; with one
    /// rank, the flags themselves).
    pub fn agree<const N: usize>(&mut self, flags: [bool; N]) -> Result<[bool; N]> {
        if self.world() == 1 {
            return Ok(flags);
        }
        let v: Vec<f32> = flags.iter().map(|&f| f32::from(u8::from(f))).collect();
        let sum = self.sum_scalars(&v)?;
        Ok(std::array::from_fn(|i| sum[i] > 0.0))
    }

    /// Wait until every rank reaches this point.
    pub fn barrier(&mut self) -> Result<()> {
        dist::any(self.comm.as_mut(), false, &self.dev).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Call at the same point of every step on every rank. When any rank was interrupted, all
    /// stop here: rank 0 runs `save` (the checkpoint) while the others wait, then every rank
    /// returns [`Error::Interrupted`].
    pub fn stop_if_interrupted(
        &mut self,
        ctx: &mut StageContext,
        save: impl FnOnce(&mut StageContext) -> Result<()>,
    ) -> Result<()> {
        let flag = ctx.is_interrupted();
        let stop = dist::any(self.comm.as_mut(), flag, &self.dev).map_err(|e| self.err(e))?;
        if !stop {
            return Ok(());
        }
        if self.is_leader() {
            save(ctx)?;
        }
        // the others leave once the checkpoint is written
        dist::any(self.comm.as_mut(), false, &self.dev).map_err(|e| self.err(e))?;
        Err(Error::Interrupted)
    }
}

/// Plan-time check that the global batch of a data-parallel stage splits over the ranks it asks
/// for (`stage.world`, set by `stage.world_field`): `rule(params, world, field)` is the kind's
/// own condition on its params `P` ([`batch_divides`] for most), its message naming the params
/// and the fix. The stages repeat the check when they start (a batch capped by a small dataset,
/// a world given by the GPUs actually granted).
pub fn check_plan<P: serde::de::DeserializeOwned>(
    stage: &PlanView,
    rule: impl FnOnce(&P, usize, &str) -> std::result::Result<(), String>,
) -> crate::kind::PlanCheck {
    if stage.world <= 1 {
        return Ok(());
    }
    let p: P = serde_json::from_value(stage.params.clone())
        .map_err(|e| PlanIssue::at("params", e.to_string()))?;
    rule(&p, stage.world, stage.world_field).map_err(|m| PlanIssue::at("resources", m))
}

/// The usual rule: `params.{field}` (`value` images) is the global batch and must be divisible
/// by the `world` ranks set by `rf`.
pub fn batch_divides(
    field: &str,
    value: usize,
    world: usize,
    rf: &str,
) -> std::result::Result<(), String> {
    if value.is_multiple_of(world) {
        return Ok(());
    }
    Err(format!(
        "`params.{field}` ({value}) is the global batch and must be divisible by the number \
         of ranks (`{rf}`: {world}); set `params.{field}` to a multiple of {world} or change \
         `{rf}`"
    ))
}

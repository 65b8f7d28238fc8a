//! The body of one pretraining iteration, shared by the `pretrain` stage and the trajectory
//! recorder ([`super::trajectory`]): the batch of iteration `it` from the loader, the masks of
//! iteration `it` (stream `masks/<it>` of the (key, seed) pair), this iteration's schedule values,
//! and the training step on one process (the batch cut into thread shards, or not) or on one rank
//! of a data-parallel group. The step's values stay on the device ([`PendingLosses`]).

use candle_core::{Device, Tensor};

use super::loss::LossConfig;
use super::optim::AdamW;
use super::parallel::comm::{self as dist, AllReduce};
use super::parallel::shards::{train_step_sharded, ThreadShards};
use super::schedules::{ScheduleValues, Schedules};
use super::step::{train_step_pending, Batch, PendingLosses, StepError, StepHyper};
use crate::data::loader::{self, EpochIter, Loader, Source};
use crate::data::DataError;
use crate::model::masks::{mask_tensors, MaskSampler, Masks};
use crate::model::JepaNetworks;
use crate::util::rng::stage_rng;

/// The batches of a run in iteration order: iteration `it` is batch `it % ipe` of epoch
/// `it / ipe`. Iterations are asked for in order (a resumed run starts anywhere).
pub struct Batches<'l, 'a, S: Source + ?Sized> {
    loader: &'l Loader<'a, S>,
    ipe: u64,
    epoch: Option<(u64, EpochIter<'l, 'a, S>)>,
}

impl<'l, 'a, S: Source + ?Sized> Batches<'l, 'a, S> {
    /// Over `loader` (at least one batch per epoch).
    pub fn new(loader: &'l Loader<'a, S>) -> Self {
        Self {
            loader,
            ipe: loader.num_batches().max(1) as u64,
            epoch: None,
        }
    }

    /// The batch of iteration `it`; `None` if the epoch ended before it.
    pub fn get(&mut self, it: u64) -> Option<Result<loader::Batch, DataError>> {
        let epoch = it / self.ipe;
        let iter = match &mut self.epoch {
            Some((e, iter)) if *e == epoch => iter,
            slot => {
                let start = (it % self.ipe) as usize;
                &mut slot.insert((epoch, self.loader.iter_epoch(epoch, start))).1
            }
        };
        iter.next()
    }
}

/// How a step trains: in one process (the batch cut into thread shards when given) or as one
/// rank of a data-parallel group (the group's communicator; [`dist::Single`] for one process).
pub enum Trainer<'c> {
    /// The batch as shards on separate threads.
    Shards(&'c ThreadShards),
    /// This rank's shard of the batch.
    Ranks(&'c mut dyn AllReduce),
}

/// The fixed parts of every iteration of a run.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'p> {
    /// Draws the masks of the global batch.
    pub sampler: &'p MaskSampler,
    /// lr, wd and momentum per iteration.
    pub sched: &'p Schedules,
    /// The loss.
    pub loss: &'p LossConfig,
    /// Key and seed of the random streams (the masks of iteration `it`: stream `masks/<it>`).
    pub key: &'p str,
    /// See `key`.
    pub seed: u64,
    /// Global batch size.
    pub batch: usize,
    /// This process's rank and the number of ranks (each holds every `world`-th image).
    pub rank: usize,
    /// See `rank`.
    pub world: usize,
}

/// What one iteration did.
#[derive(Debug)]
pub struct Done {
    /// The step's values, still on the device.
    pub pending: PendingLosses,
    /// The schedule values applied.
    pub hyper: ScheduleValues,
    /// The masks of the global batch.
    pub masks: Masks,
}

impl Plan<'_> {
    /// The masks of the global batch of iteration `it`.
    pub fn masks(&self, it: u64) -> Masks {
        let mut rng = stage_rng(self.key, self.seed, &format!("masks/{it}"));
        self.sampler.sample(&mut rng, self.batch)
    }

    /// Iteration `it` on `images` (this rank's rows of the batch): masks, schedules, step.
    pub fn run(
        &self,
        it: u64,
        images: &Tensor,
        nets: &JepaNetworks,
        opt: &mut AdamW,
        trainer: Trainer,
    ) -> Result<Done, StepError> {
        let masks = self.masks(it);
        let (rank, world) = (self.rank, self.world);
        let shard = |m: &[Vec<Vec<u32>>]| -> Vec<Vec<Vec<u32>>> {
            m.iter().map(|l| dist::shard_rows(l, rank, world)).collect()
        };
        // masks stay host data: the networks read their index lists without a device sync
        let masks_enc = mask_tensors(&shard(&masks.enc), &Device::Cpu)?;
        let masks_pred = mask_tensors(&shard(&masks.pred), &Device::Cpu)?;
        let hv = self.sched.at(it);
        let hyper = StepHyper {
            lr: hv.lr,
            wd: hv.wd,
            momentum: hv.momentum,
        };
        let b = Batch {
            images,
            masks_enc: &masks_enc,
            masks_pred: &masks_pred,
        };
        let pending = match trainer {
            Trainer::Shards(pools) => {
                train_step_sharded(nets, &b, self.loss, opt, hyper, pools, None)
            }
            Trainer::Ranks(comm) => train_step_pending(nets, &b, self.loss, opt, hyper, comm, None),
        }?;
        Ok(Done {
            pending,
            hyper: hv,
            masks,
        })
    }
}

//! Pretraining's step for the shared training loop: one iteration of I-JEPA / C-JEPA on the next
//! batch (masks, schedules, the step on thread shards or ranks), the networks and AdamW moments a
//! checkpoint holds, and what a read step adds (the effective rank on logged steps, the epoch
//! snapshots).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::checkpoints::{self, write_snapshot, NETS_FILE, OPTIM_FILE};
use crate::data::loader::DecodedImageSamples;
use crate::error::{Error, Result};
use crate::kind::StageContext;
use crate::model::{JepaNetworks, VitConfig};
use crate::train::iteration::{Batches, Plan, Trainer};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::ranks::Ranks;
use crate::train::parallel::shards::ThreadShards;
use crate::train::run_loop::{LoopState, Recipe, Step};
use crate::train::step::PendingLosses;

/// The values a step hands back, in the order of [`PendingLosses::values`].
pub(super) const NAMES: [&str; 6] = PendingLosses::NAMES;

/// One pretraining run's networks, optimiser, batches and plan.
pub(super) struct JepaStep<'r> {
    pub(super) id: String,
    pub(super) plan: Plan<'r>,
    pub(super) batches: Batches<'r, 'r, DecodedImageSamples>,
    pub(super) nets: JepaNetworks,
    pub(super) opt: AdamW,
    pub(super) adam: AdamWConfig,
    pub(super) cfg: VitConfig,
    pub(super) shards: Option<ThreadShards>,
    pub(super) dev: Device,
    /// This process's rank (rank 0 writes the snapshots).
    pub(super) rank: usize,
    /// Iterations per epoch.
    pub(super) ipe: u64,
    /// `(epoch, step)` of each snapshot this run reaches.
    pub(super) snapshots: Vec<(u64, u64)>,
    pub(super) work_dir: PathBuf,
    /// The latest step's values on the device (its features, for the effective rank).
    pub(super) latest: Option<PendingLosses>,
}

/// Networks drawn from `seed` and their optimiser.
pub(super) fn fresh(
    cfg: &VitConfig,
    adam: &AdamWConfig,
    seed: u64,
    dev: &Device,
) -> std::result::Result<(JepaNetworks, AdamW), String> {
    let nets = JepaNetworks::new_random(cfg, seed, dev).map_err(|e| e.to_string())?;
    let opt = AdamW::new(nets.online_vars(), adam.clone()).map_err(|e| e.to_string())?;
    Ok((nets, opt))
}

impl JepaStep<'_> {
    fn fail(&self, m: String) -> Error {
        Error::stage(&self.id, m)
    }
}

impl Recipe for JepaStep<'_> {
    fn step(&mut self, _ctx: &mut StageContext, ranks: &mut Ranks, it: u64) -> Result<Step> {
        let batch = self
            .batches
            .get(it)
            .ok_or_else(|| {
                self.fail(format!(
                    "epoch {} ended before step {it}",
                    it / self.ipe.max(1)
                ))
            })?
            .map_err(|e| self.fail(e.to_string()))?;
        let images = Tensor::from_vec(batch.images, batch.shape.to_vec(), &self.dev)?;
        let trainer = match &self.shards {
            Some(pools) => Trainer::Shards(pools),
            None => Trainer::Ranks(ranks.comm()),
        };
        let done = self
            .plan
            .run(it, &images, &self.nets, &mut self.opt, trainer)
            .map_err(|e| Error::stage(&self.id, format!("step {}: {e}", it + 1)))?;
        let losses = done
            .pending
            .values()
            .map_err(|e| self.fail(format!("step {}: {e}", it + 1)))?;
        let hv = done.hyper;
        let host = vec![
            ("lr", hv.lr),
            ("wd", hv.wd),
            ("grad_norm", done.pending.grad_norm().unwrap_or(f64::NAN)),
        ];
        self.latest = Some(done.pending);
        Ok(Step { losses, host })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let optim = self
            .opt
            .state_tensors()
            .map_err(|e| self.fail(e.to_string()))?;
        candle_core::safetensors::save(&self.nets.state_tensors(), dir.join(NETS_FILE))?;
        candle_core::safetensors::save(&optim, dir.join(OPTIM_FILE))?;
        Ok(())
    }

    fn load(&mut self, dir: &Path, step: u64) -> Result<()> {
        let bad = |e: String| self.fail(format!("checkpoint {}: {e}", dir.display()));
        let nets = JepaNetworks::from_safetensors(&self.cfg, &dir.join(NETS_FILE), &self.dev)
            .map_err(|e| bad(e.to_string()))?;
        let mut opt =
            AdamW::new(nets.online_vars(), self.adam.clone()).map_err(|e| bad(e.to_string()))?;
        let ost = candle_core::safetensors::load(dir.join(OPTIM_FILE), &self.dev)?;
        opt.load_state(&ost).map_err(|e| bad(e.to_string()))?;
        (self.nets, self.opt) = (nets, opt);
        checkpoints::check_snapshots(&self.id, &self.work_dir, dir, &self.snapshots, step)
    }

    /// The weights of a snapshot step are copied out: its values are read first.
    fn read_at(&self, step: u64) -> bool {
        self.snapshots.iter().any(|&(_, s)| s == step)
    }

    fn after_read(
        &mut self,
        ctx: &mut StageContext,
        step: u64,
        logged: bool,
    ) -> Result<Vec<(&'static str, f64)>> {
        let mut extra = Vec::new();
        // the second collapse monitor, on logged steps only (one more read, O(D^3) on the host)
        if let (true, Some(p)) = (logged, &self.latest) {
            let r = p
                .effective_rank()
                .map_err(|e| self.fail(format!("step {step}: {e}")))?;
            extra.push(("target_eff_rank", r));
        }
        if let Some(&(k, _)) = self.snapshots.iter().find(|(_, s)| *s == step) {
            if self.rank == 0 {
                let root = self.work_dir.join(super::backbone::SNAPSHOTS_DIR);
                write_snapshot(&root, k, &self.nets, &self.cfg)?;
                ctx.log(format!("snapshot of epoch {k} (step {step})"));
            }
        }
        Ok(extra)
    }

    fn legacy_state(&self, dir: &Path) -> Result<Option<LoopState>> {
        checkpoints::legacy_state(dir)
    }
}

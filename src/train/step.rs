//! One C-JEPA / I-JEPA training step, as the official `train.py` loop body: targets from the
//! target encoder (no gradient), context encoder on the context masks, predictor, loss, backward,
//! AdamW with this iteration's lr / wd, then the EMA of the target encoder with this iteration's
//! momentum. The `pretrain` stage calls [`train_step_pending`] in a loop: the step reads nothing
//! back from the device, and its values ([`PendingLosses`]) are read only on the steps that log
//! or write weights.

use candle_core::{Device, Tensor};

use super::ema::{ema_update, EmaError};
use super::loss::{
    compute_loss, context_embedding, jepa_loss, make_targets, vicreg_terms, LossConfig, LossError,
    LossOutput, Targets,
};
use super::optim::{AdamW, OptimError, StepStats};
use super::parallel::comm::{self as dist, AllReduce, DistError, Single};
use crate::model::{JepaNetworks, ModelError};
use crate::util::host_read;

/// Errors of a training step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The loss is NaN or infinite (found when the step's values are read: the weights of
    /// that step are not to be kept).
    #[error("non-finite loss {total} (jepa {jepa})")]
    NonFinite { total: f32, jepa: f32 },
    /// From the networks.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// From the loss.
    #[error(transparent)]
    Loss(#[from] LossError),
    /// From the optimiser.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// From the EMA.
    #[error(transparent)]
    Ema(#[from] EmaError),
    /// From the data-parallel all-reduce.
    #[error(transparent)]
    Dist(#[from] DistError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One batch: images `(B, C, H, W)` and the mask index lists, each `(B, K)` integer tensors
/// (`masks_enc`: nenc context masks, `masks_pred`: npred target masks). Masks are host data: keep
/// them on the CPU whatever the images' device (a mask on a GPU costs a device read per use).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Images.
    pub images: &'a Tensor,
    /// Context masks.
    pub masks_enc: &'a [Tensor],
    /// Target masks.
    pub masks_pred: &'a [Tensor],
}

/// Schedule values of this iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepHyper {
    /// Learning rate.
    pub lr: f64,
    /// Weight decay of the decayed group.
    pub wd: f64,
    /// EMA momentum applied after the optimiser step.
    pub momentum: f64,
}

/// Everything the forward pass computed.
#[derive(Debug, Clone)]
pub struct ForwardOut {
    /// Context encoder output `(nenc*B, Ke, D)`.
    pub enc_ctx: Tensor,
    /// Targets and z_t.
    pub targets: Targets,
    /// Predictions `(npred*nenc*B, Kp, D)`.
    pub pred: Tensor,
    /// Loss terms.
    pub loss: LossOutput,
    /// The tensor back-propagated: `loss.total`, except over several ranks where the VICReg
    /// terms (computed on the global batch) enter `world` times (see [`train_step_pending`]).
    pub backward_root: Tensor,
    /// z_t of the global batch (every rank's rows), for the collapse monitor.
    pub z_t_global: Tensor,
}

/// Loss values of a step, plus the optimiser's statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    /// Total loss.
    pub total: f32,
    /// JEPA term.
    pub jepa: f32,
    /// Raw VICReg invariance term.
    pub sim: f32,
    /// Raw VICReg variance term.
    pub std: f32,
    /// Raw VICReg covariance term.
    pub cov: f32,
    /// Collapse monitor: the mean over feature dimensions of the batch std of z_t (the per-image
    /// mean of the layer-normed target-encoder output) over the global batch, before the update;
    /// 0 means collapse, NaN for a batch of one image.
    pub target_std: f32,
    /// Optimiser statistics.
    pub optim: StepStats,
}

/// The values of a step still on the device: `[total, jepa, sim, std, cov, target_std]`,
/// averaged over the ranks. A training loop keeps the step running ahead of the host and reads
/// them with one device-to-host read ([`PendingLosses::read`]) on the steps it logs or
/// checkpoints only.
#[derive(Debug, Clone)]
pub struct PendingLosses {
    values: Tensor,
    optim: StepStats,
    /// z_t of the global batch (detached), for [`PendingLosses::effective_rank`].
    z_t: Tensor,
}

impl PendingLosses {
    pub(super) fn new(values: Tensor, optim: StepStats, z_t: Tensor) -> Self {
        Self { values, optim, z_t }
    }

    /// The second collapse monitor, for the steps a loop logs (one more device-to-host read):
    /// the effective rank of z_t over the global batch ([`effective_rank`]).
    pub fn effective_rank(&self) -> Result<f64, StepError> {
        effective_rank(&self.z_t)
    }

    /// The names of [`PendingLosses::values`], in their order (as a stage logs them).
    pub const NAMES: [&'static str; 6] = [
        "loss",
        "loss_jepa",
        "loss_sim",
        "loss_std",
        "loss_cov",
        "target_std",
    ];

    /// The six values `[total, jepa, sim, std, cov, target_std]` as scalar tensors still on the
    /// device (for a loop that reads them later with other steps' values).
    pub fn values(&self) -> Result<Vec<Tensor>, StepError> {
        Ok((0..6)
            .map(|i| self.values.get(i))
            .collect::<candle_core::Result<_>>()?)
    }

    /// The gradient norm before clipping, when it was computed (host value).
    pub fn grad_norm(&self) -> Option<f64> {
        self.optim.grad_norm
    }

    /// The six values, in one counted device-to-host read. A non-finite total is
    /// [`StepError::NonFinite`] (on every rank alike: the values are the ranks' means).
    pub fn read(&self) -> Result<StepLosses, StepError> {
        let v: Vec<f32> = host_read::vec1(&self.values)?;
        let [total, jepa, sim, std, cov, target_std] = v[..] else {
            unreachable!("six values are stacked by pending_values")
        };
        if !total.is_finite() {
            return Err(StepError::NonFinite { total, jepa });
        }
        Ok(StepLosses {
            total,
            jepa,
            sim,
            std,
            cov,
            target_std,
            optim: self.optim,
        })
    }
}

/// Wall-clock seconds spent in each part of training steps (summed over the steps timed).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    /// Target encoder forward (no gradient) and the targets.
    pub target: f64,
    /// Context encoder forward on the context tokens.
    pub context: f64,
    /// Predictor forward.
    pub predictor: f64,
    /// Loss terms, and reading their values.
    pub loss: f64,
    /// Backward pass.
    pub backward: f64,
    /// Optimiser step.
    pub optimizer: f64,
    /// EMA of the target encoder.
    pub ema: f64,
}

impl PhaseTimes {
    /// Named phases in step order.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("target forward", self.target),
            ("context forward", self.context),
            ("predictor forward", self.predictor),
            ("loss", self.loss),
            ("backward", self.backward),
            ("optimizer", self.optimizer),
            ("ema", self.ema),
        ]
    }

    /// Sum of all phases.
    pub fn total(&self) -> f64 {
        self.named().iter().map(|(_, t)| t).sum()
    }
}

impl std::ops::AddAssign for PhaseTimes {
    fn add_assign(&mut self, o: Self) {
        self.target += o.target;
        self.context += o.context;
        self.predictor += o.predictor;
        self.loss += o.loss;
        self.backward += o.backward;
        self.optimizer += o.optimizer;
        self.ema += o.ema;
    }
}

/// Adds the time since the last lap to a phase (no-op without a timer). With a timer, each lap
/// first waits for the device to finish the work queued so far (a GPU runs behind the host: a
/// host timestamp alone would charge a phase's kernels to whichever phase next waits).
pub(super) struct Lap<'a>(Option<(&'a mut PhaseTimes, std::time::Instant, Device)>);

impl<'a> Lap<'a> {
    pub(super) fn new(t: Option<&'a mut PhaseTimes>, device: &Device) -> Self {
        Self(t.map(|t| {
            // work queued before the step is not the step's
            let _ = device.synchronize();
            (t, std::time::Instant::now(), device.clone())
        }))
    }
    pub(super) fn mark(&mut self, phase: fn(&mut PhaseTimes) -> &mut f64) {
        if let Some((t, last, device)) = &mut self.0 {
            let _ = device.synchronize();
            let now = std::time::Instant::now();
            *phase(t) += (now - *last).as_secs_f64();
            *last = now;
        }
    }
}

/// Forward pass and loss of one batch (gradients recorded on the encoder and predictor only).
pub fn forward_loss(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
) -> Result<ForwardOut, StepError> {
    forward_loss_timed(nets, batch, cfg, &mut Lap(None), &mut Single)
}

pub(super) fn forward_loss_timed(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    lap: &mut Lap,
    comm: &mut dyn AllReduce,
) -> Result<ForwardOut, StepError> {
    let nenc = batch.masks_enc.len();
    let h = nets
        .target_encoder
        .forward_features(batch.images, None)?
        .detach();
    let targets = make_targets(&h, batch.masks_pred, nenc, cfg)?;
    lap.mark(|t| &mut t.target);
    let enc_ctx = nets
        .encoder
        .forward_features(batch.images, Some(batch.masks_enc))?;
    lap.mark(|t| &mut t.context);
    let pred = nets
        .predictor
        .forward(&enc_ctx, batch.masks_enc, batch.masks_pred)?;
    lap.mark(|t| &mut t.predictor);
    let (loss, backward_root, z_t_global) = if comm.world() == 1 {
        let l = compute_loss(&pred, &targets, &enc_ctx, nenc, cfg)?;
        let root = l.total.clone();
        (l, root, targets.z_t.clone())
    } else {
        global_loss(&pred, &targets, &enc_ctx, nenc, cfg, comm)?
    };
    Ok(ForwardOut {
        enc_ctx,
        targets,
        pred,
        loss,
        backward_root,
        z_t_global,
    })
}

/// The loss of one rank's shard with the VICReg terms over the global batch (the official
/// VICReg's `FullGatherLayer`): the pooled embeddings z_c and z_t of every rank are gathered, the
/// three terms computed on all of them on every rank, and only this rank's z_c rows carry a
/// gradient. The JEPA term stays a mean over the shard (the mean over ranks of equal shards'
/// means is the global mean). Every rank computes the same global VICReg value V, and its
/// backward reaches only its own rows, so the back-propagated root is `jepa + world * V`: after
/// the gradient all-reduce's mean over ranks, V's gradient is the sum of all rows'
/// contributions, the one-rank gradient. `loss.total` is `jepa + V` (the value reported).
fn global_loss(
    pred: &Tensor,
    targets: &Targets,
    enc_ctx: &Tensor,
    nenc: usize,
    cfg: &LossConfig,
    comm: &mut dyn AllReduce,
) -> Result<(LossOutput, Tensor, Tensor), StepError> {
    cfg.validate()?;
    let jepa = jepa_loss(pred, &targets.feats, cfg)?;
    let z_c = context_embedding(enc_ctx, nenc)?;
    let d = z_c.dim(1)?;
    let both = Tensor::cat(&[&z_c, &targets.z_t.to_dtype(z_c.dtype())?], 1)?;
    let all = dist::all_gather_rows(comm, &both)?;
    let z_c_all = dist::with_own_rows(&all.narrow(1, 0, d)?.contiguous()?, &z_c, comm.rank())?;
    let z_t_all = all.narrow(1, d, d)?.contiguous()?;
    let (sim, std, cov) = vicreg_terms(&z_c_all, &z_t_all, cfg.vic_var_eps)?;
    let (ws, wv, wc) = cfg.term_weights();
    if z_c_all.dim(0)? < 2 && (wv != 0.0 || wc != 0.0) {
        return Err(LossError::Shape(
            "the VICReg variance/covariance terms need a batch of at least 2 images".into(),
        )
        .into());
    }
    let world = comm.world() as f64;
    let mut total = jepa.clone();
    let mut root = jepa.clone();
    for (w, t) in [(ws, &sim), (wv, &std), (wc, &cov)] {
        if w != 0.0 {
            total = (total + (t * w)?)?;
            root = (root + (t * (w * world))?)?;
        }
    }
    let loss = LossOutput {
        total,
        jepa,
        sim,
        std,
        cov,
    };
    Ok((loss, root, z_t_all))
}

/// One full training step: forward, backward, AdamW (`hyper.lr`, `hyper.wd`), EMA (`hyper.momentum`).
/// A non-finite loss returns [`StepError::NonFinite`] before anything is changed.
pub fn train_step(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    opt: &mut AdamW,
    hyper: StepHyper,
) -> Result<StepLosses, StepError> {
    train_step_timed(nets, batch, cfg, opt, hyper, None)
}

/// [`train_step`] that adds the time of each phase to `times` (for benchmarks).
pub fn train_step_timed(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    opt: &mut AdamW,
    hyper: StepHyper,
    times: Option<&mut PhaseTimes>,
) -> Result<StepLosses, StepError> {
    train_step_pending(nets, batch, cfg, opt, hyper, &mut Single, times)?.read()
}

/// [`train_step_timed`] for one rank of a data-parallel group, its values left on the device.
///
/// `batch` is this rank's shard of the global batch. The JEPA term is this shard's; the VICReg
/// terms are computed on the global batch (gathered from every rank, see [`global_loss`]). The
/// loss values are averaged over the ranks (so all ranks agree on a divergence) and so are the
/// gradients, before the optimiser step; every rank then applies the same update, the one of a
/// one-process run on the global batch up to float rounding. With [`Single`] this is exactly
/// [`train_step_timed`].
///
/// No device-to-host read happens inside (the masks are host data; see
/// [`crate::util::host_read`]). The caller reads the values ([`PendingLosses::read`]) when it
/// logs or checkpoints; a non-finite loss shows there.
pub fn train_step_pending(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    opt: &mut AdamW,
    hyper: StepHyper,
    comm: &mut dyn AllReduce,
    times: Option<&mut PhaseTimes>,
) -> Result<PendingLosses, StepError> {
    let mut lap = Lap::new(times, batch.images.device());
    let fwd = forward_loss_timed(nets, batch, cfg, &mut lap, comm)?;
    let values = pending_values(&fwd.loss, &fwd.z_t_global, comm)?;
    lap.mark(|t| &mut t.loss);
    let z_t = fwd.z_t_global.detach();
    let grads = fwd.backward_root.backward()?;
    drop(fwd);
    lap.mark(|t| &mut t.backward);
    let named = dist::mean_grads(comm, opt.named_grads(&grads))?;
    drop(grads);
    let optim = update(nets, opt, named, hyper, &mut lap)?;
    Ok(PendingLosses { values, optim, z_t })
}

/// `[total, jepa, sim, std, cov, target_std]` as one f32 tensor on the device, the losses
/// averaged over the ranks (an all-reduce of the tensor, no read).
pub(super) fn pending_values(
    l: &LossOutput,
    z_t_global: &Tensor,
    comm: &mut dyn AllReduce,
) -> Result<Tensor, StepError> {
    let f = |t: &Tensor| -> Result<Tensor, StepError> {
        Ok(t.detach().to_dtype(candle_core::DType::F32)?.reshape(1)?)
    };
    let monitor = target_std(z_t_global)?;
    let v = Tensor::cat(
        &[
            f(&l.total)?,
            f(&l.jepa)?,
            f(&l.sim)?,
            f(&l.std)?,
            f(&l.cov)?,
            f(&monitor)?,
        ],
        0,
    )?;
    let world = comm.world();
    if world == 1 {
        return Ok(v);
    }
    Ok((comm.all_reduce_sum(&v)? / world as f64)?)
}

/// The collapse monitor of z_t `(B, D)`: the mean over dimensions of the unbiased batch std
/// (NaN for fewer than two rows).
pub fn target_std(z_t: &Tensor) -> Result<Tensor, StepError> {
    let z = z_t.detach().to_dtype(candle_core::DType::F32)?;
    let b = z.dim(0)?;
    if b < 2 {
        return Ok(Tensor::new(f32::NAN, z.device())?);
    }
    let zc = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    Ok((zc.sqr()?.sum(0)? / (b - 1) as f64)?.sqrt()?.mean_all()?)
}

/// Effective rank (Roy & Vetterli, 2007; RankMe, Garrido et al., 2023) of z_t `(B, D)`: exp of
/// the entropy of its normalised singular values after centring over the batch; from 1 (every
/// image on one line: collapse) to min(B - 1, D). The smaller Gram matrix (D x D or B x B) is
/// formed on the device and read once; its eigenvalues are found on the host in f64 (O(min(B,
/// D)^3), about 0.1 s for D = 768). NaN for fewer than two rows.
pub fn effective_rank(z_t: &Tensor) -> Result<f64, StepError> {
    let z = z_t.detach().to_dtype(candle_core::DType::F32)?;
    let (b, d) = z.dims2()?;
    if b < 2 {
        return Ok(f64::NAN);
    }
    let zc = z.broadcast_sub(&z.mean_keepdim(0)?)?;
    let gram = if d <= b {
        zc.t()?.matmul(&zc)?
    } else {
        zc.matmul(&zc.t()?)?
    };
    let n = b.min(d);
    let g: Vec<f32> = host_read::vec1(&gram.flatten_all()?)?;
    if g.iter().any(|v| !v.is_finite()) {
        return Ok(f64::NAN);
    }
    let m = nalgebra::DMatrix::from_fn(n, n, |i, j| {
        // symmetric up to rounding: average the two halves
        (g[i * n + j] as f64 + g[j * n + i] as f64) / 2.0
    });
    let sv: Vec<f64> = m
        .symmetric_eigenvalues()
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .collect();
    let total: f64 = sv.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return Ok(if total == 0.0 { 1.0 } else { f64::NAN });
    }
    let entropy: f64 = sv
        .iter()
        .map(|s| s / total)
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    Ok(entropy.exp())
}

/// The end of a step once the gradients are known: AdamW, then the EMA of the target encoder.
pub(super) fn update(
    nets: &JepaNetworks,
    opt: &mut AdamW,
    named: std::collections::HashMap<String, Tensor>,
    hyper: StepHyper,
    lap: &mut Lap,
) -> Result<StepStats, StepError> {
    let optim = opt.step_named(&named, hyper.lr, hyper.wd)?;
    drop(named);
    lap.mark(|t| &mut t.optimizer);
    ema_update(&nets.ema_pairs(), hyper.momentum)?;
    lap.mark(|t| &mut t.ema);
    Ok(optim)
}

#[cfg(test)]
mod tests;

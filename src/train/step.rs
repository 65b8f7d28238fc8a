//! One C-JEPA / I-JEPA training step, as the official `train.py` loop body: targets from the
//! target encoder (no gradient), context encoder on the context masks, predictor, loss, backward,
//! AdamW with this iteration's lr / wd, then the EMA of the target encoder with this iteration's
//! momentum. The `pretrain` stage calls [`train_step`] in a loop.

use candle_core::Tensor;

use super::dist::{self, AllReduce, DistError, Single};
use super::ema::{ema_update, EmaError};
use super::loss::{
    compute_loss, context_embedding, jepa_loss, make_targets, vicreg_terms, LossConfig, LossError,
    LossOutput, Targets,
};
use super::optim::{AdamW, OptimError, StepStats};
use crate::model::{JepaNetworks, ModelError};

/// Errors of a training step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The loss is NaN or infinite; no update was applied.
    #[error("non-finite loss {total} (jepa {jepa}); the step was not applied")]
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
/// (`masks_enc`: nenc context masks, `masks_pred`: npred target masks).
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
    /// terms (computed on the global batch) enter `world` times (see [`train_step_dp`]).
    pub backward_root: Tensor,
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
    /// Optimiser statistics.
    pub optim: StepStats,
}

impl StepLosses {
    /// From the `[total, jepa, sim, std, cov]` of [`mean_losses`] and the optimiser's statistics.
    pub(super) fn new([total, jepa, sim, std, cov]: [f32; 5], optim: StepStats) -> Self {
        Self {
            total,
            jepa,
            sim,
            std,
            cov,
            optim,
        }
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

/// Adds the time since the last lap to a phase (no-op without a timer).
pub(super) struct Lap<'a>(Option<(&'a mut PhaseTimes, std::time::Instant)>);

impl<'a> Lap<'a> {
    pub(super) fn new(t: Option<&'a mut PhaseTimes>) -> Self {
        Self(t.map(|t| (t, std::time::Instant::now())))
    }
    pub(super) fn mark(&mut self, phase: fn(&mut PhaseTimes) -> &mut f64) {
        if let Some((t, last)) = &mut self.0 {
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
    let (loss, backward_root) = if comm.world() == 1 {
        let l = compute_loss(&pred, &targets, &enc_ctx, nenc, cfg)?;
        let root = l.total.clone();
        (l, root)
    } else {
        global_loss(&pred, &targets, &enc_ctx, nenc, cfg, comm)?
    };
    Ok(ForwardOut {
        enc_ctx,
        targets,
        pred,
        loss,
        backward_root,
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
) -> Result<(LossOutput, Tensor), StepError> {
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
    Ok((loss, root))
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
    train_step_dp(nets, batch, cfg, opt, hyper, &mut Single, times)
}

/// [`train_step_timed`] for one rank of a data-parallel group: `batch` is this rank's shard of
/// the global batch. The JEPA term is this shard's; the VICReg terms are computed on the global
/// batch (gathered from every rank, see [`global_loss`]). The loss values are averaged over the
/// ranks (so all ranks agree on a divergence) and so are the gradients, before the optimiser
/// step; every rank then applies the same update, the one of a one-process run on the global
/// batch up to float rounding. With [`Single`] this is exactly [`train_step_timed`].
pub fn train_step_dp(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    opt: &mut AdamW,
    hyper: StepHyper,
    comm: &mut dyn AllReduce,
    times: Option<&mut PhaseTimes>,
) -> Result<StepLosses, StepError> {
    let mut lap = Lap::new(times);
    let fwd = forward_loss_timed(nets, batch, cfg, &mut lap, comm)?;
    let losses = mean_losses(&fwd.loss, comm)?;
    lap.mark(|t| &mut t.loss);
    let grads = fwd.backward_root.backward()?;
    drop(fwd);
    lap.mark(|t| &mut t.backward);
    let named = dist::mean_grads(comm, opt.named_grads(&grads))?;
    drop(grads);
    let optim = update(nets, opt, named, hyper, &mut lap)?;
    Ok(StepLosses::new(losses, optim))
}

/// The five loss values averaged over the ranks: total, jepa, sim, std, cov. A non-finite total
/// is [`StepError::NonFinite`] (on every rank alike).
pub(super) fn mean_losses(l: &LossOutput, comm: &mut dyn AllReduce) -> Result<[f32; 5], StepError> {
    let scalar = |t: &Tensor| -> Result<f32, StepError> {
        Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
    };
    let local = [
        scalar(&l.total)?,
        scalar(&l.jepa)?,
        scalar(&l.sim)?,
        scalar(&l.std)?,
        scalar(&l.cov)?,
    ];
    let dev = l.total.device().clone();
    let means: [f32; 5] = dist::mean_scalars(comm, &local, &dev)?
        .try_into()
        .expect("five values in, five out");
    if !means[0].is_finite() {
        return Err(StepError::NonFinite {
            total: means[0],
            jepa: means[1],
        });
    }
    Ok(means)
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

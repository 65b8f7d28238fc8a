//! One C-JEPA / I-JEPA training step, as the official `train.py` loop body: targets from the
//! target encoder (no gradient), context encoder on the context masks, predictor, loss, backward,
//! AdamW with this iteration's lr / wd, then the EMA of the target encoder with this iteration's
//! momentum. The `pretrain` stage calls [`train_step`] in a loop.

use candle_core::Tensor;

use super::ema::{ema_update, EmaError};
use super::loss::{compute_loss, make_targets, LossConfig, LossError, LossOutput, Targets};
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

/// Forward pass and loss of one batch (gradients recorded on the encoder and predictor only).
pub fn forward_loss(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
) -> Result<ForwardOut, StepError> {
    let nenc = batch.masks_enc.len();
    let h = nets
        .target_encoder
        .forward_features(batch.images, None)?
        .detach();
    let targets = make_targets(&h, batch.masks_pred, nenc, cfg)?;
    let enc_ctx = nets
        .encoder
        .forward_features(batch.images, Some(batch.masks_enc))?;
    let pred = nets
        .predictor
        .forward(&enc_ctx, batch.masks_enc, batch.masks_pred)?;
    let loss = compute_loss(&pred, &targets, &enc_ctx, nenc, cfg)?;
    Ok(ForwardOut {
        enc_ctx,
        targets,
        pred,
        loss,
    })
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
    let fwd = forward_loss(nets, batch, cfg)?;
    let l = &fwd.loss;
    let scalar = |t: &Tensor| -> Result<f32, StepError> {
        Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
    };
    let (total, jepa) = (scalar(&l.total)?, scalar(&l.jepa)?);
    if !total.is_finite() {
        return Err(StepError::NonFinite { total, jepa });
    }
    let (sim, std, cov) = (scalar(&l.sim)?, scalar(&l.std)?, scalar(&l.cov)?);
    let grads = l.total.backward()?;
    drop(fwd);
    let optim = opt.step(&grads, hyper.lr, hyper.wd)?;
    drop(grads);
    ema_update(&nets.ema_pairs(), hyper.momentum)?;
    Ok(StepLosses {
        total,
        jepa,
        sim,
        std,
        cov,
        optim,
    })
}

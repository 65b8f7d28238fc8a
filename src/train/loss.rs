//! I-JEPA / C-JEPA losses (METHOD.md §4, golden README §5.7).
//!
//! - Targets: target-encoder output, LayerNorm without affine (eps `target_ln_eps`, 1e-5), gathered
//!   with the target masks (mask-major) and repeated per context mask.
//! - JEPA term: smooth-L1 (beta 1) or squared error, averaged over all elements.
//! - C-JEPA adds VICReg on pooled embeddings: `L = L_jepa + b_vic*(b_sim*L_sim + b_std*L_std +
//!   b_cov*L_cov)`, z_c = per-image mean of the context-encoder tokens, z_t = per-image mean of the
//!   layer-normed target tokens (no gradient). `method: ijepa` sets b_vic to 0, and `vic_terms`
//!   switches the ablations of C-JEPA Table 3 (var/cov only, invariance only).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::layers::layer_norm_plain;
use crate::model::tokens::{apply_masks, repeat_interleave_batch, MaskIndices};
use crate::model::ModelError;

/// Errors of the loss computation.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// A configuration value is out of range.
    #[error("loss config: field `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// Tensors that don't fit together.
    #[error("loss input: {0}")]
    Shape(String),
    /// From the model helpers (masks).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, LossError>;

/// Which method the pretraining stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// I-JEPA: the JEPA term only (b_vic = 0).
    Ijepa,
    /// C-JEPA: JEPA + VICReg.
    #[default]
    Cjepa,
}

/// The JEPA regression term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JepaLossKind {
    /// Smooth-L1 with `smooth_l1_beta` (official code).
    #[default]
    SmoothL1,
    /// Squared error (paper's formula).
    L2,
}

/// Which VICReg terms are switched on (C-JEPA component ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VicTerms {
    /// Invariance + variance + covariance (C-JEPA).
    #[default]
    All,
    /// Variance + covariance only.
    VarCov,
    /// Invariance only.
    Invariance,
}

/// Loss settings (METHOD.md §4 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// `ijepa` (no VICReg) or `cjepa`.
    pub method: Method,
    /// Smooth-L1 or L2 JEPA term.
    pub kind: JepaLossKind,
    /// Beta of the smooth-L1.
    pub smooth_l1_beta: f64,
    /// Epsilon of the affine-free LayerNorm applied to the target features.
    pub target_ln_eps: f64,
    /// b_vic: weight of the whole VICReg block.
    pub vic_weight: f64,
    /// b_sim: invariance coefficient.
    pub vic_sim_coeff: f64,
    /// b_std: variance coefficient.
    pub vic_std_coeff: f64,
    /// b_cov: covariance coefficient.
    pub vic_cov_coeff: f64,
    /// Epsilon inside the std of the variance term.
    pub vic_var_eps: f64,
    /// Which VICReg terms are on.
    pub vic_terms: VicTerms,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            method: Method::Cjepa,
            kind: JepaLossKind::SmoothL1,
            smooth_l1_beta: 1.0,
            target_ln_eps: 1e-5,
            vic_weight: 0.001,
            vic_sim_coeff: 25.0,
            vic_std_coeff: 25.0,
            vic_cov_coeff: 1.0,
            vic_var_eps: 1e-4,
            vic_terms: VicTerms::All,
        }
    }
}

impl LossConfig {
    /// I-JEPA defaults.
    pub fn ijepa() -> Self {
        Self {
            method: Method::Ijepa,
            ..Self::default()
        }
    }

    /// C-JEPA defaults.
    pub fn cjepa() -> Self {
        Self::default()
    }

    /// Effective weights `(w_sim, w_std, w_cov)` of the raw terms in the total (b_vic folded in).
    pub fn term_weights(&self) -> (f64, f64, f64) {
        let b = if self.method == Method::Ijepa {
            0.0
        } else {
            self.vic_weight
        };
        match self.vic_terms {
            VicTerms::All => (
                b * self.vic_sim_coeff,
                b * self.vic_std_coeff,
                b * self.vic_cov_coeff,
            ),
            VicTerms::VarCov => (0.0, b * self.vic_std_coeff, b * self.vic_cov_coeff),
            VicTerms::Invariance => (b * self.vic_sim_coeff, 0.0, 0.0),
        }
    }

    /// Checks the numbers; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("smooth_l1_beta", self.smooth_l1_beta > 0.0),
            ("target_ln_eps", self.target_ln_eps > 0.0),
            ("vic_weight", self.vic_weight >= 0.0),
            ("vic_sim_coeff", self.vic_sim_coeff >= 0.0),
            ("vic_std_coeff", self.vic_std_coeff >= 0.0),
            ("vic_cov_coeff", self.vic_cov_coeff >= 0.0),
            ("vic_var_eps", self.vic_var_eps >= 0.0),
        ];
        for (field, ok) in checks {
            if !ok {
                return Err(LossError::Config {
                    field,
                    msg: "must be a finite value >= 0 (> 0 for beta and eps)".into(),
                });
            }
        }
        Ok(())
    }
}

/// Regression targets of one batch (no gradient).
#[derive(Debug, Clone)]
pub struct Targets {
    /// `(npred*nenc*B, Kp, D)`, same row order as the predictions.
    pub feats: Tensor,
    /// Per-image mean of the layer-normed target tokens, `(B, D)`.
    pub z_t: Tensor,
}

/// Builds the targets from the target encoder's full output `(B, N, D)` (official `forward_target`).
pub fn make_targets(
    target_out: &Tensor,
    masks_pred: &[Tensor],
    nenc: usize,
    cfg: &LossConfig,
) -> Result<Targets> {
    let h = layer_norm_plain(&target_out.detach(), cfg.target_ln_eps)?;
    let (b, n, _) = h.dims3()?;
    let mp = MaskIndices::from_tensors(masks_pred, b, n, "masks_pred")?;
    let feats = repeat_interleave_batch(&apply_masks(&h, &mp)?, b, nenc)?;
    let z_t = h.mean(1)?;
    Ok(Targets { feats, z_t })
}

/// JEPA term, averaged over all elements.
pub fn jepa_loss(pred: &Tensor, target: &Tensor, cfg: &LossConfig) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(LossError::Shape(format!(
            "predictions {:?} vs targets {:?}",
            pred.dims(),
            target.dims()
        )));
    }
    let d = (pred - target)?;
    let per = match cfg.kind {
        JepaLossKind::L2 => d.sqr()?,
        JepaLossKind::SmoothL1 => {
            let beta = cfg.smooth_l1_beta;
            let ad = d.abs()?;
            let quad = (d.sqr()? * (0.5 / beta))?;
            let lin = (&ad - 0.5 * beta)?;
            ad.lt(beta)?.where_cond(&quad, &lin)?
        }
    };
    Ok(per.mean_all()?)
}

/// Per-image context embedding z_c `(B, D)`: mean over the context tokens (and over the context
/// masks when nenc > 1) of `enc_ctx (nenc*B, Ke, D)`.
pub fn context_embedding(enc_ctx: &Tensor, nenc: usize) -> Result<Tensor> {
    let (rows, k, d) = enc_ctx.dims3()?;
    if nenc == 0 || rows % nenc != 0 {
        return Err(LossError::Shape(format!(
            "{rows} context rows do not split into {nenc} masks"
        )));
    }
    if nenc == 1 {
        return Ok(enc_ctx.mean(1)?);
    }
    Ok(enc_ctx
        .reshape((nenc, rows / nenc, k, d))?
        .mean(2)?
        .mean(0)?)
}

/// Raw VICReg terms `(sim, std, cov)` of C-JEPA's pooled form (see the module doc).
pub fn vicreg_terms(z_c: &Tensor, z_t: &Tensor, var_eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, d) = z_c.dims2()?;
    if z_t.dims() != z_c.dims() {
        return Err(LossError::Shape(format!(
            "z_c {:?} vs z_t {:?}",
            z_c.dims(),
            z_t.dims()
        )));
    }
    let sim = (z_c - z_t.detach())?.sqr()?.mean_all()?;
    if b < 2 {
        let zero = Tensor::zeros((), z_c.dtype(), z_c.device())?;
        return Ok((sim, zero.clone(), zero));
    }
    let zc = z_c.broadcast_sub(&z_c.mean_keepdim(0)?)?;
    let var = (zc.sqr()?.sum(0)? / (b - 1) as f64)?;
    let std = ((var + var_eps)?.sqrt()?.affine(-1.0, 1.0)?.relu()?).mean_all()?;
    let cov = (zc.t()?.matmul(&zc)? / (b - 1) as f64)?;
    let off = Tensor::eye(d, DType::F32, z_c.device())?
        .affine(-1.0, 1.0)?
        .to_dtype(cov.dtype())?;
    let cov = ((cov.sqr()? * off)?.sum_all()? / d as f64)?;
    Ok((sim, std, cov))
}

/// Loss terms of one batch (rank-0 tensors). `sim`, `std`, `cov` are the raw terms (before
/// b_vic and the coefficients); `total` carries the gradient.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// `jepa + w_sim*sim + w_std*std + w_cov*cov`.
    pub total: Tensor,
    /// JEPA term.
    pub jepa: Tensor,
    /// VICReg invariance term.
    pub sim: Tensor,
    /// VICReg variance term.
    pub std: Tensor,
    /// VICReg covariance term.
    pub cov: Tensor,
}

/// All loss terms from the predictions, the targets and the context encoder output.
pub fn compute_loss(
    pred: &Tensor,
    targets: &Targets,
    enc_ctx: &Tensor,
    nenc: usize,
    cfg: &LossConfig,
) -> Result<LossOutput> {
    cfg.validate()?;
    let jepa = jepa_loss(pred, &targets.feats, cfg)?;
    let z_c = context_embedding(enc_ctx, nenc)?;
    let (sim, std, cov) = vicreg_terms(&z_c, &targets.z_t, cfg.vic_var_eps)?;
    let (ws, wv, wc) = cfg.term_weights();
    if z_c.dim(0)? < 2 && (wv != 0.0 || wc != 0.0) {
        return Err(LossError::Shape(
            "the VICReg variance/covariance terms need a batch of at least 2 images".into(),
        ));
    }
    let mut total = jepa.clone();
    for (w, t) in [(ws, &sim), (wv, &std), (wc, &cov)] {
        if w != 0.0 {
            total = (total + (t * w)?)?;
        }
    }
    Ok(LossOutput {
        total,
        jepa,
        sim,
        std,
        cov,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn smooth_l1_both_branches() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[0.5f32, 3.0, -2.0, 0.0], &dev).unwrap();
        let t = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let l = jepa_loss(&p, &t, &LossConfig::default())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = (0.125 + 2.5 + 1.5 + 0.0) / 4.0;
        assert!((l - want).abs() < 1e-7);
        let cfg = LossConfig {
            kind: JepaLossKind::L2,
            ..LossConfig::default()
        };
        let l = jepa_loss(&p, &t, &cfg).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - (0.25 + 9.0 + 4.0) / 4.0).abs() < 1e-6);
    }

    #[test]
    fn vicreg_by_hand() {
        let dev = Device::Cpu;
        // B=3, D=2
        let zc = Tensor::new(&[[1f32, 0.], [0., 2.], [2., 1.]], &dev).unwrap();
        let zt = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let (sim, std, cov) = vicreg_terms(&zc, &zt, 1e-4).unwrap();
        assert!((sim.to_scalar::<f32>().unwrap() - 10.0 / 6.0).abs() < 1e-6);
        // var = [1, 1]: std term = relu(1 - sqrt(1.0001)) = 0
        assert!(std.to_scalar::<f32>().unwrap().abs() < 1e-7);
        // cov[0,1] = ((0)(-1) + (-1)(1) + (1)(0)) / 2 = -0.5: 2 * 0.25 / 2
        assert!((cov.to_scalar::<f32>().unwrap() - 0.25).abs() < 1e-6);
    }

    #[test]
    fn method_and_ablations_set_weights() {
        assert_eq!(LossConfig::ijepa().term_weights(), (0.0, 0.0, 0.0));
        let close = |a: (f64, f64, f64), b: (f64, f64, f64)| {
            (a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12 && (a.2 - b.2).abs() < 1e-12
        };
        let c = LossConfig {
            vic_terms: VicTerms::VarCov,
            ..LossConfig::cjepa()
        };
        assert!(close(c.term_weights(), (0.0, 0.025, 0.001)));
        let c = LossConfig {
            vic_terms: VicTerms::Invariance,
            ..LossConfig::cjepa()
        };
        assert!(close(c.term_weights(), (0.025, 0.0, 0.0)));
        let y: LossConfig =
            serde_yaml::from_str("method: ijepa\nkind: l2\nvic_terms: var_cov\n").unwrap();
        assert_eq!(y.method, Method::Ijepa);
        assert_eq!(y.kind, JepaLossKind::L2);
        assert!(serde_yaml::from_str::<LossConfig>("foo: 1\n").is_err());
    }
}

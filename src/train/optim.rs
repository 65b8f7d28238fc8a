//! AdamW with the official I-JEPA parameter groups and saveable state (METHOD.md §5).
//!
//! Semantics of `torch.optim.AdamW` (single-tensor path): decoupled decay `p *= 1 - lr*wd` on the
//! decayed group, `m = lerp(m, g, 1-b1)`, `v = b2*v + (1-b2)*g^2`, bias corrections, and
//! `p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)`. Decayed = names without `bias` whose tensor is
//! not 1-D (so the (1,1,Dp) `mask_token` is decayed); biases and LayerNorm parameters are not.
//! lr and wd are set from outside at every step (the schedules). Parameters without a gradient are
//! skipped like in PyTorch. The moments and per-parameter step counts can be saved and restored,
//! so a resumed run is bit-identical. candle's own `AdamW` has one group and private state.
//! From the second step on, f32 CPU parameters are updated in place by the one-pass kernels of
//! [`super::fused_update`] (same f32 arithmetic) while the fused kernels are on.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::fused_update;

/// Errors of the optimiser.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A configuration value is out of range.
    #[error("optimizer config: field `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// Saved state that does not fit the parameters.
    #[error("optimizer state `{key}`: {msg}")]
    State { key: String, msg: String },
    /// Two parameters with the same name.
    #[error("optimizer: parameter `{0}` is given twice")]
    Duplicate(String),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, OptimError>;

/// AdamW constants (lr and wd come per step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Clip the global gradient 2-norm to this value before the update (`clip_grad_norm_`); none by default.
    pub clip_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_grad_norm: None,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, msg: &str| {
            Err(OptimError::Config {
                field,
                msg: msg.into(),
            })
        };
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "must lie in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "must lie in [0, 1)");
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", "must be > 0");
        }
        if let Some(c) = self.clip_grad_norm {
            if c.is_nan() || c <= 0.0 {
                return bad("clip_grad_norm", "must be > 0 (or absent)");
            }
        }
        Ok(())
    }
}

/// The official decay rule: decayed unless the name contains `bias` or the tensor is 1-D.
pub fn is_decayed(name: &str, dims: &[usize]) -> bool {
    !name.contains("bias") && dims.len() != 1
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    decay: bool,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    step: u64,
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    /// Global gradient 2-norm before clipping (computed only when clipping is on or
    /// [`AdamW::measure_grad_norm`] asks for it).
    pub grad_norm: Option<f64>,
    /// Parameters updated (those with a gradient).
    pub updated: usize,
}

/// AdamW over named parameters, in the order given.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    measure_norm: bool,
}

impl AdamW {
    /// One entry per parameter; the group (decayed or not) follows [`is_decayed`].
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(OptimError::Duplicate(name));
            }
            let decay = is_decayed(&name, var.dims());
            out.push(Param {
                name,
                var,
                decay,
                exp_avg: None,
                exp_avg_sq: None,
                step: 0,
            });
        }
        Ok(Self {
            cfg,
            params: out,
            measure_norm: false,
        })
    }

    /// Also compute the global gradient 2-norm when clipping is off ([`StepStats::grad_norm`]):
    /// one device-to-host read per step, for recording a run, never needed to train.
    pub fn measure_grad_norm(&mut self, on: bool) {
        self.measure_norm = on;
    }

    /// The constants.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Names of the decayed and of the non-decayed parameters.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let d = self
            .params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
            .collect();
        let n = self
            .params
            .iter()
            .filter(|p| !p.decay)
            .map(|p| p.name.as_str())
            .collect();
        (d, n)
    }

    /// Steps taken so far (the largest per-parameter count).
    pub fn step_count(&self) -> u64 {
        self.params.iter().map(|p| p.step).max().unwrap_or(0)
    }

    /// Gradients of the parameters from a backward pass, by name (parameters without one are absent).
    pub fn named_grads(&self, grads: &GradStore) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .filter_map(|p| {
                grads
                    .get(p.var.as_tensor())
                    .map(|g| (p.name.clone(), g.clone()))
            })
            .collect()
    }

    /// One update from a backward pass with the learning rate and weight decay of this iteration.
    pub fn step(&mut self, grads: &GradStore, lr: f64, wd: f64) -> Result<StepStats> {
        let named = self.named_grads(grads);
        self.step_named(&named, lr, wd)
    }

    /// One update from gradients given by parameter name (e.g. after an all-reduce).
    pub fn step_named(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        wd: f64,
    ) -> Result<StepStats> {
        let mut stats = StepStats::default();
        let mut scale = None;
        let clip = self.cfg.clip_grad_norm;
        if clip.is_some() || self.measure_norm {
            let mut sq = Vec::new();
            for p in &self.params {
                if let Some(g) = grads.get(&p.name) {
                    sq.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
                }
            }
            let total = if sq.is_empty() {
                0.0
            } else {
                // one device-to-host read per step, with clipping or measuring on only
                crate::util::host_read::scalar::<f32>(&Tensor::stack(&sq, 0)?.sum_all()?)? as f64
            };
            let norm = total.sqrt();
            stats.grad_norm = Some(norm);
            if let Some(max_norm) = clip {
                let coef = max_norm / (norm + 1e-6);
                if coef < 1.0 {
                    scale = Some(coef);
                }
            }
        }
        let (b1, b2, eps) = (self.cfg.beta1, self.cfg.beta2, self.cfg.eps);
        for p in self.params.iter_mut() {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            if g.dims() != p.var.dims() {
                return Err(OptimError::State {
                    key: p.name.clone(),
                    msg: format!(
                        "gradient shape {:?} vs parameter {:?}",
                        g.dims(),
                        p.var.dims()
                    ),
                });
            }
            let g = match scale {
                Some(c) => g.affine(c, 0.0)?,
                None => g.clone(),
            };
            let g = g.detach();
            p.step += 1;
            let t = p.step as i32;
            if let (Some(m), Some(v)) = (&p.exp_avg, &p.exp_avg_sq) {
                let ts = [p.var.as_tensor(), &g, m, v];
                if fused_update::applies(&ts) || fused_update::applies_cuda(&ts) {
                    // One in-place pass per tensor; bit-identical to the chain below.
                    let bc1 = 1.0 - b1.powi(t);
                    let bc2 = 1.0 - b2.powi(t);
                    let decay = (p.decay && wd != 0.0).then_some(1.0 - lr * wd);
                    fused_update::adamw_inplace(
                        p.var.as_tensor(),
                        &g,
                        m,
                        v,
                        b1,
                        b2,
                        eps,
                        decay,
                        bc2,
                        lr / bc1,
                    )?;
                    stats.updated += 1;
                    continue;
                }
            }
            let mut w = p.var.as_detached_tensor();
            if p.decay && wd != 0.0 {
                w = w.affine(1.0 - lr * wd, 0.0)?;
            }
            let m = match &p.exp_avg {
                // torch: exp_avg.lerp_(grad, 1 - beta1)
                Some(m) => (m + ((&g - m)? * (1.0 - b1))?)?,
                None => (&g * (1.0 - b1))?,
            };
            let v = match &p.exp_avg_sq {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            let step_size = lr / bc1;
            let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
            let w = (w - ((&m / &denom)? * step_size)?)?;
            p.var.set(&w)?;
            p.exp_avg = Some(m);
            p.exp_avg_sq = Some(v);
            stats.updated += 1;
        }
        Ok(stats)
    }

    /// The state to checkpoint (copies): `<name>.exp_avg`, `<name>.exp_avg_sq` (f32) and
    /// `<name>.step` (i64 scalar) for every parameter that has taken a step.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            if let (Some(m), Some(v)) = (&p.exp_avg, &p.exp_avg_sq) {
                // copies: the fused update changes the moments in place
                out.insert(format!("{}.exp_avg", p.name), m.copy()?);
                out.insert(format!("{}.exp_avg_sq", p.name), v.copy()?);
                out.insert(
                    format!("{}.step", p.name),
                    Tensor::new(p.step as i64, m.device())?,
                );
            }
        }
        Ok(out)
    }

    /// Restores `state_tensors` output. Parameters absent from it start fresh; a key that names no
    /// parameter, a wrong shape or a partial entry is an error.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut used = 0usize;
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let keys = ["exp_avg", "exp_avg_sq", "step"].map(|s| format!("{}.{s}", p.name));
            let got: Vec<Option<&Tensor>> = keys.iter().map(|k| state.get(k)).collect();
            match (got[0], got[1], got[2]) {
                (None, None, None) => loaded.push(None),
                (Some(m), Some(v), Some(s)) => {
                    for (k, t) in [(&keys[0], m), (&keys[1], v)] {
                        if t.dims() != p.var.dims() {
                            return Err(OptimError::State {
                                key: k.clone(),
                                msg: format!(
                                    "shape {:?}, the parameter has {:?}",
                                    t.dims(),
                                    p.var.dims()
                                ),
                            });
                        }
                    }
                    let step = s.to_dtype(DType::I64)?.to_scalar::<i64>()?;
                    if step < 1 {
                        return Err(OptimError::State {
                            key: keys[2].clone(),
                            msg: format!("step {step} < 1"),
                        });
                    }
                    let dev = p.var.device();
                    let m = m.to_device(dev)?.to_dtype(p.var.dtype())?.copy()?;
                    let v = v.to_device(dev)?.to_dtype(p.var.dtype())?.copy()?;
                    loaded.push(Some((m, v, step as u64)));
                    used += 3;
                }
                _ => {
                    return Err(OptimError::State {
                        key: p.name.clone(),
                        msg: "incomplete entry: exp_avg, exp_avg_sq and step must all be present"
                            .into(),
                    })
                }
            }
        }
        if used != state.len() {
            let known: std::collections::HashSet<String> = self
                .params
                .iter()
                .flat_map(|p| ["exp_avg", "exp_avg_sq", "step"].map(|s| format!("{}.{s}", p.name)))
                .collect();
            let extra = state
                .keys()
                .find(|k| !known.contains(*k))
                .cloned()
                .unwrap_or_default();
            return Err(OptimError::State {
                key: extra,
                msg: "names no parameter of this optimizer".into(),
            });
        }
        for (p, l) in self.params.iter_mut().zip(loaded) {
            match l {
                Some((m, v, s)) => {
                    p.exp_avg = Some(m);
                    p.exp_avg_sq = Some(v);
                    p.step = s;
                }
                None => {
                    p.exp_avg = None;
                    p.exp_avg_sq = None;
                    p.step = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn vars() -> Vec<(String, Var)> {
        let dev = Device::Cpu;
        vec![
            (
                "w.weight".into(),
                Var::new(&[[1f32, -2.], [0.5, 3.]], &dev).unwrap(),
            ),
            ("w.bias".into(), Var::new(&[0.1f32, -0.1], &dev).unwrap()),
            (
                "mask_token".into(),
                Var::new(&[[[0.2f32, 0.3]]], &dev).unwrap(),
            ),
        ]
    }

    fn grads(s: f32) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut g = HashMap::new();
        g.insert(
            "w.weight".into(),
            Tensor::new(&[[0.1f32 * s, -0.2], [1e-9, 0.0]], &dev).unwrap(),
        );
        g.insert(
            "w.bias".into(),
            Tensor::new(&[0.3f32, -0.4 * s], &dev).unwrap(),
        );
        g.insert(
            "mask_token".into(),
            Tensor::new(&[[[0.01f32, s]]], &dev).unwrap(),
        );
        g
    }

    #[test]
    fn groups_follow_official_rule() {
        let opt = AdamW::new(vars(), AdamWConfig::default()).unwrap();
        let (d, n) = opt.groups();
        assert_eq!(d, vec!["w.weight", "mask_token"]);
        assert_eq!(n, vec!["w.bias"]);
    }

    #[test]
    fn first_step_is_sign_step_with_decay() {
        let v = vars();
        let mut opt = AdamW::new(v.clone(), AdamWConfig::default()).unwrap();
        opt.step_named(&grads(1.0), 0.01, 0.5).unwrap();
        let w = v[0].1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // p*(1-lr*wd) - lr*g/(|g|+eps)
        let want0 = 1.0 * (1.0 - 0.005) - 0.01;
        assert!((w[0] - want0).abs() < 1e-6, "{} {}", w[0], want0);
        assert!((w[3] - 3.0 * 0.995).abs() < 1e-6);
        let b = v[1].1.to_vec1::<f32>().unwrap();
        assert!((b[0] - (0.1 - 0.01)).abs() < 1e-6, "bias is not decayed");
    }

    #[test]
    fn resume_is_bit_identical() {
        let dev = Device::Cpu;
        let run = |split: bool| -> Vec<f32> {
            let v: Vec<(String, Var)> = vars()
                .into_iter()
                .map(|(n, v)| (n, Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap()))
                .collect();
            let mut opt = AdamW::new(
                v.clone(),
                AdamWConfig {
                    clip_grad_norm: Some(0.5),
                    ..Default::default()
                },
            )
            .unwrap();
            for s in 0..5 {
                if split && s == 2 {
                    let st = opt.state_tensors().unwrap();
                    opt = AdamW::new(
                        v.clone(),
                        AdamWConfig {
                            clip_grad_norm: Some(0.5),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    opt.load_state(&st).unwrap();
                }
                opt.step_named(&grads(1.0 + s as f32), 1e-2, 0.1).unwrap();
            }
            let _ = &dev;
            v.iter()
                .flat_map(|(_, v)| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn bad_state_is_rejected() {
        let mut opt = AdamW::new(vars(), AdamWConfig::default()).unwrap();
        opt.step_named(&grads(1.0), 0.01, 0.0).unwrap();
        let mut st = opt.state_tensors().unwrap();
        st.insert("nope.step".into(), Tensor::new(1i64, &Device::Cpu).unwrap());
        assert!(opt.load_state(&st).is_err());
        let mut st = opt.state_tensors().unwrap();
        st.remove("w.bias.exp_avg");
        assert!(opt.load_state(&st).is_err());
    }
}

//! A bank of linear classification heads trained side by side on one input (the linear-probe
//! sweep of I-JEPA / VISSL, EVALS.md §1.3): `linear` heads, or `bn_linear` heads (BatchNorm1d,
//! affine, eps 1e-5, momentum 0.1, then Linear), with per-head learning-rate multipliers and
//! weight decays, and their SGD / LARS step (VISSL `vissl/optimizers/lars.py`: `d = g + wd p`;
//! for the weight matrix `d *= eta ||p|| / ||d||` per head; `mu = m mu + d`; `p -= lr mu`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};

/// BN constants (VISSL `eval_mlp` = torch BatchNorm1d defaults).
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// Init std of the linear weights.
const INIT_STD: f64 = 0.01;

/// Heads of one (feature set, kind), laid out so that a forward pass is one GEMM for all of
/// them: weights `(D_in, H, C)` viewed as `(D_in, H C)`, bias `(H, C)`, BN affine `(D_in, H)`
/// and one pair of running statistics (every BN head sees the same input). A BN head's affine
/// is folded into its weights: `(x_n g + b) W = x_n (g * W) + b W`.
pub struct HeadBank {
    /// Prefix of the bank's tensors in a checkpoint (e.g. `last_bn`).
    pub tag: String,
    /// Indices of the bank's heads in the whole sweep, in bank order.
    pub heads: Vec<usize>,
    w: Var,
    b: Var,
    gamma: Option<Var>,
    beta: Option<Var>,
    /// Momentum buffers by parameter name.
    mom: HashMap<&'static str, Tensor>,
    run_mean: Option<Tensor>,
    run_var: Option<Tensor>,
    /// Per-head learning-rate multipliers `(H,)`.
    lr_mult: Tensor,
    /// Per-head weight decays `(H,)`.
    wd: Tensor,
}

/// How a bank steps: PyTorch SGD with momentum (optionally Nesterov), or LARS (VISSL /
/// Barlow Twins) with trust coefficient `eta` on the weight matrices only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadOptim {
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum (SGD only).
    pub nesterov: bool,
    /// `Some(eta)`: LARS trust ratio per head on `w`.
    pub lars_eta: Option<f64>,
}

impl HeadBank {
    /// A bank of `heads.len()` heads on `din` inputs and `classes` outputs, with BatchNorm in
    /// front when `bn`; head `j` has learning-rate multiplier `lr_mults[j]` and weight decay
    /// `wds[j]`. Weights are drawn head by head from `rng` (trunc normal, std 0.01).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: String,
        bn: bool,
        heads: Vec<usize>,
        lr_mults: &[f64],
        wds: &[f64],
        din: usize,
        classes: usize,
        rng: &mut rand_chacha::ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let h = heads.len();
        // Drawn head by head, each as PyTorch's (C, D_in) weight, then laid out (D_in, H, C).
        let mut w = vec![0f32; din * h * classes];
        for j in 0..h {
            let hw = crate::model::init::trunc_normal(rng, classes * din, INIT_STD);
            for c in 0..classes {
                for d in 0..din {
                    w[(d * h + j) * classes + c] = hw[c * din + d];
                }
            }
        }
        let w = Var::from_tensor(&Tensor::from_vec(w, (din, h, classes), dev)?)?;
        let b = Var::zeros((h, classes), DType::F32, dev)?;
        if lr_mults.len() != h || wds.len() != h {
            return Err(Error::Data(format!(
                "head bank {tag}: {h} heads but {} lr multipliers and {} weight decays",
                lr_mults.len(),
                wds.len()
            )));
        }
        let col = |v: &[f64]| -> Result<Tensor> {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Ok(Tensor::from_vec(v, h, dev)?)
        };
        Ok(HeadBank {
            tag,
            w,
            b,
            gamma: bn
                .then(|| Var::ones((din, h), DType::F32, dev))
                .transpose()?,
            beta: bn
                .then(|| Var::zeros((din, h), DType::F32, dev))
                .transpose()?,
            mom: HashMap::new(),
            run_mean: bn
                .then(|| Tensor::zeros((1, din), DType::F32, dev))
                .transpose()?,
            run_var: bn
                .then(|| Tensor::ones((1, din), DType::F32, dev))
                .transpose()?,
            lr_mult: col(lr_mults)?,
            wd: col(wds)?,
            heads,
        })
    }

    /// Logits `(H, B, C)` of `x (B, D_in)`; in training the BN running stats are updated.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (din, h, c) = self.w.dims3()?;
        let n = x.dim(0)?;
        let (inp, w, bias) = match (&self.gamma, &self.beta) {
            (Some(g), Some(bt)) => {
                let (mean, var) = if train {
                    let mean = x.mean_keepdim(0)?;
                    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)?;
                    let unbiased = if n > 1 {
                        (var.detach() * (n as f64 / (n as f64 - 1.0)))?
                    } else {
                        var.detach()
                    };
                    let rm = self.run_mean.take().expect("bn");
                    let rv = self.run_var.take().expect("bn");
                    let rm = ((rm * (1.0 - BN_MOMENTUM))? + (mean.detach() * BN_MOMENTUM)?)?;
                    let rv = ((rv * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
                    self.run_mean = Some(rm);
                    self.run_var = Some(rv);
                    (mean, var)
                } else {
                    (
                        self.run_mean.clone().expect("bn"),
                        self.run_var.clone().expect("bn"),
                    )
                };
                let xn = x
                    .broadcast_sub(&mean)?
                    .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
                let w3 = self.w.as_tensor();
                let w = w3.broadcast_mul(&g.as_tensor().unsqueeze(2)?)?;
                let bias = w3
                    .broadcast_mul(&bt.as_tensor().unsqueeze(2)?)?
                    .sum(0)?
                    .add(self.b.as_tensor())?;
                (xn, w, bias)
            }
            _ => (
                x.clone(),
                self.w.as_tensor().clone(),
                self.b.as_tensor().clone(),
            ),
        };
        let logits = crate::model::precision::matmul(&inp, &w.reshape((din, h * c))?)?
            .reshape((n, h, c))?
            .broadcast_add(&bias)?;
        Ok(logits.transpose(0, 1)?)
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        let mut v = vec![("w", &self.w), ("b", &self.b)];
        if let (Some(g), Some(b)) = (&self.gamma, &self.beta) {
            v.push(("gamma", g));
            v.push(("beta", b));
        }
        v
    }

    /// A per-head `(H,)` vector shaped to broadcast against parameter `name`.
    fn per_head(v: &Tensor, name: &str) -> Result<Tensor> {
        let h = v.dim(0)?;
        Ok(match name {
            "w" => v.reshape((1, h, 1))?,
            "b" => v.reshape((h, 1))?,
            _ => v.reshape((1, h))?,
        })
    }

    /// One optimiser step from `grads` at learning rate `lr`. Weight decay applies to the
    /// linear weight and bias, never to the BN affine (VISSL `regularize_bn: false`).
    pub fn step(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        lr: f64,
        opt: &HeadOptim,
    ) -> Result<()> {
        let m = opt.momentum;
        let mut new_mom = Vec::new();
        for (name, var) in self.params() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let p = var.as_detached_tensor();
            let mut d = g.detach();
            if name == "w" || name == "b" {
                d = (d + p.broadcast_mul(&Self::per_head(&self.wd, name)?)?)?;
            }
            if let (Some(eta), "w") = (opt.lars_eta, name) {
                // Trust ratio per head: norms over each head's (D_in, C) slice.
                let pn = p.sqr()?.sum_keepdim((0, 2))?.sqrt()?;
                let un = d.sqr()?.sum_keepdim((0, 2))?.sqrt()?;
                let ok = (&pn * &un)?.gt(0.0)?;
                let safe = (&un + ok.to_dtype(DType::F32)?.affine(-1.0, 1.0)?)?;
                let q = ok.where_cond(&(pn * eta)?.div(&safe)?, &Tensor::ones_like(&un)?)?;
                d = d.broadcast_mul(&q)?;
            }
            let mu = match self.mom.get(name) {
                Some(b) => ((b * m)? + &d)?,
                None => d.clone(),
            };
            let upd = if opt.nesterov && opt.lars_eta.is_none() {
                (&d + (&mu * m)?)?
            } else {
                mu.clone()
            };
            let step = upd.broadcast_mul(&(Self::per_head(&self.lr_mult, name)? * lr)?)?;
            var.set(&(p - step)?)?;
            new_mom.push((name, mu));
        }
        for (n, t) in new_mom {
            self.mom.insert(n, t);
        }
        Ok(())
    }

    /// Parameters, momentum buffers and BN running statistics, under `<tag>.<name>`.
    pub fn state(&self, out: &mut HashMap<String, Tensor>) {
        let t = &self.tag;
        for (n, v) in self.params() {
            out.insert(format!("{t}.{n}"), v.as_tensor().clone());
        }
        for (n, m) in &self.mom {
            out.insert(format!("{t}.mom.{n}"), m.clone());
        }
        if let (Some(m), Some(v)) = (&self.run_mean, &self.run_var) {
            out.insert(format!("{t}.running_mean"), m.clone());
            out.insert(format!("{t}.running_var"), v.clone());
        }
    }

    /// Restore what [`Self::state`] wrote.
    pub fn load(&mut self, st: &HashMap<String, Tensor>, dev: &Device) -> Result<()> {
        let t = self.tag.clone();
        let get = |k: String| -> Result<Tensor> {
            st.get(&k)
                .ok_or_else(|| Error::Data(format!("probe checkpoint lacks `{k}`")))
                .and_then(|x| Ok(x.to_device(dev)?))
        };
        for (n, v) in self.params() {
            v.set(&get(format!("{t}.{n}"))?)?;
        }
        self.mom.clear();
        for n in ["w", "b", "gamma", "beta"] {
            if let Some(m) = st.get(&format!("{t}.mom.{n}")) {
                self.mom.insert(n, m.to_device(dev)?);
            }
        }
        if self.run_mean.is_some() {
            self.run_mean = Some(get(format!("{t}.running_mean"))?);
            self.run_var = Some(get(format!("{t}.running_var"))?);
        }
        Ok(())
    }
}

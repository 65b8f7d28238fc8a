//! Convolutional building blocks of the detector, each with a working backward pass on candle
//! (CANDLE.md: `conv_transpose2d` is avoided, `upsample_bilinear2d` and strided pooling have no
//! backward, the fused norms record none):
//!
//! - [`Conv2d`]: stride-1 `k x k` convolution with "same" padding (candle's `conv2d`, whose
//!   backward exists);
//! - [`Deconv2x2`]: `ConvTranspose2d(kernel 2, stride 2)` written as one matmul plus a
//!   permutation (each input pixel writes its own 2x2 output block, so nothing overlaps);
//! - [`LayerNorm2d`]: LayerNorm over the channel axis of `(B, C, H, W)` (ViTDet's "LN");
//! - [`max_pool2x2`]: candle's `max_pool2d` with kernel = stride = 2 (that case has a backward);
//! - [`sigmoid`], [`bce_with_logits`], [`sigmoid_focal_loss`] from differentiable primitives.
//!
//! Weight layouts follow PyTorch: conv `(out, in, k, k)`, transposed conv `(in, out, 2, 2)`.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use crate::model::error::Result;

/// `k x k` convolution, stride 1, padding `k / 2`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
}

impl Conv2d {
    /// `weight` (out, in, k, k) from `init`; `bias` (out) set to `bias_init` when given.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        init: Init,
        bias_init: Option<f64>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
        let bias = match bias_init {
            Some(b) => Some(vb.get_with_hints(cout, "bias", Init::Const(b))?),
            None => None,
        };
        Ok(Self {
            weight,
            bias,
            padding: k / 2,
        })
    }

    /// `(B, in, H, W) -> (B, out, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, 1, 1, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// `ConvTranspose2d(cin, cout, kernel_size=2, stride=2)` as a matmul.
#[derive(Debug, Clone)]
pub struct Deconv2x2 {
    weight: Tensor,
    bias: Tensor,
    cout: usize,
}

impl Deconv2x2 {
    /// `weight` (in, out, 2, 2), `bias` (out) zero.
    pub fn new(cin: usize, cout: usize, init: Init, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((cin, cout, 2, 2), "weight", init)?;
        let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, cout })
    }

    /// `(B, in, H, W) -> (B, out, 2H, 2W)`: `y[b, o, 2i+u, 2j+v] = sum_c x[b, c, i, j] w[c, o, u, v] + bias[o]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let o = self.cout;
        let rows = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        let y = rows.matmul(&self.weight.reshape((c, o * 4))?)?;
        let y = y
            .reshape((b, h, w, o, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((b, o, 2 * h, 2 * w))?;
        Ok(y.broadcast_add(&self.bias.reshape((1, o, 1, 1))?)?)
    }
}

/// LayerNorm over channels of `(B, C, H, W)` with affine weight / bias (detectron2 `LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    /// Weight 1, bias 0, eps 1e-6 (detectron2's default).
    pub fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            eps: 1e-6,
        })
    }

    /// Normalise every pixel's channel vector.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(1)?;
        let mean = x.mean_keepdim(1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(1)?;
        let xn = xc.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(xn
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?)
    }
}

/// 2x2 max pooling, stride 2 (H and W must be even).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    Ok(x.max_pool2d(2)?)
}

/// Logistic sigmoid through `tanh` (which has a backward): `0.5 * (1 + tanh(x / 2))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(((x * 0.5)?.tanh()? + 1.0)?.affine(0.5, 0.0)?)
}

/// Elementwise binary cross-entropy on logits: `max(x, 0) - x t + log(1 + exp(-|x|))`.
pub fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((x.relu()? - (x * t)?)? + soft)?)
}

/// Elementwise sigmoid focal loss (Lin et al. 2017, torchvision `sigmoid_focal_loss`,
/// reduction "none"): `ce * (1 - p_t)^gamma * alpha_t`.
pub fn sigmoid_focal_loss(x: &Tensor, t: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let p = sigmoid(x)?;
    let ce = bce_with_logits(x, t)?;
    // 1 - p_t = p + t - 2 p t
    let one_m_pt = ((&p + t)? - (&p * t)?.affine(2.0, 0.0)?)?;
    let modulator = if gamma == 2.0 {
        one_m_pt.sqr()?
    } else {
        // (1 - p_t) >= 0; a tiny floor keeps powf's backward finite at 0.
        (one_m_pt + 1e-12)?.powf(gamma)?
    };
    let loss = (ce * modulator)?;
    if alpha >= 0.0 {
        // alpha_t = alpha t + (1 - alpha)(1 - t)
        let at = t.affine(2.0 * alpha - 1.0, 1.0 - alpha)?;
        Ok((loss * at)?)
    } else {
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn deconv_matches_direct_formula() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = crate::model::detect::init::SeededInit::var_builder(&vm, 3, &dev);
        let d = Deconv2x2::new(
            2,
            3,
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
            vb.pp("d"),
        )
        .unwrap();
        let x = Tensor::arange(0f32, 2.0 * 2.0 * 3.0, &dev)
            .unwrap()
            .reshape((1, 2, 2, 3))
            .unwrap();
        let y = d.forward(&x).unwrap();
        assert_eq!(y.dims(), &[1, 3, 4, 6]);
        let w = d.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for o in 0..3 {
            for yy in 0..4 {
                for xx in 0..6 {
                    let (i, u, j, v) = (yy / 2, yy % 2, xx / 2, xx % 2);
                    let mut s = 0f32;
                    for c in 0..2 {
                        s += xv[c * 6 + i * 3 + j] * w[((c * 3 + o) * 2 + u) * 2 + v];
                    }
                    let got = yv[(o * 4 + yy) * 6 + xx];
                    assert!((got - s).abs() < 1e-5, "{got} vs {s}");
                }
            }
        }
    }

    #[test]
    fn losses_have_gradients_and_values() {
        let dev = Device::Cpu;
        let x = Var::new(&[-2f32, 0.0, 3.0], &dev).unwrap();
        let t = Tensor::new(&[0f32, 1.0, 1.0], &dev).unwrap();
        let l = bce_with_logits(x.as_tensor(), &t).unwrap();
        let got = l.to_vec1::<f32>().unwrap();
        let want = [
            (1.0 + (-2f32).exp()).ln(),
            2f32.ln(),
            (1.0 + (-3f32).exp()).ln(),
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} {b}");
        }
        let s = sigmoid(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!((s[0] - 1.0 / (1.0 + 2f32.exp())).abs() < 1e-6);
        let f = sigmoid_focal_loss(x.as_tensor(), &t, 0.25, 2.0).unwrap();
        let g = f.sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // numerical check of d focal / dx
        let fl = |v: f32, tv: f32| {
            let p = 1.0 / (1.0 + (-v).exp());
            let ce = -(tv * p.ln() + (1.0 - tv) * (1.0 - p).ln());
            let pt = p * tv + (1.0 - p) * (1.0 - tv);
            let at = 0.25 * tv + 0.75 * (1.0 - tv);
            ce * (1.0 - pt).powi(2) * at
        };
        let xs = [-2f32, 0.0, 3.0];
        let ts = [0f32, 1.0, 1.0];
        for i in 0..3 {
            let e = 1e-2;
            let num = (fl(xs[i] + e, ts[i]) - fl(xs[i] - e, ts[i])) / (2.0 * e);
            assert!((gx[i] - num).abs() < 1e-3, "{i}: {} vs {num}", gx[i]);
        }
    }

    #[test]
    fn layer_norm_and_pool_backprop() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = crate::model::detect::init::SeededInit::var_builder(&vm, 0, &dev);
        let ln = LayerNorm2d::new(3, vb.pp("ln")).unwrap();
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 24.0, &dev)
                .unwrap()
                .reshape((1, 3, 2, 4))
                .unwrap()
                .sin()
                .unwrap(),
        )
        .unwrap();
        let y = max_pool2x2(&ln.forward(x.as_tensor()).unwrap()).unwrap();
        assert_eq!(y.dims(), &[1, 3, 1, 2]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert_eq!(vm.all_vars().len(), 2);
        for v in vm.all_vars() {
            assert!(g.get(v.as_tensor()).is_some());
        }
    }
}

//! Convolutional building blocks of the detector on **channels-last** maps `(B, H, W, C)`, each
//! with a fast backward pass on candle. CANDLE.md: `upsample_bilinear2d` and strided pooling have
//! no backward and the fused norms record none; measured here, candle's CPU `conv2d` backward
//! (through `conv_transpose2d`) is 7x slower than its forward. So every layer is a matmul on the
//! channel axis plus copies:
//!
//! - [`Conv2d`]: stride-1 `k x k` convolution with "same" zero padding, as im2col (one gather
//!   of the pixel rows, [`im2col_indices`]) followed by one matmul;
//! - [`Deconv2x2`]: `ConvTranspose2d(kernel 2, stride 2)` as one matmul plus a permutation (each
//!   input pixel writes its own 2x2 output block, so nothing overlaps);
//! - [`LayerNorm2d`]: LayerNorm over channels (ViTDet's "LN"), i.e. over the last axis;
//! - [`max_pool2x2`]: 2x2 max pooling with stride 2 as two `max` reductions;
//! - [`sigmoid`], [`bce_with_logits`], [`sigmoid_focal_loss`] from differentiable primitives.
//!
//! Parameters keep PyTorch's layouts: conv `(out, in, k, k)`, transposed conv `(in, out, 2, 2)`.

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::model::cuda_ops::{layer_norm_rows, row_stats};
use crate::model::custom_op::{apply, f32_data, CpuArg, CpuOut, Grads, Op};
use crate::model::error::Result;
use crate::model::layers::shifted_taps;
use crate::model::{launch, precision};

/// The im2col columns of a `k x k` "same" convolution of channels-last `(B, H, W, C)` as shifted
/// views of the zero-padded map, concatenated on the channel axis: `(B, H, W, k*k*C)` in
/// `(ky, kx, c)` order (the order of [`im2col_indices`]' taps).
pub fn shifted_columns(x: &Tensor, k: usize) -> Result<Tensor> {
    Ok(Tensor::cat(&shifted_taps(x, k, (1, 2))?, 3)?)
}

/// `y = x W^T (+ b)` on the last axis of `(..., in)`.
fn matmul_last(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cin = *dims.last().unwrap_or(&1);
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = precision::matmul(&x.reshape((rows, cin))?, wt)?;
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = wt.dim(1)?;
    }
    Ok(y.reshape(out)?)
}

/// Row of the `(B*H*W + 1, C)` table read by each `(b, y, x, ky, kx)` tap of a `k x k`
/// "same" convolution; taps outside the map read the zero row `B*H*W`.
pub fn im2col_indices(b: usize, h: usize, w: usize, k: usize) -> Vec<u32> {
    let p = (k / 2) as i64;
    let zero = (b * h * w) as u32;
    let mut idx = Vec::with_capacity(b * h * w * k * k);
    for bi in 0..b {
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                for ky in 0..k as i64 {
                    let yy = y + ky - p;
                    for kx in 0..k as i64 {
                        let xx = x + kx - p;
                        idx.push(if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
                            zero
                        } else {
                            ((bi * h + yy as usize) * w + xx as usize) as u32
                        });
                    }
                }
            }
        }
    }
    idx
}

/// `k x k` convolution, stride 1, padding `k / 2`, channels-last.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    k: usize,
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
        Ok(Self { weight, bias, k })
    }

    /// `(B, H, W, in) -> (B, H, W, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (k, o) = (self.k, self.weight.dim(0)?);
        // (O, C, ky, kx) -> (ky, kx, C, O): rows ordered like the im2col columns below
        let wt = self.weight.permute((2, 3, 1, 0))?.reshape((k * k * c, o))?;
        let y = if k == 1 {
            matmul_last(x, &wt)?
        } else if !x.device().is_cpu() {
            // On CUDA candle's index_add (the gather's backward) walks the ids serially: take
            // the columns as shifted views instead (their backward is parallel copies), in
            // chunks of images that keep the column buffer within one launch.
            let per_image = h * w * k * k * c.max(o);
            launch::map_row_chunks(x, per_image, launch::MAX_LAUNCH_ELEMS, |x| {
                let cols = shifted_columns(x, k)?;
                let b = x.dim(0)?;
                Ok(
                    precision::matmul(&cols.reshape((b * h * w, k * k * c))?, &wt)?
                        .reshape((b, h, w, o))?,
                )
            })?
        } else {
            // im2col as one gather from the rows of x plus a zero row for the padding: its
            // backward is a single index_add (candle's narrow / cat backward is much slower).
            let rows = b * h * w;
            let table = Tensor::cat(
                &[
                    x.reshape((rows, c))?,
                    Tensor::zeros((1, c), x.dtype(), x.device())?,
                ],
                0,
            )?;
            let idx = Tensor::from_vec(im2col_indices(b, h, w, k), rows * k * k, x.device())?;
            let cols = table.index_select(&idx, 0)?.reshape((rows, k * k * c))?;
            precision::matmul(&cols, &wt)?.reshape((b, h, w, o))?
        };
        Ok(match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }
}

/// `ConvTranspose2d(cin, cout, kernel_size=2, stride=2)` as a matmul, channels-last.
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

    /// `(B, H, W, in) -> (B, 2H, 2W, out)`:
    /// `y[b, 2i+u, 2j+v, o] = sum_c x[b, i, j, c] w[c, o, u, v] + bias[o]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let o = self.cout;
        let y = precision::matmul(
            &x.reshape((b * h * w, c))?,
            &self.weight.reshape((c, o * 4))?,
        )?;
        let y = y
            .reshape((b, h, w, o, 2, 2))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((b, 2 * h, 2 * w, o))?;
        Ok(y.broadcast_add(&self.bias)?)
    }
}

/// LayerNorm over the channels of `(B, H, W, C)` with affine weight / bias (detectron2 `LayerNorm`).
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
        layer_norm_last(x, &self.weight, &self.bias, self.eps)
    }
}

/// Affine LayerNorm over the last axis (biased variance), with a backward. On CPU with f32 it is
/// one fused op whose backward is a single pass over the rows
/// (`dx = rstd * (gw - mean(gw) - y * mean(gw * y))` with `gw = g * w`, `dw = sum g * y`,
/// `db = sum g`); the generic graph of broadcast ops, used on other devices, is 30x slower
/// backward on CPU because of its reductions over the leading axes.
pub fn layer_norm_last(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let all_f32 = [x, w, b]
        .iter()
        .all(|t| t.dtype() == candle_core::DType::F32);
    if x.device().is_cpu() && all_f32 {
        return Ok(apply(
            [&x.contiguous()?, w, b],
            LnAffine { eps: eps as f32 },
        )?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

const OP: &str = "fused layer norm";

struct LnAffine {
    eps: f32,
}

impl Op<3> for LnAffine {
    const NAME: &'static str = "layer-norm-affine";
    fn cpu(&self, [x, w, b]: [CpuArg<'_>; 3]) -> CpuOut {
        let shape = x.1.shape().clone();
        let d = *shape.dims().last().unwrap_or(&1);
        let (x, w, b) = (f32_data(x, OP)?, f32_data(w, OP)?, f32_data(b, OP)?);
        if w.len() != d || b.len() != d || d == 0 {
            candle_core::bail!(
                "layer norm: weight {} / bias {} for width {d}",
                w.len(),
                b.len()
            );
        }
        let out = layer_norm_rows(x, w, b, d, self.eps);
        Ok((candle_core::CpuStorage::F32(out), shape))
    }

    fn bwd(&self, [x, w, b]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let d = x.dim(D::Minus1)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.to_vec1::<f32>()?;
        let gv = grad.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xv.len()];
        let mut dw = vec![0f32; d];
        let mut db = vec![0f32; d];
        let n = d as f32;
        let mut y = vec![0f32; d];
        let mut gw = vec![0f32; d];
        for ((xr, gr), dr) in xv.chunks(d).zip(gv.chunks(d)).zip(dx.chunks_mut(d)) {
            let (mean, rstd) = row_stats(xr, self.eps);
            for i in 0..d {
                y[i] = (xr[i] - mean) * rstd;
                gw[i] = gr[i] * wv[i];
                dw[i] += gr[i] * y[i];
                db[i] += gr[i];
            }
            let mg = gw.iter().sum::<f32>() / n;
            let mgy = gw.iter().zip(&y).map(|(a, c)| a * c).sum::<f32>() / n;
            for i in 0..d {
                dr[i] = rstd * (gw[i] - mg - y[i] * mgy);
            }
        }
        let dev = x.device();
        Ok([
            Some(Tensor::from_vec(dx, x.shape().clone(), dev)?),
            Some(Tensor::from_vec(dw, w.shape().clone(), dev)?),
            Some(Tensor::from_vec(db, b.shape().clone(), dev)?),
        ])
    }
}

/// 2x2 max pooling with stride 2 of `(B, H, W, C)` (H and W even).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    Ok(x.reshape((b, h / 2, 2, w / 2, 2, c))?.max(4)?.max(2)?)
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
mod tests;

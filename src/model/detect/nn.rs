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

use crate::model::error::Result;
use crate::model::{launch, precision};

/// The im2col columns of a `k x k` "same" convolution of channels-last `(B, H, W, C)` as shifted
/// views of the zero-padded map, concatenated on the channel axis: `(B, H, W, k*k*C)` in
/// `(ky, kx, c)` order (the order of [`im2col_indices`]' taps).
pub fn shifted_columns(x: &Tensor, k: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let p = k / 2;
    let xp = x.pad_with_zeros(1, p, p)?.pad_with_zeros(2, p, p)?;
    let mut taps = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            taps.push(xp.narrow(1, ky, h)?.narrow(2, kx, w)?);
        }
    }
    Ok(Tensor::cat(&taps, 3)?)
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
        return Ok(x
            .contiguous()?
            .apply_op3(w, b, LnAffine { eps: eps as f32 })?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

struct LnAffine {
    eps: f32,
}

fn f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let (o1, o2) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("layer norm needs contiguous inputs".into()))?;
    match s {
        candle_core::CpuStorage::F32(v) => Ok(&v[o1..o2]),
        _ => candle_core::bail!("fused layer norm: f32 only"),
    }
}

/// Mean and reciprocal standard deviation of a row.
fn row_stats(r: &[f32], eps: f32) -> (f32, f32) {
    let n = r.len() as f32;
    let mean = r.iter().sum::<f32>() / n;
    let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for LnAffine {
    fn name(&self) -> &'static str {
        "layer-norm-affine"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, w, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let d = *l1.dims().last().unwrap_or(&1);
        if w.len() != d || b.len() != d || d == 0 {
            candle_core::bail!(
                "layer norm: weight {} / bias {} for width {d}",
                w.len(),
                b.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        for (xr, yr) in x.chunks(d).zip(out.chunks_mut(d)) {
            let (mean, rstd) = row_stats(xr, self.eps);
            for (i, y) in yr.iter_mut().enumerate() {
                *y = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
        Ok((
            Some(Tensor::from_vec(dx, x.shape().clone(), dev)?),
            Some(Tensor::from_vec(dw, w.shape().clone(), dev)?),
            Some(Tensor::from_vec(db, b.shape().clone(), dev)?),
        ))
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
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Direct NCHW reference convolution (PyTorch semantics, zero padding k/2).
    fn conv_ref(
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        wt: &[f32],
        o: usize,
        k: usize,
    ) -> Vec<f32> {
        let p = (k / 2) as i64;
        let mut y = vec![0f32; o * h * w];
        for oc in 0..o {
            for i in 0..h {
                for j in 0..w {
                    let mut s = 0f32;
                    for ic in 0..c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (yy, xx) = (i as i64 + ky as i64 - p, j as i64 + kx as i64 - p);
                                if yy >= 0 && xx >= 0 && yy < h as i64 && xx < w as i64 {
                                    s += x[(ic * h + yy as usize) * w + xx as usize]
                                        * wt[((oc * c + ic) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                    y[(oc * h + i) * w + j] = s;
                }
            }
        }
        y
    }

    #[test]
    fn conv_matches_direct_formula_and_candle() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = crate::model::detect::init::SeededInit::var_builder(&vm, 1, &dev);
        let n01 = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        for k in [1, 3] {
            let conv = Conv2d::new(3, 4, k, n01, Some(0.5), vb.pp(format!("c{k}"))).unwrap();
            let nchw = Tensor::randn(0f32, 1.0, (1, 3, 5, 6), &dev).unwrap();
            let y = conv.forward(&nchw.permute((0, 2, 3, 1)).unwrap()).unwrap();
            assert_eq!(y.dims(), &[1, 5, 6, 4]);
            let got = y
                .permute((0, 3, 1, 2))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let xv = nchw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wv = conv.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = conv_ref(&xv, (3, 5, 6), &wv, 4, k);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - (b + 0.5)).abs() < 1e-4, "k{k}: {a} vs {}", b + 0.5);
            }
            // candle's own conv2d agrees too
            let cand = nchw.conv2d(&conv.weight, k / 2, 1, 1, 1).unwrap();
            let cv = cand.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&cv) {
                assert!((a - (b + 0.5)).abs() < 1e-4);
            }
        }
    }

    /// The shifted-view columns (the CUDA path) are the gathered columns (the CPU path).
    #[test]
    fn shifted_columns_equal_the_gathered_columns() {
        let dev = Device::Cpu;
        let (b, h, w, c, k) = (2, 4, 5, 3, 3);
        let x = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev).unwrap();
        let table = Tensor::cat(
            &[
                x.reshape((b * h * w, c)).unwrap(),
                Tensor::zeros((1, c), x.dtype(), &dev).unwrap(),
            ],
            0,
        )
        .unwrap();
        let idx = Tensor::from_vec(im2col_indices(b, h, w, k), b * h * w * k * k, &dev).unwrap();
        let gathered = table
            .index_select(&idx, 0)
            .unwrap()
            .reshape((b, h, w, k * k * c))
            .unwrap();
        let shifted = shifted_columns(&x, k).unwrap();
        assert_eq!(shifted.dims(), gathered.dims());
        let a = shifted.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = gathered.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, g);
    }

    #[test]
    fn conv_gradient_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = crate::model::detect::init::SeededInit::var_builder(&vm, 2, &dev);
        let n01 = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let conv = Conv2d::new(2, 3, 3, n01, None, vb.pp("c")).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 4, 5), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
        let ours = conv
            .forward(&x.permute((0, 2, 3, 1)).unwrap())
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let theirs = x.conv2d(&conv.weight, 1, 1, 1, 1).unwrap();
        let g2 = (theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for t in [x.as_tensor(), &conv.weight] {
            let a = g1
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = g2
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-3, "{u} vs {v}");
            }
        }
    }

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
        // NCHW values x[c, i, j] = c*6 + i*3 + j
        let x = Tensor::arange(0f32, 2.0 * 2.0 * 3.0, &dev)
            .unwrap()
            .reshape((1, 2, 2, 3))
            .unwrap();
        let y = d.forward(&x.permute((0, 2, 3, 1)).unwrap()).unwrap();
        assert_eq!(y.dims(), &[1, 4, 6, 3]);
        let y = y.permute((0, 3, 1, 2)).unwrap();
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
    fn fused_layer_norm_matches_generic_graph() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 5, 7), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 7, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 7, &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
        let generic = |x: &Tensor| {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let xc = x.broadcast_sub(&mean).unwrap();
            let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            xc.broadcast_mul(&(var + 1e-6).unwrap().sqrt().unwrap().recip().unwrap())
                .unwrap()
                .broadcast_mul(w.as_tensor())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
        };
        let fa = layer_norm_last(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
        let fb = generic(x.as_tensor());
        let close = |u: &Tensor, v: &Tensor| {
            let u = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(u.len(), v.len());
            for (p, q) in u.iter().zip(&v) {
                assert!((p - q).abs() < 1e-4, "{p} vs {q}");
            }
        };
        close(&fa, &fb);
        let ga = (fa * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (fb * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
            close(ga.get(t).unwrap(), gb.get(t).unwrap());
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
                .reshape((1, 2, 4, 3))
                .unwrap()
                .sin()
                .unwrap(),
        )
        .unwrap();
        let y = max_pool2x2(&ln.forward(x.as_tensor()).unwrap()).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 3]);
        // NHWC (1, 2, 4, 3): pool output (0, 0, j, c) = max over rows 0..2, cols 2j..2j+2
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let p = max_pool2x2(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for j in 0..2 {
            for c in 0..3 {
                let m = [(0, 2 * j), (0, 2 * j + 1), (1, 2 * j), (1, 2 * j + 1)]
                    .iter()
                    .map(|&(r, q)| xv[(r * 4 + q) * 3 + c])
                    .fold(f32::MIN, f32::max);
                assert_eq!(p[j * 3 + c], m);
            }
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert_eq!(vm.all_vars().len(), 2);
        for v in vm.all_vars() {
            assert!(g.get(v.as_tensor()).is_some());
        }
    }
}

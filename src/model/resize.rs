//! Differentiable resizing of `(B, C, H, W)` tensors as products with fixed interpolation matrices.
//!
//! candle's `upsample_bilinear2d` records no backward op (CANDLE.md), and pooling with a kernel
//! that differs from the stride has none either; segmentation heads need both. Bilinear resizing
//! (and adaptive average pooling) is separable and linear, so `Y = M_h · X · M_wᵀ` with fixed
//! `(out, in)` matrices gives the same numbers as PyTorch and a backward pass for free (matmul).
//!
//! - [`bilinear_matrix`]: PyTorch `F.interpolate(mode="bilinear", align_corners=False)` without
//!   antialiasing: `src = (dst + 0.5) * in/out - 0.5`, clamped at 0, neighbours `floor(src)` and
//!   `min(floor(src) + 1, in - 1)`.
//! - [`adaptive_avg_matrix`]: `nn.AdaptiveAvgPool2d`: output cell `o` averages input
//!   `floor(o*in/out) .. ceil((o+1)*in/out)`.

use candle_core::{Device, Tensor};

use super::error::{ModelError, Result};

/// `(out, in)` row-major weights of PyTorch's bilinear interpolation (align_corners=False) along
/// one axis. `in == out` gives the identity.
pub fn bilinear_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    if input == 0 || output == 0 {
        return m;
    }
    let scale = input as f64 / output as f64;
    for o in 0..output {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let l1 = src - i0 as f64;
        m[o * input + i0] += (1.0 - l1) as f32;
        m[o * input + i1] += l1 as f32;
    }
    m
}

/// `(out, in)` row-major weights of `AdaptiveAvgPool` along one axis.
pub fn adaptive_avg_matrix(input: usize, output: usize) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let start = (o * input) / output;
        let end = ((o + 1) * input).div_ceil(output);
        let n = (end - start).max(1) as f32;
        for i in start..end {
            m[o * input + i] = 1.0 / n;
        }
    }
    m
}

/// Apply `(oh, h)` and `(ow, w)` matrices to the last two axes of `(B, C, h, w)`.
fn apply_separable(
    x: &Tensor,
    mh: Vec<f32>,
    oh: usize,
    mw: Vec<f32>,
    ow: usize,
    dev: &Device,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let mut y = x.clone();
    // Both matrix kinds are the identity when the size does not change.
    if ow != w {
        // (B*C*h, w) x (w, ow)
        let mwt = Tensor::from_vec(mw, (ow, w), dev)?.t()?.contiguous()?;
        y = y.contiguous()?.reshape((b * c * h, w))?.matmul(&mwt)?;
        y = y.reshape((b, c, h, ow))?;
    }
    if oh != h {
        // One (B*C*ow, h) x (h, oh) product on the transposed map (a single large matmul is much
        // cheaper than B*C small batched ones, forward and backward).
        let mht = Tensor::from_vec(mh, (oh, h), dev)?.t()?.contiguous()?;
        let yt = y.transpose(2, 3)?.contiguous()?.reshape((b * c * ow, h))?;
        y = yt
            .matmul(&mht)?
            .reshape((b, c, ow, oh))?
            .transpose(2, 3)?
            .contiguous()?;
    }
    Ok(y)
}

/// Bilinear resize of `(B, C, H, W)` to `(B, C, oh, ow)` with a backward pass
/// (PyTorch `F.interpolate(size=(oh, ow), mode="bilinear", align_corners=False)`).
pub fn resize_bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4().map_err(|_| ModelError::Input {
        what: "resize",
        msg: format!(
            "shape {:?}, expected (batch, channels, height, width)",
            x.dims()
        ),
    })?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        return Err(ModelError::Input {
            what: "resize",
            msg: format!("cannot resize {h}x{w} to {oh}x{ow}"),
        });
    }
    apply_separable(
        x,
        bilinear_matrix(h, oh),
        oh,
        bilinear_matrix(w, ow),
        ow,
        x.device(),
    )
}

/// `nn.AdaptiveAvgPool2d((oh, ow))` of `(B, C, H, W)` with a backward pass.
pub fn adaptive_avg_pool(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone());
    }
    apply_separable(
        x,
        adaptive_avg_matrix(h, oh),
        oh,
        adaptive_avg_matrix(w, ow),
        ow,
        x.device(),
    )
}

/// Bilinear resize of one `f32` plane `(h, w)` to `(oh, ow)` on the CPU (same weights as
/// [`resize_bilinear`]); used by inference code that works on plain buffers.
pub fn resize_plane(src: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let taps = |input: usize, output: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = input as f64 / output as f64;
        (0..output)
            .map(|o| {
                let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                let l1 = (s - i0 as f64) as f32;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    // Width first, then height: the order PyTorch's separable kernel effectively uses.
    let mut tmp = vec![0f32; h * ow];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for (x, &(i0, i1, a, b)) in tx.iter().enumerate() {
            tmp[y * ow + x] = a * row[i0] + b * row[i1];
        }
    }
    let mut out = vec![0f32; oh * ow];
    for (y, &(i0, i1, a, b)) in ty.iter().enumerate() {
        for x in 0..ow {
            out[y * ow + x] = a * tmp[i0 * ow + x] + b * tmp[i1 * ow + x];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    // Reference numbers from PyTorch 2.x:
    //   x = torch.arange(6.).reshape(1, 1, 2, 3)
    //   F.interpolate(x, size=(3, 5), mode="bilinear", align_corners=False)
    const UP_2X3_TO_3X5: [f32; 15] = [
        0.0, 0.4, 1.0, 1.6, 2.0, //
        1.5, 1.9, 2.5, 3.1, 3.5, //
        3.0, 3.4, 4.0, 4.6, 5.0,
    ];

    #[test]
    fn bilinear_matches_torch() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        let y = resize_bilinear(&x, 3, 5).unwrap();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(UP_2X3_TO_3X5) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        let plane = resize_plane(&[0., 1., 2., 3., 4., 5.], 2, 3, 3, 5);
        for (g, w) in plane.iter().zip(UP_2X3_TO_3X5) {
            assert!((g - w).abs() < 1e-6, "{plane:?}");
        }
        // Downscale by 2 = mean of the two middle taps: torch gives [1.5, 5.5] for arange(8) -> 2
        let m = bilinear_matrix(8, 2);
        assert_eq!(&m[0..8], &[0., 0.5, 0.5, 0., 0., 0., 0., 0.]);
        assert_eq!(&m[8..16], &[0., 0., 0., 0., 0., 0.5, 0.5, 0.]);
    }

    #[test]
    fn adaptive_pool_bins() {
        // AdaptiveAvgPool1d(3) on 5 inputs: bins [0,2), [1,4), [3,5)
        let m = adaptive_avg_matrix(5, 3);
        let r = |o: usize| m[o * 5..(o + 1) * 5].to_vec();
        assert_eq!(r(0), vec![0.5, 0.5, 0., 0., 0.]);
        let t = 1.0 / 3.0;
        assert_eq!(r(1), vec![0., t, t, t, 0.]);
        assert_eq!(r(2), vec![0., 0., 0., 0.5, 0.5]);
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((1, 2, 3, 4))
            .unwrap();
        let y = adaptive_avg_pool(&x, 1, 1).unwrap();
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, vec![5.5, 17.5]);
    }

    #[test]
    fn resize_has_a_backward() {
        let dev = Device::Cpu;
        let v = Var::ones((2, 3, 4, 4), DType::F32, &dev).unwrap();
        let y = resize_bilinear(v.as_tensor(), 7, 9).unwrap();
        let p = adaptive_avg_pool(v.as_tensor(), 2, 3).unwrap();
        let loss = (y.sum_all().unwrap() + p.sum_all().unwrap()).unwrap();
        let g = loss.backward().unwrap();
        let gx = g.get(v.as_tensor()).expect("gradient reaches the input");
        // Every bilinear row sums to 1, so the total gradient mass is the output size;
        // adaptive pooling rows too.
        let total = gx.sum_all().unwrap().to_scalar::<f32>().unwrap();
        let want = (2 * 3 * 7 * 9 + 2 * 3 * 2 * 3) as f32;
        assert!((total - want).abs() < 1e-3, "{total} vs {want}");
    }
}

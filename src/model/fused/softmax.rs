//! Softmax over the last axis with a backward (candle's `softmax_last_dim` has none):
//! forward `y = exp(x - max) / Σ`, backward `dx = y (dy - Σ dy y)` from the saved output.

use candle_core::{bail, CpuStorage, Result, Tensor};

use super::kernels::{dot, exp, max, par_rows, simd_fn, sum};
use super::{tensor, with_data, SendPtr};
use crate::model::custom_op::{apply, f32_data, CpuArg, CpuOut, Grads, Op};

/// Softmax of one row in place.
#[inline(always)]
pub(crate) fn softmax_row(row: &mut [f32]) {
    let m = max(row);
    for v in row.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `dy <- y (dy - Σ dy y)` for one row.
#[inline(always)]
pub(crate) fn softmax_row_bwd(y: &[f32], dy: &mut [f32]) {
    let c = dot(y, dy);
    for (g, p) in dy.iter_mut().zip(y) {
        *g = p * (*g - c);
    }
}

simd_fn! {
    /// [`softmax_row`] of each `d`-wide row of `rows`, in place.
    pub(crate) fn softmax_rows(rows: &mut [f32], d: usize) {
        if d == 0 {
            return;
        }
        for row in rows.chunks_exact_mut(d) {
            softmax_row(row);
        }
    }
}

simd_fn! {
    /// [`softmax_row_bwd`] of each `d`-wide row: `dy <- y (dy - Σ dy y)`.
    pub(crate) fn softmax_rows_bwd(y: &[f32], dy: &mut [f32], d: usize) {
        if d == 0 {
            return;
        }
        for (yr, gr) in y.chunks_exact(d).zip(dy.chunks_exact_mut(d)) {
            softmax_row_bwd(yr, gr);
        }
    }
}

struct Softmax;

impl Op<1> for Softmax {
    const NAME: &'static str = "fused-softmax-last";

    fn cpu(&self, [x]: [CpuArg<'_>; 1]) -> CpuOut {
        let Some(&d) = x.1.dims().last() else {
            bail!("fused softmax: scalar input")
        };
        let mut y = f32_data(x, Self::NAME)?.to_vec();
        if d > 0 {
            let rows = y.len() / d;
            let yp = SendPtr(y.as_mut_ptr());
            par_rows(rows, 8, |r| {
                let yp = yp;
                // SAFETY: each chunk owns its rows.
                let block =
                    unsafe { std::slice::from_raw_parts_mut(yp.0.add(r.start * d), r.len() * d) };
                softmax_rows(block, d);
            });
        }
        Ok((CpuStorage::F32(y), x.1.shape().clone()))
    }

    fn bwd(&self, _x: [&Tensor; 1], res: &Tensor, dy: &Tensor) -> Grads<1> {
        let d = res.dim(candle_core::D::Minus1)?;
        let mut g = with_data(dy, Self::NAME, |g| Ok(g.to_vec()))?;
        with_data(res, Self::NAME, |y| {
            if d > 0 {
                let rows = y.len() / d;
                let gp = SendPtr(g.as_mut_ptr());
                par_rows(rows, 8, |r| {
                    let gp = gp;
                    // SAFETY: each chunk owns its rows.
                    let block = unsafe {
                        std::slice::from_raw_parts_mut(gp.0.add(r.start * d), r.len() * d)
                    };
                    softmax_rows_bwd(&y[r.start * d..r.end * d], block, d);
                });
            }
            Ok(())
        })?;
        Ok([Some(tensor(g, res.dims())?)])
    }
}

/// Softmax over the last axis of an f32 CPU tensor, with a backward.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    apply([&x.contiguous()?], Softmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testutil::{assert_close, assert_grads_close, randn, var};
    use crate::model::layers;

    #[test]
    fn matches_unfused() {
        let x = var(&[4, 7, 33], 1, 3.0, 0.0);
        let probe = randn(&[4, 7, 33], 2);
        let f = softmax_last(x.as_tensor()).unwrap();
        let u = layers::softmax_last_unfused(x.as_tensor()).unwrap();
        assert_close("softmax y", &f, &u, 1e-6, 1e-5);
        assert_grads_close("softmax", &f, &u, &probe, &[("x", &x)], 1e-6, 1e-4);
    }
}

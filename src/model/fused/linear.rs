//! `y = x W^T + b` over the last axis (PyTorch layout `W = (out, in)`) as one op.
//!
//! Forward: the output rows start as the bias and the gemm accumulates into them. Backward:
//! `dx = dy W`, `dW = dy^T x` (dy^T is read through strides, never copied), `db` = column sums
//! of dy; the input gradient is skipped when `x` needs none (patch pixels). candle's unfused path
//! records reshape, transpose, matmul and broadcast-add, whose backward materialises transposed
//! copies and broadcast sums.

use candle_core::{bail, CpuStorage, Result, Shape, Tensor};

use super::kernels::{gemm_par_rows, output_buffer, par_rows, par_rows_sum, simd_fn, Mat, MatMut};
use super::{tensor, with_data, SendPtr};
use crate::model::custom_op::{apply, f32_data, CpuArg, CpuOut, Grads, Op};

const OP: &str = "fused linear";

/// The op: three arguments with the bias, two without.
struct Linear;

pub(super) fn check(xd: &[usize], wd: &[usize]) -> Result<(usize, usize, usize)> {
    let (&k, _) = xd
        .split_last()
        .ok_or_else(|| candle_core::Error::Msg("fused linear: scalar input".into()))?;
    if wd.len() != 2 || wd[1] != k {
        bail!("fused linear: input {xd:?} does not fit weight {wd:?} (out, in)")
    }
    let m = xd.iter().product::<usize>() / k.max(1);
    Ok((m, k, wd[0]))
}

/// [`check`] plus the bias: `(m, k, n)` when the bias is `[n]`; `op` names the op in the error.
pub(super) fn check_with_bias(
    xd: &[usize],
    wd: &[usize],
    bd: &[usize],
    op: &str,
) -> Result<(usize, usize, usize)> {
    let (m, k, n) = check(xd, wd)?;
    if bd != [n] {
        bail!("{op}: bias {bd:?}, expected [{n}]")
    }
    Ok((m, k, n))
}

pub(super) fn out_shape(xd: &[usize], n: usize) -> Shape {
    let mut d = xd.to_vec();
    if let Some(l) = d.last_mut() {
        *l = n;
    }
    d.into()
}

/// The forward product into a fresh buffer.
pub(super) fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f32> {
    // SAFETY: every row is the bias or the gemm's non-accumulating output.
    let mut y = unsafe { output_buffer(m * n) };
    if let Some(b) = b {
        let yp = SendPtr(y.as_mut_ptr());
        par_rows(m, 64, |r| {
            let yp = yp;
            for i in r {
                // SAFETY: each chunk writes its own rows.
                let row = unsafe { std::slice::from_raw_parts_mut(yp.0.add(i * n), n) };
                row.copy_from_slice(b);
            }
        });
    }
    // SAFETY: shapes checked by the caller; y is m x n.
    unsafe {
        gemm_par_rows(
            m,
            n,
            k,
            MatMut {
                ptr: y.as_mut_ptr(),
                rs: n as isize,
                cs: 1,
            },
            b.is_some(),
            Mat {
                ptr: x.as_ptr(),
                rs: k as isize,
                cs: 1,
            },
            Mat {
                ptr: w.as_ptr(),
                rs: 1,
                cs: k as isize,
            },
            1.0,
        )
    };
    y
}

simd_fn! {
    /// `acc += ` each `n`-wide row of `g`.
    fn add_rows(acc: &mut [f32], g: &[f32], n: usize) {
        if n == 0 {
            return;
        }
        for row in g.chunks_exact(n) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
    }
}

/// Column sums of the `m x n` row-major `g` (the bias gradient).
fn column_sums(g: &[f32], m: usize, n: usize) -> Vec<f32> {
    par_rows_sum(m, 64, n, |r, acc| {
        add_rows(acc, &g[r.start * n..r.end * n], n)
    })
}

/// `(dx, dW)` from the output gradient `g (m x n)`, each computed only when asked for.
pub(super) fn input_and_weight_grads(
    x: &Tensor,
    w: &Tensor,
    g: &[f32],
    want: (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (m, k, n) = check(x.dims(), w.dims())?;
    let dx = if want.0 {
        let v = with_data(w, OP, |wd| {
            // SAFETY: the gemm below writes all of dx (accumulate = false).
            let mut dx = unsafe { output_buffer(m * k) };
            // SAFETY: dx is m x k, dy m x n, W n x k.
            unsafe {
                gemm_par_rows(
                    m,
                    k,
                    n,
                    MatMut {
                        ptr: dx.as_mut_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    false,
                    Mat {
                        ptr: g.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: wd.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    1.0,
                )
            };
            Ok(dx)
        })?;
        Some(tensor(v, x.dims())?)
    } else {
        None
    };
    let dw = if want.1 {
        let v = with_data(x, OP, |xd| {
            // SAFETY: the gemm below writes all of dW (accumulate = false).
            let mut dw = unsafe { output_buffer(n * k) };
            // SAFETY: dW is n x k; dy^T is read with row stride 1 and column stride n.
            unsafe {
                gemm_par_rows(
                    n,
                    k,
                    m,
                    MatMut {
                        ptr: dw.as_mut_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    false,
                    Mat {
                        ptr: g.as_ptr(),
                        rs: 1,
                        cs: n as isize,
                    },
                    Mat {
                        ptr: xd.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    1.0,
                )
            };
            Ok(dw)
        })?;
        Some(tensor(v, w.dims())?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// Gradients `(dx, dW, db)`, each computed only when asked for.
fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want: (bool, bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (m, _, n) = check(x.dims(), w.dims())?;
    with_data(dy, OP, |g| {
        let (dx, dw) = input_and_weight_grads(x, w, g, (want.0, want.1))?;
        let db = if want.2 {
            Some(tensor(column_sums(g, m, n), &[n])?)
        } else {
            None
        };
        Ok((dx, dw, db))
    })
}

/// The forward of a biased linear op's arguments `[x, w, b]` (`op` names it in errors):
/// `x W^T + b`, its shape and its `(rows, columns)`.
pub(super) fn forward_biased(
    [x, w, b]: [CpuArg<'_>; 3],
    op: &'static str,
) -> Result<(Vec<f32>, Shape, (usize, usize))> {
    let (m, k, n) = check_with_bias(x.1.dims(), w.1.dims(), b.1.dims(), op)?;
    let shape = out_shape(x.1.dims(), n);
    let (x, w, b) = (f32_data(x, op)?, f32_data(w, op)?, f32_data(b, op)?);
    Ok((forward(x, w, Some(b), m, k, n), shape, (m, n)))
}

impl Op<3> for Linear {
    const NAME: &'static str = "fused-linear";

    fn cpu(&self, args: [CpuArg<'_>; 3]) -> CpuOut {
        let (y, shape, _) = forward_biased(args, OP)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, [x, w, b]: [&Tensor; 3], _res: &Tensor, dy: &Tensor) -> Grads<3> {
        let (dx, dw, db) = backward(x, w, dy, (x.track_op(), w.track_op(), b.track_op()))?;
        Ok([dx, dw, db])
    }
}

impl Op<2> for Linear {
    const NAME: &'static str = "fused-linear-nobias";

    fn cpu(&self, [x, w]: [CpuArg<'_>; 2]) -> CpuOut {
        let (m, k, n) = check(x.1.dims(), w.1.dims())?;
        let shape = out_shape(x.1.dims(), n);
        let (x, w) = (f32_data(x, OP)?, f32_data(w, OP)?);
        Ok((CpuStorage::F32(forward(x, w, None, m, k, n)), shape))
    }

    fn bwd(&self, [x, w]: [&Tensor; 2], _res: &Tensor, dy: &Tensor) -> Grads<2> {
        let (dx, dw, _) = backward(x, w, dy, (x.track_op(), w.track_op(), false))?;
        Ok([dx, dw])
    }
}

/// `x W^T (+ b)` for `x (..., in)`, `w (out, in)`, `b (out)`; f32 CPU tensors.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match b {
        Some(b) => apply([&x, &w, &b.contiguous()?], Linear),
        None => apply([&x, &w], Linear),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testutil::{
        assert_close, assert_grads_close, grads, randn, unfused_linear as unfused, var,
    };

    #[test]
    fn values_and_gradients_match_unfused() {
        for (shape, n, bias) in [
            (vec![2usize, 67, 24], 40usize, true),
            (vec![130, 16], 9, false),
            (vec![3, 1, 5], 7, true),
        ] {
            let k = *shape.last().unwrap();
            let x = var(&shape, 1, 1.0, 0.1);
            let w = var(&[n, k], 2, 0.3, 0.0);
            let b = var(&[n], 3, 1.0, 0.0);
            let bref = bias.then(|| b.as_tensor());
            // a random upstream gradient through a weighted sum
            let probe = randn(&out_shape(&shape, n).dims().to_vec(), 4);
            let f = linear(x.as_tensor(), w.as_tensor(), bref).unwrap();
            let u = unfused(x.as_tensor(), w.as_tensor(), bref);
            assert_close("linear y", &f, &u, 1e-5, 1e-5);
            let mut vars = vec![("x", &x), ("w", &w)];
            if bias {
                vars.push(("b", &b));
            }
            assert_grads_close("linear", &f, &u, &probe, &vars, 1e-4, 1e-4);
        }
    }

    #[test]
    fn input_without_grad_gets_none() {
        let x = randn(&[5, 6], 1);
        let w = var(&[3, 6], 2, 1.0, 0.0);
        let g = grads(&linear(&x, w.as_tensor(), None).unwrap());
        assert!(g.get(&x).is_none());
        assert!(g.get(w.as_tensor()).is_some());
    }
}

//! `y = GELU_erf(x W^T + b)` as one op: the MLP's first layer and its activation.
//!
//! The forward keeps the pre-activation `z = x W^T + b` inside the op (the unfused pair keeps it
//! as the GELU's input: the same memory). The backward forms `dz = dy GELU'(z)` and the bias
//! gradient (column sums of dz) in one pass over the rows and hands dz to the two gemms of
//! [`super::linear`]. Against the pair of ops this saves, per MLP, one pass over the hidden
//! tensor and candle's accumulation of the GELU's input gradient (a zero-filled tensor of the
//! hidden size plus an add), which is why it exists: the backward of a training step is bound by
//! such passes once the gemms are fused.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, Result, Tensor};

use super::gelu::{gelu_grad, gelu_into};
use super::kernels::{output_buffer, par_rows, par_rows_sum, simd_fn};
use super::linear::{check, forward_biased, input_and_weight_grads};
use super::{tensor, with_data, SendPtr};
use crate::model::custom_op::{apply, CpuArg, CpuOut, Grads, Op};

const OP: &str = "fused linear_gelu";

simd_fn! {
    /// `dz = g GELU'(z)` over rows of `n`, adding each row of dz into `acc` (the bias gradient).
    fn gelu_bwd_rows(dz: &mut [f32], g: &[f32], z: &[f32], acc: &mut [f32], n: usize) {
        if n == 0 {
            return;
        }
        for ((orow, grow), zrow) in dz
            .chunks_exact_mut(n)
            .zip(g.chunks_exact(n))
            .zip(z.chunks_exact(n))
        {
            for (((o, &gv), &zv), s) in orow.iter_mut().zip(grow).zip(zrow).zip(acc.iter_mut()) {
                *o = gv * gelu_grad(zv);
                *s += *o;
            }
        }
    }
}

struct LinearGelu {
    /// The pre-activation `z`, saved by the forward.
    pre: OnceLock<Vec<f32>>,
}

impl Op<3> for LinearGelu {
    const NAME: &'static str = "fused-linear-gelu";

    fn cpu(&self, args: [CpuArg<'_>; 3]) -> CpuOut {
        let (z, shape, (m, n)) = forward_biased(args, OP)?;
        // SAFETY: the row chunks below cover all m rows.
        let mut y = unsafe { output_buffer(m * n) };
        let yp = SendPtr(y.as_mut_ptr());
        par_rows(m, 16, |r| {
            let yp = yp;
            let (a, e) = (r.start * n, r.end * n);
            // SAFETY: each chunk writes its own rows.
            let out = unsafe { std::slice::from_raw_parts_mut(yp.0.add(a), e - a) };
            gelu_into(out, &z[a..e]);
        });
        let _ = self.pre.set(z);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, [x, w, b]: [&Tensor; 3], _res: &Tensor, dy: &Tensor) -> Grads<3> {
        let (m, _, n) = check(x.dims(), w.dims())?;
        let Some(z) = self.pre.get() else {
            bail!("{OP}: backward before forward")
        };
        if dy.elem_count() != m * n {
            bail!("{OP}: gradient {:?} for {m} x {n} outputs", dy.dims())
        }
        // SAFETY: the row chunks below cover all m rows.
        let mut dz = unsafe { output_buffer(m * n) };
        let dzp = SendPtr(dz.as_mut_ptr());
        let db = with_data(dy, OP, |g| {
            Ok(par_rows_sum(m, 16, n, |r, acc| {
                let dzp = dzp;
                let (a, e) = (r.start * n, r.end * n);
                // SAFETY: each chunk writes its own rows.
                let out = unsafe { std::slice::from_raw_parts_mut(dzp.0.add(a), e - a) };
                gelu_bwd_rows(out, &g[a..e], &z[a..e], acc, n);
            }))
        })?;
        let (dx, dw) = input_and_weight_grads(x, w, &dz, (x.track_op(), w.track_op()))?;
        let db = if b.track_op() {
            Some(tensor(db, &[n])?)
        } else {
            None
        };
        Ok([dx, dw, db])
    }
}

/// `GELU_erf(x W^T + b)` for `x (..., in)`, `w (out, in)`, `b (out)`; f32 CPU tensors.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let pre = OnceLock::new();
    apply(
        [&x.contiguous()?, &w.contiguous()?, &b.contiguous()?],
        LinearGelu { pre },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testutil::{
        assert_close, assert_grads_close, grads, randn, unfused_linear, var,
    };

    /// The unfused composition: candle's matmul, broadcast add and `gelu_erf`.
    fn unfused(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        unfused_linear(x, w, Some(b)).gelu_erf().unwrap()
    }

    #[test]
    fn values_and_gradients_match_unfused() {
        for (shape, n) in [
            (vec![2usize, 67, 24], 40usize),
            (vec![130, 16], 96),
            (vec![3, 1, 5], 7),
        ] {
            let k = *shape.last().unwrap();
            let x = var(&shape, 1, 1.0, 0.1);
            let w = var(&[n, k], 2, 0.5, 0.0);
            let b = var(&[n], 3, 1.0, 0.0);
            let mut od = shape.clone();
            *od.last_mut().unwrap() = n;
            let probe = randn(&od, 4);
            let f = linear_gelu(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
            let u = unfused(x.as_tensor(), w.as_tensor(), b.as_tensor());
            assert_close("linear_gelu y", &f, &u, 5e-6, 1e-5);
            let vars = [("x", &x), ("w", &w), ("b", &b)];
            assert_grads_close("linear_gelu", &f, &u, &probe, &vars, 1e-4, 1e-4);
        }
    }

    #[test]
    fn input_without_grad_gets_none() {
        let x = randn(&[5, 6], 1);
        let w = var(&[3, 6], 2, 1.0, 0.0);
        let b = var(&[3], 3, 1.0, 0.0);
        let g = grads(&linear_gelu(&x, w.as_tensor(), b.as_tensor()).unwrap());
        assert!(g.get(&x).is_none());
        assert!(g.get(w.as_tensor()).is_some());
        assert!(g.get(b.as_tensor()).is_some());
    }
}

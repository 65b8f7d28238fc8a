//! Multi-head softmax attention of a packed `qkv (B, T, 3E)` tensor (channels `(3, heads, hd)`,
//! the layout of `attn.qkv`'s output) to `(B, T, E)` with heads side by side, ready for `proj`.
//!
//! One rayon task per (image, head): `P = softmax(scale Q K^T)`, `O = P V`, where Q, K, V are
//! read in place through strides (no permute, no contiguous copies) and O is written straight into
//! its column block of the output. P is saved for the backward (as PyTorch's manual attention
//! saves it), which per task computes `dV = P^T dO`, `dP = dO V^T`,
//! `dS = P (dP - Σ P dP)`, `dQ = scale dS K`, `dK = scale dS^T Q` into the matching slots of `dqkv`.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, Result, Tensor};
use rayon::prelude::*;

use super::kernels::{gemm, output_buffer, Mat, MatMut};
use super::softmax::{softmax_rows, softmax_rows_bwd};
use super::{tensor, with_data, SendConst, SendPtr};
use crate::model::custom_op::{apply, f32_data, CpuArg, CpuOut, Grads, Op};

struct Attention {
    heads: usize,
    scale: f32,
    probs: OnceLock<Vec<f32>>,
}

/// `(B, T, E, hd)` of a packed qkv shape.
fn dims(d: &[usize], heads: usize) -> Result<(usize, usize, usize, usize)> {
    if d.len() != 3 || d[2] % 3 != 0 || heads == 0 || (d[2] / 3) % heads != 0 {
        bail!("fused attention: qkv {d:?} is not (batch, tokens, 3 * heads * head_dim) for {heads} heads")
    }
    let e = d[2] / 3;
    Ok((d[0], d[1], e, e / heads))
}

impl Op<1> for Attention {
    const NAME: &'static str = "fused-attention";

    fn cpu(&self, [qkv]: [CpuArg<'_>; 1]) -> CpuOut {
        let (b, t, e, hd) = dims(qkv.1.dims(), self.heads)?;
        let h = self.heads;
        let qkv = f32_data(qkv, Self::NAME)?;
        // SAFETY: the (image, head) tasks below write every head's T x T block of probs and
        // T x hd block of out (gemms with accumulate = false).
        let (mut out, mut probs) =
            unsafe { (output_buffer(b * t * e), output_buffer(b * h * t * t)) };
        let (op, pp, qp) = (
            SendPtr(out.as_mut_ptr()),
            SendPtr(probs.as_mut_ptr()),
            SendConst(qkv.as_ptr()),
        );
        let scale = self.scale;
        let e3 = (3 * e) as isize;
        (0..b * h).into_par_iter().for_each(move |task| {
            let (op, pp, qp) = (op, pp, qp);
            let (bi, hi) = (task / h, task % h);
            // SAFETY: task (bi, hi) writes only its own T x T block of probs and its own
            // (T x hd) column block of out; qkv is read only.
            unsafe {
                let base = qp.0.add(bi * t * 3 * e + hi * hd);
                let p = pp.0.add(task * t * t);
                gemm(
                    t,
                    t,
                    hd,
                    MatMut {
                        ptr: p,
                        rs: t as isize,
                        cs: 1,
                    },
                    false,
                    Mat {
                        ptr: base,
                        rs: e3,
                        cs: 1,
                    },
                    Mat {
                        ptr: base.add(e),
                        rs: 1,
                        cs: e3,
                    },
                    scale,
                );
                softmax_rows(std::slice::from_raw_parts_mut(p, t * t), t);
                gemm(
                    t,
                    hd,
                    t,
                    MatMut {
                        ptr: op.0.add(bi * t * e + hi * hd),
                        rs: e as isize,
                        cs: 1,
                    },
                    false,
                    Mat {
                        ptr: p,
                        rs: t as isize,
                        cs: 1,
                    },
                    Mat {
                        ptr: base.add(2 * e),
                        rs: e3,
                        cs: 1,
                    },
                    1.0,
                );
            }
        });
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), (b, t, e).into()))
    }

    fn bwd(&self, [qkv]: [&Tensor; 1], _res: &Tensor, dout: &Tensor) -> Grads<1> {
        let (b, t, e, hd) = dims(qkv.dims(), self.heads)?;
        let h = self.heads;
        let Some(probs) = self.probs.get() else {
            bail!("fused attention: backward before forward")
        };
        // SAFETY: every (image, head) task writes its dQ, dK and dV blocks (accumulate = false).
        let mut dqkv = unsafe { output_buffer(b * t * 3 * e) };
        let scale = self.scale;
        let e3 = (3 * e) as isize;
        with_data(qkv, Self::NAME, |q| {
            with_data(dout, Self::NAME, |g| {
                let (dp, qp, gp, pp) = (
                    SendPtr(dqkv.as_mut_ptr()),
                    SendConst(q.as_ptr()),
                    SendConst(g.as_ptr()),
                    SendConst(probs.as_ptr()),
                );
                (0..b * h).into_par_iter().for_each_init(
                    || vec![0f32; t * t],
                    move |buf, task| {
                        let (dp, qp, gp, pp) = (dp, qp, gp, pp);
                        let (bi, hi) = (task / h, task % h);
                        // SAFETY: task (bi, hi) writes only the q, k and v column blocks of its
                        // head in image bi of dqkv; everything else is read only.
                        unsafe {
                            let off = bi * t * 3 * e + hi * hd;
                            let (qb, db) = (qp.0.add(off), dp.0.add(off));
                            let p = pp.0.add(task * t * t);
                            let go = Mat {
                                ptr: gp.0.add(bi * t * e + hi * hd),
                                rs: e as isize,
                                cs: 1,
                            };
                            let pt = Mat {
                                ptr: p,
                                rs: 1,
                                cs: t as isize,
                            };
                            // dV = P^T dO
                            gemm(
                                t,
                                hd,
                                t,
                                MatMut {
                                    ptr: db.add(2 * e),
                                    rs: e3,
                                    cs: 1,
                                },
                                false,
                                pt,
                                go,
                                1.0,
                            );
                            // dP = dO V^T
                            gemm(
                                t,
                                t,
                                hd,
                                MatMut {
                                    ptr: buf.as_mut_ptr(),
                                    rs: t as isize,
                                    cs: 1,
                                },
                                false,
                                go,
                                Mat {
                                    ptr: qb.add(2 * e),
                                    rs: 1,
                                    cs: e3,
                                },
                                1.0,
                            );
                            softmax_rows_bwd(
                                std::slice::from_raw_parts(p, t * t),
                                &mut buf[..t * t],
                                t,
                            );
                            let ds = Mat {
                                ptr: buf.as_ptr(),
                                rs: t as isize,
                                cs: 1,
                            };
                            // dQ = scale dS K
                            gemm(
                                t,
                                hd,
                                t,
                                MatMut {
                                    ptr: db,
                                    rs: e3,
                                    cs: 1,
                                },
                                false,
                                ds,
                                Mat {
                                    ptr: qb.add(e),
                                    rs: e3,
                                    cs: 1,
                                },
                                scale,
                            );
                            // dK = scale dS^T Q
                            gemm(
                                t,
                                hd,
                                t,
                                MatMut {
                                    ptr: db.add(e),
                                    rs: e3,
                                    cs: 1,
                                },
                                false,
                                Mat {
                                    ptr: buf.as_ptr(),
                                    rs: 1,
                                    cs: t as isize,
                                },
                                Mat {
                                    ptr: qb,
                                    rs: e3,
                                    cs: 1,
                                },
                                scale,
                            );
                        }
                    },
                );
                Ok(())
            })
        })?;
        Ok([Some(tensor(dqkv, qkv.dims())?)])
    }
}

/// Attention of packed `qkv (B, T, 3E)` with `heads` heads and logit scale `scale`: `(B, T, E)`.
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = Attention {
        heads,
        scale: scale as f32,
        probs: OnceLock::new(),
    };
    apply([&qkv.contiguous()?], op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testutil::{assert_close, assert_grads_close, randn, var};
    use crate::model::layers::softmax_last_unfused;

    /// The unfused composition of `layers::Attention::forward` between qkv and proj.
    fn unfused(qkv: &Tensor, h: usize, scale: f64) -> Tensor {
        let (b, t, e3) = qkv.dims3().unwrap();
        let e = e3 / 3;
        let qkv = qkv
            .reshape((b, t, 3, h, e / h))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap();
        let q = qkv.get(0).unwrap().contiguous().unwrap();
        let k = qkv.get(1).unwrap().contiguous().unwrap();
        let v = qkv.get(2).unwrap().contiguous().unwrap();
        let a = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .affine(scale, 0.0)
            .unwrap();
        let a = softmax_last_unfused(&a).unwrap();
        a.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, e))
            .unwrap()
    }

    #[test]
    fn values_and_gradients_match_unfused() {
        for (b, t, h, hd) in [
            (2usize, 13usize, 3usize, 8usize),
            (1, 40, 2, 16),
            (3, 1, 1, 4),
        ] {
            let e = h * hd;
            let qkv = var(&[b, t, 3 * e], 1, 1.5, 0.0);
            let probe = randn(&[b, t, e], 2);
            let scale = (hd as f64).powf(-0.5);
            let f = attention(qkv.as_tensor(), h, scale).unwrap();
            let u = unfused(qkv.as_tensor(), h, scale);
            assert_close("attention y", &f, &u, 1e-5, 1e-4);
            assert_grads_close("attention", &f, &u, &probe, &[("qkv", &qkv)], 1e-5, 1e-4);
        }
    }
}

//! In-place, one-pass CPU kernels of the AdamW update and the EMA (f32), used while
//! `model::fused::enabled()`. They compute exactly the f32 operations of the unfused candle chains
//! in [`super::optim`] and [`super::ema`] (same order, same `x * mul + add` affine rounding), so
//! both paths give bit-identical parameters, without the dozen temporary tensors per parameter.

use candle_core::{bail, CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::model::fused;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

fn data_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: the destination must be contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => bail!("{op}: expected an f32 tensor"),
    }
}

fn data<'a>(s: &'a CpuStorage, l: &Layout, n: usize, op: &'static str) -> Result<&'a [f32]> {
    let d = fused::slice(s, l, op)?;
    if d.len() != n {
        bail!("{op}: operand of {} elements, expected {n}", d.len())
    }
    Ok(d)
}

/// `dst[i] = f(dst[i], a[i], b[i])` over parallel chunks.
fn zip3(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) {
    dst.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((d, a), b)| {
            fused::kernels::simd(|| {
                for ((d, a), b) in d.iter_mut().zip(a).zip(b) {
                    *d = f(*d, *a, *b);
                }
            })
        });
}

/// `m = m + ((g - m) * c + 0)` (torch's `exp_avg.lerp_(grad, 1 - beta1)` as candle computes it).
struct FirstMoment(f32);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let m = data_mut(s1, l1, self.name())?;
        let g = data(s2, l2, m.len(), self.name())?;
        let c = self.0;
        zip3(m, g, g, |m, g, _| m + ((g - m) * c + 0.0));
        Ok(())
    }
}

/// `v = (v * b2 + 0) + (g g * c + 0)`.
struct SecondMoment {
    b2: f32,
    c: f32,
}

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let v = data_mut(s1, l1, self.name())?;
        let g = data(s2, l2, v.len(), self.name())?;
        let (b2, c) = (self.b2, self.c);
        zip3(v, g, g, |v, g, _| (v * b2 + 0.0) + (g * g * c + 0.0));
        Ok(())
    }
}

/// `w = [w * decay + 0] - ((m / ((sqrt(v) * inv_bc2 + 0) * 1 + eps)) * step + 0)`.
struct ParamUpdate {
    decay: Option<f32>,
    inv_bc2: f32,
    eps: f32,
    step: f32,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let w = data_mut(s1, l1, self.name())?;
        let m = data(s2, l2, w.len(), self.name())?;
        let v = data(s3, l3, w.len(), self.name())?;
        let (inv, eps, step) = (self.inv_bc2, self.eps, self.step);
        match self.decay {
            Some(d) => zip3(w, m, v, |w, m, v| {
                let denom = (v.sqrt() * inv + 0.0) * 1.0 + eps;
                (w * d + 0.0) - ((m / denom) * step + 0.0)
            }),
            None => zip3(w, m, v, |w, m, v| {
                let denom = (v.sqrt() * inv + 0.0) * 1.0 + eps;
                w - ((m / denom) * step + 0.0)
            }),
        }
        Ok(())
    }
}

/// `t = (t * m + 0) + (s * (1 - m) + 0)`.
struct Ema {
    m: f32,
    c: f32,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "ema-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let t = data_mut(s1, l1, self.name())?;
        let s = data(s2, l2, t.len(), self.name())?;
        let (m, c) = (self.m, self.c);
        zip3(t, s, s, |t, s, _| (t * m + 0.0) + (s * c + 0.0));
        Ok(())
    }
}

/// True when every tensor can be updated by these kernels (contiguous f32 on the CPU, fused on).
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| fused::applies_to(t) && t.is_contiguous())
}

/// One AdamW step of a parameter with existing moments, all in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_inplace(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    b1: f64,
    b2: f64,
    eps: f64,
    decay: Option<f64>,
    bc2: f64,
    step_size: f64,
) -> Result<()> {
    m.inplace_op2(g, &FirstMoment((1.0 - b1) as f32))?;
    v.inplace_op2(
        g,
        &SecondMoment {
            b2: b2 as f32,
            c: (1.0 - b2) as f32,
        },
    )?;
    w.inplace_op3(
        m,
        v,
        &ParamUpdate {
            decay: decay.map(|d| d as f32),
            inv_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: eps as f32,
            step: step_size as f32,
        },
    )
}

/// `target = m target + (1 - m) online`, in place.
pub(crate) fn ema_inplace(target: &Tensor, online: &Tensor, momentum: f64) -> Result<()> {
    target.inplace_op2(
        online,
        &Ema {
            m: momentum as f32,
            c: (1.0 - momentum) as f32,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testutil::randn;

    fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn adamw_is_bit_identical_to_the_candle_chain() {
        let (b1, b2, eps, lr, wd) = (0.9, 0.999, 1e-8, 1e-3, 0.05);
        let t = 3;
        let w0 = randn(&[37, 5], 1);
        let g = randn(&[37, 5], 2).affine(0.1, 0.0).unwrap();
        let m0 = randn(&[37, 5], 3).affine(0.01, 0.0).unwrap();
        let v0 = randn(&[37, 5], 4).sqr().unwrap().affine(1e-4, 0.0).unwrap();
        let bc1 = 1.0 - f64::powi(b1, t);
        let bc2 = 1.0 - f64::powi(b2, t);
        for decay in [true, false] {
            // the chain of optim.rs
            let w = if decay {
                w0.affine(1.0 - lr * wd, 0.0).unwrap()
            } else {
                w0.clone()
            };
            let m = (&m0 + ((&g - &m0).unwrap() * (1.0 - b1)).unwrap()).unwrap();
            let vv = ((&v0 * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let denom = ((vv.sqrt().unwrap() / bc2.sqrt()).unwrap() + eps).unwrap();
            let w = (w - ((&m / &denom).unwrap() * (lr / bc1)).unwrap()).unwrap();
            let (wf, mf, vf) = (w0.copy().unwrap(), m0.copy().unwrap(), v0.copy().unwrap());
            adamw_inplace(
                &wf,
                &g,
                &mf,
                &vf,
                b1,
                b2,
                eps,
                decay.then_some(1.0 - lr * wd),
                bc2,
                lr / bc1,
            )
            .unwrap();
            assert_eq!(v(&mf), v(&m));
            assert_eq!(v(&vf), v(&vv));
            assert_eq!(v(&wf), v(&w));
        }
    }

    #[test]
    fn ema_is_bit_identical_to_the_candle_chain() {
        let t0 = randn(&[1000], 1);
        let s = randn(&[1000], 2);
        let want = (t0.affine(0.996, 0.0).unwrap() + s.affine(1.0 - 0.996, 0.0).unwrap()).unwrap();
        let t = t0.copy().unwrap();
        ema_inplace(&t, &s, 0.996).unwrap();
        assert_eq!(v(&t), v(&want));
    }
}

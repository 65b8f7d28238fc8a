//! In-place, one-pass CPU kernels of the AdamW update and the EMA (f32), used while
//! `model::fused::enabled()`. They compute exactly the f32 operations of the unfused candle chains
//! in [`super::optim`] and [`super::ema`] (same order, same `x * mul + add` affine rounding), so
//! both paths give bit-identical parameters, without the dozen temporary tensors per parameter.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
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
    let d = crate::model::custom_op::f32_data((s, l), op)?;
    if d.len() != n {
        bail!("{op}: operand of {} elements, expected {n}", d.len())
    }
    Ok(d)
}

/// `dst[i] = f(dst[i], a[i])` over parallel chunks.
fn zip2(dst: &mut [f32], a: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    dst.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(d, a)| {
            fused::kernels::simd(|| {
                for (d, a) in d.iter_mut().zip(a) {
                    *d = f(*d, *a);
                }
            })
        });
}

/// The constants of one parameter's AdamW update.
#[derive(Debug, Clone, Copy)]
struct AdamConsts {
    /// `1 - beta1`.
    c1: f32,
    b2: f32,
    /// `1 - beta2`.
    c2: f32,
    /// `1 - lr wd` for a decayed parameter.
    decay: Option<f32>,
    /// `1 / sqrt(bias correction 2)`.
    inv_bc2: f32,
    eps: f32,
    /// `lr / bias correction 1`.
    step: f32,
}

impl AdamConsts {
    /// One element, with the f32 operations of the candle chain in `optim.rs`:
    /// `m = m + ((g - m) c1 + 0)` (torch's `exp_avg.lerp_(grad, 1 - beta1)`),
    /// `v = (v b2 + 0) + (g g c2 + 0)`,
    /// `w = [w decay + 0] - ((m / ((sqrt(v) inv_bc2 + 0) 1 + eps)) step + 0)`.
    #[inline(always)]
    fn update(&self, w: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        *m += (g - *m) * self.c1 + 0.0;
        *v = (*v * self.b2 + 0.0) + (g * g * self.c2 + 0.0);
        let denom = (v.sqrt() * self.inv_bc2 + 0.0) * 1.0 + self.eps;
        let w0 = match self.decay {
            Some(d) => *w * d + 0.0,
            None => *w,
        };
        *w = w0 - ((*m / denom) * self.step + 0.0);
    }
}

/// A value handed from an in-place op to the one nested in it (candle gives an op `&self`).
type Handoff<T> = Mutex<Option<T>>;

fn take<T>(h: &Handoff<T>, op: &str) -> Result<T> {
    match h.lock().map(|mut s| s.take()) {
        Ok(Some(s)) => Ok(s),
        _ => bail!("{op}: operand already taken"),
    }
}

/// An in-place op on one contiguous f32 CPU tensor: `f` gets its data.
struct InPlace<F> {
    name: &'static str,
    f: F,
}

fn in_place<F: Fn(&mut [f32]) -> Result<()>>(name: &'static str, f: F) -> InPlace<F> {
    InPlace { name, f }
}

impl<F: Fn(&mut [f32]) -> Result<()>> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        (self.f)(data_mut(s, l, self.name)?)
    }
}

/// An in-place op on one contiguous f32 CPU tensor that reads a second of the same size.
struct InPlaceWith<F> {
    name: &'static str,
    f: F,
}

fn in_place_with<F>(name: &'static str, f: F) -> InPlaceWith<F>
where
    F: Fn(&mut [f32], &[f32]) -> Result<()>,
{
    InPlaceWith { name, f }
}

impl<F: Fn(&mut [f32], &[f32]) -> Result<()>> InplaceOp2 for InPlaceWith<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dst = data_mut(s1, l1, self.name)?;
        let src = data(s2, l2, dst.len(), self.name)?;
        (self.f)(dst, src)
    }
}

/// The AdamW update reads and writes three tensors (weight, first and second moment), but a
/// candle in-place op may write only one. So the op on the first moment hands its data to the op
/// on the second moment, run inside it, which hands both to the op on the weight (reading the
/// gradient) inside that: one pass over the four.
fn adamw_cpu(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: AdamConsts) -> Result<()> {
    m.inplace_op1(&in_place("adamw-first-moment", |m| {
        let m = Mutex::new(Some(m));
        v.inplace_op1(&in_place("adamw-second-moment", |v| {
            let mv = Mutex::new(Some((take(&m, "adamw-second-moment")?, v)));
            w.inplace_op2(
                g,
                &in_place_with("adamw-update", |w, g| {
                    let (m, v) = take(&mv, "adamw-update")?;
                    if m.len() != w.len() || v.len() != w.len() {
                        bail!(
                            "adamw-update: moments of {} and {} elements for a parameter of {}",
                            m.len(),
                            v.len(),
                            w.len()
                        )
                    }
                    w.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((w, m), v), g)| {
                            fused::kernels::simd(|| {
                                for (((w, m), v), g) in w.iter_mut().zip(m).zip(v).zip(g) {
                                    k.update(w, m, v, *g);
                                }
                            })
                        });
                    Ok(())
                }),
            )
        }))
    }))
}

/// True when every tensor can be updated by these kernels (contiguous f32 on the CPU, fused on).
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| fused::applies_to(t) && t.is_contiguous())
}

/// True when every tensor can be updated by the CUDA kernels of the same formulas (contiguous f32
/// on one CUDA device, `model::cuda_kernels` on and compiled). Their f32 results follow the
/// formulas of the CPU kernels with fused multiply-adds, so they agree to float rounding, not
/// bit for bit.
pub(crate) fn applies_cuda(ts: &[&Tensor]) -> bool {
    #[cfg(feature = "cuda")]
    return ts.iter().all(|t| {
        t.device().is_cuda()
            && t.dtype() == candle_core::DType::F32
            && t.is_contiguous()
            && t.device().same_device(ts[0].device())
    }) && crate::model::cuda_kernels::available(cuda::MODULE, cuda::SRC);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ts;
        false
    }
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
    let k = AdamConsts {
        c1: (1.0 - b1) as f32,
        b2: b2 as f32,
        c2: (1.0 - b2) as f32,
        decay: decay.map(|d| d as f32),
        inv_bc2: (1.0 / bc2.sqrt()) as f32,
        eps: eps as f32,
        step: step_size as f32,
    };
    for (t, what) in [(w, "weight"), (m, "first moment"), (v, "second moment")] {
        if t.elem_count() != g.elem_count() {
            bail!(
                "adamw: {what} of {} elements, gradient of {}",
                t.elem_count(),
                g.elem_count()
            )
        }
    }
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        return cuda::adamw(w, g, m, v, &k);
    }
    adamw_cpu(w, g, m, v, k)
}

/// `target = m target + (1 - m) online`, in place.
pub(crate) fn ema_inplace(target: &Tensor, online: &Tensor, momentum: f64) -> Result<()> {
    #[cfg(feature = "cuda")]
    if target.device().is_cuda() {
        return cuda::ema(target, online, momentum as f32, (1.0 - momentum) as f32);
    }
    // `t = (t * m + 0) + (s * (1 - m) + 0)`
    let (m, c) = (momentum as f32, (1.0 - momentum) as f32);
    let ema = in_place_with("ema-update", |t, s| {
        zip2(t, s, |t, s| (t * m + 0.0) + (s * c + 0.0));
        Ok(())
    });
    target.inplace_op2(online, &ema)
}

/// The AdamW update and the EMA as one CUDA kernel launch per parameter (the candle chain takes
/// about a dozen passes over each parameter, each a launch and a temporary tensor). The kernels
/// write the weight and the moments in place through their device pointers, as the CPU kernels
/// do through their storage.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::{bail, Result, Storage, Tensor};

    use super::AdamConsts;
    use crate::model::cuda_kernels::{launch, launch_config};

    pub const MODULE: &str = "cjepa_update";
    pub const SRC: &str = r#"
extern "C" __global__ void cjepa_adamw_f32(
    float* w, float* m, float* v, const float* g, unsigned long long n,
    float c1, float b2, float c2, int has_decay, float decay, float inv_bc2, float eps, float step) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    float gi = g[i];
    float mi = m[i];
    mi += (gi - mi) * c1;
    float vi = v[i] * b2 + gi * gi * c2;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi) * inv_bc2 + eps;
    float wi = has_decay ? w[i] * decay : w[i];
    w[i] = wi - (mi / denom) * step;
  }
}
extern "C" __global__ void cjepa_ema_f32(
    float* t, const float* s, unsigned long long n, float m, float c) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    t[i] = t[i] * m + s[i] * c;
  }
}
"#;

    /// The device slice of a contiguous f32 CUDA tensor, `(storage guard, start, len)`.
    macro_rules! slice_of {
        ($t:expr, $guard:ident) => {{
            let (s, l) = $t.storage_and_layout();
            let Some((a, b)) = l.contiguous_offsets() else {
                bail!("cuda update: a contiguous tensor is needed")
            };
            $guard = s;
            match &*$guard {
                Storage::Cuda(c) => c.as_cuda_slice::<f32>()?.slice(a..b),
                _ => bail!("cuda update: a CUDA tensor is needed"),
            }
        }};
    }

    pub fn adamw(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, k: &AdamConsts) -> Result<()> {
        let Some(dev) = w.device().as_cuda_device().ok() else {
            bail!("cuda update: the weight is not on CUDA")
        };
        let n = w.elem_count() as u64;
        let (gw, gg, gm, gv);
        let sw = slice_of!(w, gw);
        let sg = slice_of!(g, gg);
        let sm = slice_of!(m, gm);
        let sv = slice_of!(v, gv);
        let (has_decay, decay) = match k.decay {
            Some(d) => (1i32, d),
            None => (0i32, 1.0f32),
        };
        // SAFETY: the four slices hold `n` f32 each (checked by the caller); the kernel writes
        // w, m and v in place, which no other tensor reads during the update.
        launch!(
            dev,
            (MODULE, SRC),
            "cjepa_adamw_f32",
            launch_config(n),
            [
                &sw, &sm, &sv, &sg, &n, &k.c1, &k.b2, &k.c2, &has_decay, &decay, &k.inv_bc2,
                &k.eps, &k.step
            ]
        )
    }

    pub fn ema(t: &Tensor, s: &Tensor, m: f32, c: f32) -> Result<()> {
        let Some(dev) = t.device().as_cuda_device().ok() else {
            bail!("cuda update: the target is not on CUDA")
        };
        if s.elem_count() != t.elem_count() {
            bail!("ema: {} vs {} elements", t.elem_count(), s.elem_count())
        }
        let n = t.elem_count() as u64;
        let (gt, gs);
        let st = slice_of!(t, gt);
        let ss = slice_of!(s, gs);
        // SAFETY: both slices hold `n` f32; the target is written in place.
        launch!(
            dev,
            (MODULE, SRC),
            "cjepa_ema_f32",
            launch_config(n),
            [&st, &ss, &n, &m, &c]
        )
    }
}

/// The elementwise mean of equally shaped tensors, `((p0 + p1) + ...) * (1 / n)` (the order of a
/// sum over ranks), in one parallel pass for contiguous f32 CPU tensors and with candle ops for
/// any other.
pub(crate) fn mean_of(parts: &[Tensor]) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        bail!("mean of no tensors")
    };
    let inv = 1.0 / parts.len() as f64;
    if parts.len() == 1 {
        return Ok(first.clone());
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    if !applies(&refs) || parts.iter().any(|p| p.shape() != first.shape()) {
        let mut sum = first.clone();
        for p in &parts[1..] {
            sum = (sum + p)?;
        }
        return sum.affine(inv, 0.0);
    }
    let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
    let mut srcs = Vec::with_capacity(parts.len());
    for (s, l) in &guards {
        match &**s {
            candle_core::Storage::Cpu(cs) => {
                srcs.push(crate::model::custom_op::f32_data((cs, l), "mean-of")?)
            }
            _ => bail!("mean-of: expected CPU tensors"),
        }
    }
    let n = first.elem_count();
    // SAFETY: every element is written below before the buffer is read.
    let mut out = unsafe { fused::kernels::output_buffer(n) };
    let inv = inv as f32;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let (lo, len) = (c * CHUNK, dst.len());
        fused::kernels::simd(|| {
            dst.copy_from_slice(&srcs[0][lo..lo + len]);
            for src in &srcs[1..] {
                for (d, s) in dst.iter_mut().zip(&src[lo..lo + len]) {
                    *d += s;
                }
            }
            for d in dst.iter_mut() {
                *d = *d * inv + 0.0;
            }
        })
    });
    drop(guards);
    fused::tensor(out, first.dims())
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
    fn mean_of_matches_the_candle_sum_then_scale() {
        let parts: Vec<Tensor> = (0..3).map(|i| randn(&[CHUNK + 77, 3], i)).collect();
        let want = ((&parts[0] + &parts[1]).unwrap() + &parts[2])
            .unwrap()
            .affine(1.0 / 3.0, 0.0)
            .unwrap();
        assert_eq!(v(&mean_of(&parts).unwrap()), v(&want));
        assert_eq!(v(&mean_of(&parts[..1]).unwrap()), v(&parts[0]));
        assert!(mean_of(&[]).is_err());
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

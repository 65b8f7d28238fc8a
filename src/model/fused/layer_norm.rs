//! LayerNorm over the last axis (biased variance), affine (an `Op<3>`: x, weight, bias) or
//! without affine parameters (an `Op<1>`). The forward saves mean and 1/std of every row; the
//! backward is one pass over the rows: `dx = rstd (g - mean(g) - x̂ mean(g x̂))` with `g = dy w`,
//! and the per-thread partial sums of `dw = Σ dy x̂`, `db = Σ dy` added at the end.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, Layout, Result, Tensor};

use super::kernels::{dot, output_buffer, par_rows, par_rows_sum, simd_fn, sum};
use super::{tensor, with_data, SendPtr};
use crate::model::custom_op::{apply, f32_data, CpuArg, CpuOut, Grads, Op};

const OP: &str = "fused layer_norm";

/// Row statistics saved by the forward pass.
struct Stats {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

struct LayerNorm {
    eps: f32,
    saved: OnceLock<Stats>,
}

impl LayerNorm {
    fn new(eps: f64) -> Self {
        Self {
            eps: eps as f32,
            saved: OnceLock::new(),
        }
    }

    /// Normalises `x` (rows of `d`), with optional affine parameters; saves the statistics.
    fn forward(&self, x: &[f32], d: usize, affine: Option<(&[f32], &[f32])>) -> Result<Vec<f32>> {
        if d == 0 {
            bail!("fused layer_norm: empty last axis")
        }
        let rows = x.len() / d;
        // SAFETY: the row chunks below write every row of y and its mean and rstd.
        let (mut y, mut mean, mut rstd) = unsafe {
            (
                output_buffer(x.len()),
                output_buffer(rows),
                output_buffer(rows),
            )
        };
        let (yp, mp, rp) = (
            SendPtr(y.as_mut_ptr()),
            SendPtr(mean.as_mut_ptr()),
            SendPtr(rstd.as_mut_ptr()),
        );
        let eps = self.eps;
        par_rows(rows, 16, |r| {
            let (yp, mp, rp) = (yp, mp, rp);
            let (a, e) = (r.start * d, r.end * d);
            // SAFETY: each chunk writes its own rows of y and entries of mean and rstd.
            let (yr, mr, rr) = unsafe {
                (
                    std::slice::from_raw_parts_mut(yp.0.add(a), e - a),
                    std::slice::from_raw_parts_mut(mp.0.add(r.start), r.len()),
                    std::slice::from_raw_parts_mut(rp.0.add(r.start), r.len()),
                )
            };
            normalize_rows(&x[a..e], yr, mr, rr, d, eps, affine);
        });
        let _ = self.saved.set(Stats { mean, rstd });
        Ok(y)
    }

    /// `(dx, [dw; db])` from the saved statistics.
    fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        d: usize,
        w: Option<&[f32]>,
        want_dx: bool,
        want_params: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let Some(st) = self.saved.get() else {
            bail!("fused layer_norm: backward before forward")
        };
        let rows = x.len() / d;
        let mut dx = if want_dx {
            // SAFETY: the row chunks below write every row of dx when it is wanted.
            unsafe { output_buffer(x.len()) }
        } else {
            Vec::new()
        };
        let dxp = SendPtr(dx.as_mut_ptr());
        let plen = if want_params { 2 * d } else { 0 };
        let params = par_rows_sum(rows, 16, plen, |r, acc| {
            let dxp = dxp;
            let (a, e) = (r.start * d, r.end * d);
            // SAFETY: each chunk writes its own rows of dx (when dx is wanted).
            let dxr =
                want_dx.then(|| unsafe { std::slice::from_raw_parts_mut(dxp.0.add(a), e - a) });
            let rows = BwdRows {
                x: &x[a..e],
                dy: &dy[a..e],
                mean: &st.mean[r.clone()],
                rstd: &st.rstd[r],
            };
            backward_rows(rows, d, w, dxr, acc, want_params);
        });
        Ok((want_dx.then_some(dx), params))
    }
}

simd_fn! {
    /// Normalises the `d`-wide rows of `x` into `y` (times `w`, plus `b`), with their means and
    /// reciprocal standard deviations.
    fn normalize_rows(
        x: &[f32],
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        d: usize,
        eps: f32,
        affine: Option<(&[f32], &[f32])>,
    ) {
        if d == 0 {
            return;
        }
        for (((xr, yr), mo), ro) in x
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(mean.iter_mut())
            .zip(rstd.iter_mut())
        {
            let mu = sum(xr) / d as f32;
            for (o, v) in yr.iter_mut().zip(xr) {
                *o = v - mu;
            }
            let var = dot(yr, yr) / d as f32;
            let rs = 1.0 / (var + eps).sqrt();
            match affine {
                Some((w, b)) => {
                    for ((o, w), b) in yr.iter_mut().zip(w).zip(b) {
                        *o = *o * rs * w + b;
                    }
                }
                None => {
                    for o in yr.iter_mut() {
                        *o *= rs;
                    }
                }
            }
            *mo = mu;
            *ro = rs;
        }
    }
}

/// The rows of one backward chunk: input, output gradient, and their saved statistics.
#[derive(Clone, Copy)]
struct BwdRows<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    mean: &'a [f32],
    rstd: &'a [f32],
}

simd_fn! {
    /// The backward of the `d`-wide rows: `dx` (when given) and, with `want_params`, adds
    /// `Σ dy x̂` and `Σ dy` into `acc = [dw; db]`.
    fn backward_rows(
        rows: BwdRows,
        d: usize,
        w: Option<&[f32]>,
        dx: Option<&mut [f32]>,
        acc: &mut [f32],
        want_params: bool,
    ) {
        if d == 0 {
            return;
        }
        let mut xhat = vec![0f32; d];
        let mut g = vec![0f32; d];
        let mut dx = dx;
        for (i, (xr, gr)) in rows.x.chunks_exact(d).zip(rows.dy.chunks_exact(d)).enumerate() {
            let (mu, rs) = (rows.mean[i], rows.rstd[i]);
            for (h, v) in xhat.iter_mut().zip(xr) {
                *h = (v - mu) * rs;
            }
            if want_params {
                let (dw, db) = acc.split_at_mut(d);
                for (((a, b), gv), h) in dw.iter_mut().zip(db.iter_mut()).zip(gr).zip(&xhat) {
                    *a += gv * h;
                    *b += gv;
                }
            }
            let Some(dx) = dx.as_deref_mut() else {
                continue;
            };
            match w {
                Some(w) => {
                    for ((o, gv), wv) in g.iter_mut().zip(gr).zip(w) {
                        *o = gv * wv;
                    }
                }
                None => g.copy_from_slice(gr),
            }
            let a = sum(&g) / d as f32;
            let c = dot(&g, &xhat) / d as f32;
            let dr = &mut dx[i * d..(i + 1) * d];
            for ((o, gv), h) in dr.iter_mut().zip(&g).zip(&xhat) {
                *o = rs * (gv - a - h * c);
            }
        }
    }
}

fn last_dim(l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) => Ok(d),
        None => bail!("fused layer_norm: scalar input"),
    }
}

impl Op<3> for LayerNorm {
    const NAME: &'static str = "fused-layer-norm";

    fn cpu(&self, [x, w, b]: [CpuArg<'_>; 3]) -> CpuOut {
        let d = last_dim(x.1)?;
        if w.1.dims() != [d] || b.1.dims() != [d] {
            bail!(
                "fused layer_norm: weight {:?} / bias {:?} do not fit the last axis {d}",
                w.1.dims(),
                b.1.dims()
            )
        }
        let shape = x.1.shape().clone();
        let (x, w, b) = (f32_data(x, OP)?, f32_data(w, OP)?, f32_data(b, OP)?);
        let y = self.forward(x, d, Some((w, b)))?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, [x, w, b]: [&Tensor; 3], _res: &Tensor, dy: &Tensor) -> Grads<3> {
        let d = x.dim(candle_core::D::Minus1)?;
        let want_params = w.track_op() || b.track_op();
        let (dx, p) = with_data(x, OP, |xs| {
            with_data(dy, OP, |g| {
                with_data(w, OP, |ws| {
                    self.backward(xs, g, d, Some(ws), x.track_op(), want_params)
                })
            })
        })?;
        let dx = dx.map(|v| tensor(v, x.dims())).transpose()?;
        if !want_params {
            return Ok([dx, None, None]);
        }
        let db = p[d..].to_vec();
        let mut dw = p;
        dw.truncate(d);
        Ok([dx, Some(tensor(dw, &[d])?), Some(tensor(db, &[d])?)])
    }
}

impl Op<1> for LayerNorm {
    const NAME: &'static str = "fused-layer-norm-plain";

    fn cpu(&self, [x]: [CpuArg<'_>; 1]) -> CpuOut {
        let d = last_dim(x.1)?;
        let y = self.forward(f32_data(x, OP)?, d, None)?;
        Ok((CpuStorage::F32(y), x.1.shape().clone()))
    }

    fn bwd(&self, [x]: [&Tensor; 1], _res: &Tensor, dy: &Tensor) -> Grads<1> {
        let d = x.dim(candle_core::D::Minus1)?;
        let (dx, _) = with_data(x, OP, |xs| {
            with_data(dy, OP, |g| self.backward(xs, g, d, None, true, false))
        })?;
        Ok([dx.map(|v| tensor(v, x.dims())).transpose()?])
    }
}

/// Affine LayerNorm of the last axis of an f32 CPU tensor.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (w, b) = (weight.contiguous()?, bias.contiguous()?);
    apply([&x.contiguous()?, &w, &b], LayerNorm::new(eps))
}

/// LayerNorm of the last axis without affine parameters.
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    apply([&x.contiguous()?], LayerNorm::new(eps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused::testutil::{assert_close, assert_grads_close, randn, var};
    use crate::model::layers;

    #[test]
    fn affine_matches_unfused() {
        for shape in [vec![2usize, 37, 24], vec![5, 3]] {
            let d = *shape.last().unwrap();
            let x = var(&shape, 1, 2.0, 0.5);
            let w = var(&[d], 2, 0.5, 1.0);
            let b = var(&[d], 3, 0.5, 0.0);
            let probe = randn(&shape, 4);
            let f = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
            let u = layers::layer_norm_plain_unfused(x.as_tensor(), 1e-6)
                .unwrap()
                .broadcast_mul(w.as_tensor())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap();
            assert_close("layer_norm y", &f, &u, 1e-5, 1e-5);
            let vars = [("x", &x), ("w", &w), ("b", &b)];
            assert_grads_close("layer_norm", &f, &u, &probe, &vars, 1e-4, 1e-4);
        }
    }

    #[test]
    fn plain_matches_unfused() {
        let x = var(&[3, 11, 20], 5, 3.0, -1.0);
        let probe = randn(&[3, 11, 20], 6);
        let f = layer_norm_plain(x.as_tensor(), 1e-5).unwrap();
        let u = layers::layer_norm_plain_unfused(x.as_tensor(), 1e-5).unwrap();
        assert_close("layer_norm_plain y", &f, &u, 1e-5, 1e-5);
        assert_grads_close("layer_norm_plain", &f, &u, &probe, &[("x", &x)], 1e-4, 1e-4);
    }
}

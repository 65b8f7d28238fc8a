//! Fixed 2-D sin-cos position embedding of I-JEPA (MAE style), for any h x w grid.
//!
//! For width `E` (a multiple of 4), `q = E/4`, `w_k = 10000^(-k/q)`, token `n = r*w + c`:
//! channels `[0,q)` = sin(c*w), `[q,2q)` = cos(c*w), `[2q,3q)` = sin(r*w), `[3q,4q)` = cos(r*w).
//! The first half encodes the COLUMN index (the official code calls it `emb_h`). Computed in f64
//! and rounded to f32 like the official numpy code, so an embedding for another image size is simply
//! recomputed on the new grid (no interpolation).

use candle_core::{Device, Tensor};

use super::error::{ModelError, Result};

/// Row-major (h*w, dim) sin-cos table as a flat f32 vector. `dim` must be a multiple of 4.
pub fn sincos_2d(dim: usize, h: usize, w: usize) -> Result<Vec<f32>> {
    if dim == 0 || !dim.is_multiple_of(4) {
        return Err(ModelError::Config {
            field: "embed_dim",
            msg: format!("sin-cos pos-embed width {dim} must be a positive multiple of 4"),
        });
    }
    let q = dim / 4;
    let omega: Vec<f64> = (0..q)
        .map(|k| {
            let e = k as f64 / q as f64;
            1.0 / 10000f64.powf(e)
        })
        .collect();
    let mut out = vec![0f32; h * w * dim];
    for r in 0..h {
        for c in 0..w {
            let row = &mut out[(r * w + c) * dim..(r * w + c + 1) * dim];
            for (k, om) in omega.iter().enumerate() {
                let xc = c as f64 * om;
                let yr = r as f64 * om;
                row[k] = xc.sin() as f32;
                row[q + k] = xc.cos() as f32;
                row[2 * q + k] = yr.sin() as f32;
                row[3 * q + k] = yr.cos() as f32;
            }
        }
    }
    Ok(out)
}

/// The same table as a (h*w, dim) tensor (no batch axis, no gradient).
pub fn sincos_2d_tensor(dim: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let v = sincos_2d(dim, h, w)?;
    Ok(Tensor::from_vec(v, (h * w, dim), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_values() {
        let v = sincos_2d(8, 2, 3).unwrap();
        // token (r=1, c=2): column part uses 2, row part uses 1; w = [1, 1e-2]
        let t = &v[(3 + 2) * 8..(3 + 3) * 8];
        let exp = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, b) in t.iter().zip(exp) {
            assert!((*a as f64 - b).abs() < 1e-7, "{a} vs {b}");
        }
        // token 0 is [0.., 1.., 0.., 1..]
        assert_eq!(&v[0..8], &[0., 0., 1., 1., 0., 0., 1., 1.]);
    }

    #[test]
    fn rejects_bad_width() {
        assert!(sincos_2d(6, 2, 2).is_err());
    }
}

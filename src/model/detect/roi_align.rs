//! RoIAlign (He et al., Mask R-CNN, arXiv 1703.06870) with torchvision's semantics
//! (`torchvision.ops.roi_align`, CPU kernel `roi_align_kernel.cpp`), over several pyramid levels,
//! with a backward pass.
//!
//! The sampling geometry depends only on the boxes, never on the features, so it is computed on
//! the host as a sparse **plan**: output row `dst` (roi `k`, bin `(ph, pw)`) receives
//! `weight * table[src]`, where `table` is every level's channels-last map flattened to
//! `(N * H * W, C)` rows and concatenated. The tensor side is then
//! `zeros.index_add(dst, table.index_select(src) * weight)` (`model::gather`: candle's ops on the
//! CPU, parallel custom kernels on CUDA), differentiable with respect to the features (like
//! torchvision there is no gradient for the boxes).
//!
//! Geometry (torchvision): with `aligned`, box corners are shifted by -0.5 pixel after scaling;
//! without it a box is at least 1x1. Each of the `P x P` bins averages a
//! `grid_h x grid_w` lattice of bilinear samples (`sampling_ratio`, or `ceil(size / P)` when it is
//! 0); a sample outside `[-1, H] x [-1, W]` counts as zero, coordinates are clamped at 0 and at the
//! last row / column. [`roi_align_naive`] is a literal single-level loop port used as the test
//! reference and for mask targets.

use candle_core::{DType, Tensor};

use super::box_coding::BoxXyxy;
use crate::model::error::{ModelError, Result};
use crate::model::gather::{gather_rows, scatter_add_rows};

/// One region: image in the batch, pyramid level (index into the feature list), box in input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roi {
    /// Image index in the batch.
    pub batch: usize,
    /// Level index into the feature list.
    pub level: usize,
    /// Box `[x1, y1, x2, y2]` in input pixels.
    pub bbox: BoxXyxy,
}

/// Sampling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoiAlignConfig {
    /// Output side `P`.
    pub output: usize,
    /// Samples per bin side; 0 = adaptive `ceil(roi_size / P)`.
    pub sampling_ratio: usize,
    /// Half-pixel shift (detectron2 `ROIAlignV2`).
    pub aligned: bool,
}

/// Geometry of one feature level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelGeom {
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// `1 / stride`.
    pub scale: f32,
}

/// The sparse sampling plan: `out[dst[i]] += weight[i] * table[src[i]]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Table rows read.
    pub src: Vec<u32>,
    /// Output rows written (`k * P * P + ph * P + pw`).
    pub dst: Vec<u32>,
    /// Weights (bilinear weight / sample count).
    pub weight: Vec<f32>,
    /// Output rows `K * P * P`.
    pub rows_out: usize,
}

/// Bilinear taps of torchvision's `bilinear_interpolate`: `(row, col, weight)` x 4, or none when
/// the point lies outside `[-1, h] x [-1, w]`.
fn taps(y: f32, x: f32, h: usize, w: usize) -> Option<[(usize, usize, f32); 4]> {
    if y < -1.0 || y > h as f32 || x < -1.0 || x > w as f32 {
        return None;
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut y_low, mut x_low) = (y as usize, x as usize);
    let (y_high, x_high);
    if y_low >= h - 1 {
        y_low = h - 1;
        y_high = h - 1;
        y = y_low as f32;
    } else {
        y_high = y_low + 1;
    }
    if x_low >= w - 1 {
        x_low = w - 1;
        x_high = w - 1;
        x = x_low as f32;
    } else {
        x_high = x_low + 1;
    }
    let (ly, lx) = (y - y_low as f32, x - x_low as f32);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Some([
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ])
}

/// Box geometry on a level: `(start_y, start_x, bin_h, bin_w, grid_h, grid_w)`.
fn bins(b: &BoxXyxy, scale: f32, cfg: &RoiAlignConfig) -> (f32, f32, f32, f32, usize, usize) {
    let off = if cfg.aligned { 0.5 } else { 0.0 };
    let (sx, sy) = (b[0] * scale - off, b[1] * scale - off);
    let (ex, ey) = (b[2] * scale - off, b[3] * scale - off);
    let (mut rw, mut rh) = (ex - sx, ey - sy);
    if !cfg.aligned {
        rw = rw.max(1.0);
        rh = rh.max(1.0);
    }
    let p = cfg.output as f32;
    let (bh, bw) = (rh / p, rw / p);
    let grid = |size: f32| {
        if cfg.sampling_ratio > 0 {
            cfg.sampling_ratio
        } else {
            (size / p).ceil().max(0.0) as usize
        }
    };
    (sy, sx, bh, bw, grid(rh), grid(rw))
}

/// Build the plan of `rois` over `levels` for a batch of `batch` images. Entries hitting the same
/// table row for the same output are merged.
pub fn plan(
    rois: &[Roi],
    levels: &[LevelGeom],
    batch: usize,
    cfg: &RoiAlignConfig,
) -> Result<Plan> {
    let mut level_off = Vec::with_capacity(levels.len());
    let mut off = 0usize;
    for l in levels {
        level_off.push(off);
        off += batch * l.h * l.w;
    }
    if off > u32::MAX as usize {
        return Err(ModelError::Input {
            what: "roi_align",
            msg: format!("{off} feature rows do not fit 32-bit indices"),
        });
    }
    let p = cfg.output;
    let mut out = Plan {
        rows_out: rois.len() * p * p,
        ..Default::default()
    };
    let mut acc: Vec<(u32, f32)> = Vec::new();
    for (k, r) in rois.iter().enumerate() {
        let Some(lg) = levels.get(r.level) else {
            return Err(ModelError::Input {
                what: "roi_align",
                msg: format!("roi {k} asks for level {} of {}", r.level, levels.len()),
            });
        };
        if r.batch >= batch {
            return Err(ModelError::Input {
                what: "roi_align",
                msg: format!("roi {k} asks for image {} of a batch of {batch}", r.batch),
            });
        }
        let base = level_off[r.level] + r.batch * lg.h * lg.w;
        let (sy, sx, bh, bw, gh, gw) = bins(&r.bbox, lg.scale, cfg);
        let count = (gh * gw).max(1) as f32;
        for ph in 0..p {
            for pw in 0..p {
                acc.clear();
                for iy in 0..gh {
                    let y = sy + ph as f32 * bh + (iy as f32 + 0.5) * bh / gh as f32;
                    for ix in 0..gw {
                        let x = sx + pw as f32 * bw + (ix as f32 + 0.5) * bw / gw as f32;
                        let Some(t) = taps(y, x, lg.h, lg.w) else {
                            continue;
                        };
                        for (yy, xx, wt) in t {
                            if wt == 0.0 {
                                continue;
                            }
                            let src = (base + yy * lg.w + xx) as u32;
                            match acc.iter_mut().find(|(s, _)| *s == src) {
                                Some(e) => e.1 += wt,
                                None => acc.push((src, wt)),
                            }
                        }
                    }
                }
                let dst = (k * p * p + ph * p + pw) as u32;
                for &(src, wt) in &acc {
                    out.src.push(src);
                    out.dst.push(dst);
                    out.weight.push(wt / count);
                }
            }
        }
    }
    Ok(out)
}

/// Level geometry of `(N, H, W, C)` feature maps with the given strides.
pub fn level_geoms(feats: &[Tensor], strides: &[usize]) -> Result<Vec<LevelGeom>> {
    feats
        .iter()
        .zip(strides)
        .map(|(f, &s)| {
            let (_, h, w, _) = f.dims4()?;
            Ok(LevelGeom {
                h,
                w,
                scale: 1.0 / s as f32,
            })
        })
        .collect()
}

/// RoIAlign of `rois` over the levels `feats` (each channels-last `(N, H_l, W_l, C)`, stride
/// `strides[l]`): `(K, P, P, C)`, differentiable with respect to the features.
pub fn roi_align(
    feats: &[Tensor],
    strides: &[usize],
    rois: &[Roi],
    cfg: &RoiAlignConfig,
) -> Result<Tensor> {
    let first = feats.first().ok_or_else(|| ModelError::Input {
        what: "roi_align",
        msg: "no feature levels".into(),
    })?;
    let (n, _, _, c) = first.dims4()?;
    let dev = first.device();
    let p = cfg.output;
    let geoms = level_geoms(feats, strides)?;
    let pl = plan(rois, &geoms, n, cfg)?;
    let dtype = first.dtype();
    if rois.is_empty() {
        return Ok(Tensor::zeros((0, p, p, c), dtype, dev)?);
    }
    let rows: Vec<Tensor> = feats
        .iter()
        .map(|f| {
            let (b, h, w, c) = f.dims4()?;
            f.reshape((b * h * w, c))
        })
        .collect::<candle_core::Result<_>>()?;
    let table = Tensor::cat(&rows, 0)?;
    let m = pl.src.len();
    let out = if m == 0 {
        Tensor::zeros((pl.rows_out, c), dtype, dev)?
    } else {
        let src = Tensor::from_vec(pl.src, m, dev)?;
        let dst = Tensor::from_vec(pl.dst, m, dev)?;
        let wt = Tensor::from_vec(pl.weight, (m, 1), dev)?.to_dtype(dtype)?;
        let g = gather_rows(&table, &src)?.broadcast_mul(&wt)?;
        scatter_add_rows(&g, &dst, pl.rows_out)?
    };
    Ok(out.reshape((rois.len(), p, p, c))?)
}

/// Literal port of torchvision's CPU `roi_align` forward on one level: `feat` is `(N, C, H, W)`
/// row-major, `rois` are `(image, box)` pairs, `scale = 1 / stride`. Returns `(K, C, P, P)`.
pub fn roi_align_naive(
    feat: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    rois: &[(usize, BoxXyxy)],
    scale: f32,
    cfg: &RoiAlignConfig,
) -> Vec<f32> {
    assert_eq!(feat.len(), n * c * h * w, "feature size");
    let at = |b: usize, ch: usize, y: usize, x: usize| feat[((b * c + ch) * h + y) * w + x];
    roi_align_with(at, (c, h, w), rois, scale, cfg)
}

/// [`roi_align_naive`] reading the map through `at(image, channel, row, col)` (so a `u8` mask
/// needs no conversion).
pub fn roi_align_with(
    at: impl Fn(usize, usize, usize, usize) -> f32,
    (c, h, w): (usize, usize, usize),
    rois: &[(usize, BoxXyxy)],
    scale: f32,
    cfg: &RoiAlignConfig,
) -> Vec<f32> {
    let p = cfg.output;
    let mut out = vec![0f32; rois.len() * c * p * p];
    for (k, &(b, bx)) in rois.iter().enumerate() {
        let offset = if cfg.aligned { 0.5 } else { 0.0 };
        let roi_start_w = bx[0] * scale - offset;
        let roi_start_h = bx[1] * scale - offset;
        let roi_end_w = bx[2] * scale - offset;
        let roi_end_h = bx[3] * scale - offset;
        let mut roi_width = roi_end_w - roi_start_w;
        let mut roi_height = roi_end_h - roi_start_h;
        if !cfg.aligned {
            roi_width = roi_width.max(1.0);
            roi_height = roi_height.max(1.0);
        }
        let bin_size_h = roi_height / p as f32;
        let bin_size_w = roi_width / p as f32;
        let grid_h = if cfg.sampling_ratio > 0 {
            cfg.sampling_ratio as i64
        } else {
            (roi_height / p as f32).ceil() as i64
        };
        let grid_w = if cfg.sampling_ratio > 0 {
            cfg.sampling_ratio as i64
        } else {
            (roi_width / p as f32).ceil() as i64
        };
        let count = (grid_h * grid_w).max(1) as f32;
        for ch in 0..c {
            for ph in 0..p {
                for pw in 0..p {
                    let mut sum = 0f32;
                    for iy in 0..grid_h.max(0) {
                        let y = roi_start_h
                            + ph as f32 * bin_size_h
                            + (iy as f32 + 0.5) * bin_size_h / grid_h as f32;
                        for ix in 0..grid_w.max(0) {
                            let x = roi_start_w
                                + pw as f32 * bin_size_w
                                + (ix as f32 + 0.5) * bin_size_w / grid_w as f32;
                            // bilinear_interpolate
                            if y < -1.0 || y > h as f32 || x < -1.0 || x > w as f32 {
                                continue;
                            }
                            let mut yy = if y <= 0.0 { 0.0 } else { y };
                            let mut xx = if x <= 0.0 { 0.0 } else { x };
                            let mut y_low = yy as usize;
                            let mut x_low = xx as usize;
                            let y_high;
                            let x_high;
                            if y_low >= h - 1 {
                                y_high = h - 1;
                                y_low = h - 1;
                                yy = y_low as f32;
                            } else {
                                y_high = y_low + 1;
                            }
                            if x_low >= w - 1 {
                                x_high = w - 1;
                                x_low = w - 1;
                                xx = x_low as f32;
                            } else {
                                x_high = x_low + 1;
                            }
                            let ly = yy - y_low as f32;
                            let lx = xx - x_low as f32;
                            let hy = 1.0 - ly;
                            let hx = 1.0 - lx;
                            sum += hy * hx * at(b, ch, y_low, x_low)
                                + hy * lx * at(b, ch, y_low, x_high)
                                + ly * hx * at(b, ch, y_high, x_low)
                                + ly * lx * at(b, ch, y_high, x_high);
                        }
                    }
                    out[((k * c + ch) * p + ph) * p + pw] = sum / count;
                }
            }
        }
    }
    out
}

/// Mask R-CNN's FPN level of a box (detectron2 `assign_boxes_to_levels`):
/// `floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8))` clamped to
/// `[min_level, max_level]`; levels are `log2(stride)`.
pub fn fpn_level(b: &BoxXyxy, min_level: i32, max_level: i32, canonical_level: i32) -> i32 {
    let size = ((b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)).sqrt() as f64;
    let lvl = (canonical_level as f64 + (size / 224.0 + 1e-8).log2()).floor() as i32;
    lvl.clamp(min_level, max_level)
}

/// `(K, C, P, P)` as host values (tests, mask targets).
pub fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn rand_feat(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * c * h * w)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect()
    }

    fn cases() -> Vec<(usize, BoxXyxy)> {
        vec![
            (0, [3.0, 5.0, 30.0, 22.0]),
            (1, [0.0, 0.0, 64.0, 48.0]),
            (0, [-6.0, 40.0, 10.0, 70.0]), // partly outside
            (1, [20.0, 20.0, 21.0, 20.5]), // tiny
            (0, [50.0, 10.0, 45.0, 30.0]), // inverted x
        ]
    }

    #[test]
    fn matches_naive_loop_on_two_levels() {
        let dev = Device::Cpu;
        let (n, c) = (2, 3);
        let f0 = rand_feat(n, c, 12, 16, 1); // stride 4
        let f1 = rand_feat(n, c, 6, 8, 2); // stride 8
        let nhwc = |f: &Vec<f32>, h: usize, w: usize| {
            Tensor::from_vec(f.clone(), (n, c, h, w), &dev)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (t0, t1) = (nhwc(&f0, 12, 16), nhwc(&f1, 6, 8));
        for cfg in [
            RoiAlignConfig {
                output: 7,
                sampling_ratio: 2,
                aligned: true,
            },
            RoiAlignConfig {
                output: 5,
                sampling_ratio: 0,
                aligned: true,
            },
            RoiAlignConfig {
                output: 4,
                sampling_ratio: 0,
                aligned: false,
            },
        ] {
            let rois: Vec<Roi> = cases()
                .iter()
                .enumerate()
                .map(|(i, &(b, bbox))| Roi {
                    batch: b,
                    level: i % 2,
                    bbox,
                })
                .collect();
            let out = roi_align(&[t0.clone(), t1.clone()], &[4, 8], &rois, &cfg).unwrap();
            let got = to_host(&out.permute((0, 3, 1, 2)).unwrap()).unwrap();
            let p = cfg.output;
            for (k, r) in rois.iter().enumerate() {
                let (f, dims, scale) = if r.level == 0 {
                    (&f0, (n, c, 12, 16), 0.25)
                } else {
                    (&f1, (n, c, 6, 8), 0.125)
                };
                let want = roi_align_naive(f, dims, &[(r.batch, r.bbox)], scale, &cfg);
                let g = &got[k * c * p * p..(k + 1) * c * p * p];
                for (a, b) in g.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{cfg:?} roi {k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn linear_ramp_is_sampled_at_bin_centres() {
        // f(y, x) = 2x + 3y is reproduced exactly by bilinear sampling inside the map, so each bin
        // of an interior box equals f at the bin centre (aligned: pixel centres at integer + 0.5).
        let (h, w) = (20, 20);
        let feat: Vec<f32> = (0..h * w)
            .map(|i| 2.0 * (i % w) as f32 + 3.0 * (i / w) as f32)
            .collect();
        let cfg = RoiAlignConfig {
            output: 4,
            sampling_ratio: 2,
            aligned: true,
        };
        let b = [4.0, 6.0, 12.0, 14.0];
        let out = roi_align_naive(&feat, (1, 1, h, w), &[(0, b)], 1.0, &cfg);
        for ph in 0..4 {
            for pw in 0..4 {
                let cx = b[0] - 0.5 + (pw as f32 + 0.5) * 2.0;
                let cy = b[1] - 0.5 + (ph as f32 + 0.5) * 2.0;
                let want = 2.0 * cx + 3.0 * cy;
                assert!((out[ph * 4 + pw] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (1, 2, 6, 7);
        let f = rand_feat(n, c, h, w, 5);
        let feat = Var::from_tensor(
            &Tensor::from_vec(f.clone(), (n, c, h, w), &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap();
        let rois = vec![
            Roi {
                batch: 0,
                level: 0,
                bbox: [1.3, 2.2, 20.7, 17.9],
            },
            Roi {
                batch: 0,
                level: 0,
                bbox: [-2.0, 10.0, 9.0, 30.0],
            },
        ];
        let cfg = RoiAlignConfig {
            output: 3,
            sampling_ratio: 0,
            aligned: true,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let r: Vec<f64> = (0..rois.len() * c * 9)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        let rt = Tensor::from_vec(r.clone(), (rois.len(), c, 3, 3), &dev).unwrap();
        let loss = |x: &Tensor| -> Tensor {
            let nhwc = x.permute((0, 2, 3, 1)).unwrap();
            let out = roi_align(&[nhwc], &[4], &rois, &cfg).unwrap();
            (out.permute((0, 3, 1, 2)).unwrap() * &rt)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(feat.as_tensor()).backward().unwrap();
        let g = grads
            .get(feat.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base: Vec<f64> = feat.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eps = 1e-3;
        let mut nonzero = 0;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let lp = loss(&Tensor::from_vec(plus, (n, c, h, w), &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let lm = loss(&Tensor::from_vec(minus, (n, c, h, w), &dev).unwrap())
                .to_scalar::<f64>()
                .unwrap();
            let num = (lp - lm) / (2.0 * eps);
            assert!((num - g[i]).abs() < 1e-6, "d/dfeat[{i}]: {} vs {num}", g[i]);
            if g[i].abs() > 1e-9 {
                nonzero += 1;
            }
        }
        assert!(
            nonzero > 10,
            "the rois must touch many feature cells ({nonzero})"
        );
    }

    #[test]
    fn fpn_level_assignment() {
        assert_eq!(fpn_level(&[0.0, 0.0, 224.0, 224.0], 2, 5, 4), 4);
        assert_eq!(fpn_level(&[0.0, 0.0, 112.0, 112.0], 2, 5, 4), 3);
        assert_eq!(fpn_level(&[0.0, 0.0, 10.0, 10.0], 2, 5, 4), 2);
        assert_eq!(fpn_level(&[0.0, 0.0, 1000.0, 1000.0], 2, 5, 4), 5);
    }
}

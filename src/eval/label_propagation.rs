//! DINO label propagation for semi-supervised video object segmentation (EVALS.md §4.2; a port of
//! `dino/eval_video_segmentation.py`, which iBOT copies).
//!
//! For every target frame `t` of a sequence, with L2-normalised patch features `f` (`h*w` rows):
//! 1. context = frame 0 (its ground truth as a one-hot map at patch resolution) followed by up to
//!    `n_last_frames` most recent frames (their **soft** propagated labels), oldest first;
//! 2. affinity `A[k, s, q] = exp(<f_t[q], f_k[s]> / 0.1)`, zeroed unless source `s` lies within
//!    `size_mask_neighborhood` rows and columns of query `q` (same mask for every context frame);
//! 3. per query keep the `topk` largest affinities over **all** context frames jointly (values
//!    `>=` the k-th largest), normalise them to sum 1, label = Σ weight · source label;
//! 4. output: bilinear upsampling ×patch (align_corners=False), per-channel min-max
//!    normalisation (only channels whose max is > 0), argmax over channels, nearest resize to
//!    the original frame size (PIL `NEAREST`).
//!
//! Deviations, all for inputs the reference cannot handle: `topk` is capped at the number of
//! context positions (torch.topk would raise), and a void value 255 in the first annotation is
//! read as background before the one-hot (the reference would create 256 channels).

use std::collections::VecDeque;

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::resize::resize_plane;

/// Parameters of the propagation (DINO defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PropagationConfig {
    /// Recent frames kept as context besides frame 0 (7).
    pub n_last_frames: usize,
    /// Half-size of the spatial window of allowed sources, in patches (12; 0 = no restriction).
    pub size_mask_neighborhood: usize,
    /// Affinities kept per query over all context frames (5).
    pub topk: usize,
    /// Temperature of `exp(sim / temperature)` (0.1, hard-coded in DINO).
    pub temperature: f64,
}

impl Default for PropagationConfig {
    fn default() -> Self {
        Self {
            n_last_frames: 7,
            size_mask_neighborhood: 12,
            topk: 5,
            temperature: 0.1,
        }
    }
}

/// DINO's `read_frame` size rule: the short side becomes `short`, the long side
/// `floor(short * long / short_orig / multiple) * multiple`. Returns `(height, width)`.
pub fn dino_frame_size(
    ori_h: usize,
    ori_w: usize,
    short: usize,
    multiple: usize,
) -> (usize, usize) {
    let m = multiple.max(1) as f64;
    if ori_h > ori_w {
        let th = (short as f64 * ori_h as f64) / ori_w as f64;
        ((th / m).floor() as usize * multiple, short)
    } else {
        let tw = (short as f64 * ori_w as f64) / ori_h as f64;
        (short, (tw / m).floor() as usize * multiple)
    }
}

/// PIL `Image.resize(size, NEAREST)` of an index map: `src = floor((dst + 0.5) * in / out)`.
pub fn nearest_resize_u8(src: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    let (sy, sx) = (h as f64 / oh as f64, w as f64 / ow as f64);
    let xs: Vec<usize> = (0..ow)
        .map(|x| (((x as f64 + 0.5) * sx) as usize).min(w - 1))
        .collect();
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let yy = (((y as f64 + 0.5) * sy) as usize).min(h - 1);
        let row = &src[yy * w..(yy + 1) * w];
        out.extend(xs.iter().map(|&x| row[x]));
    }
    out
}

/// First-frame labels at patch resolution: void (255) read as background, then one-hot with
/// `max + 1` channels, `(C, h*w)` row-major. Returns `(C, labels)`.
pub fn one_hot(small: &[u8]) -> (usize, Vec<f32>) {
    let ids: Vec<u8> = small
        .iter()
        .map(|&v| if v == 255 { 0 } else { v })
        .collect();
    let c = ids.iter().copied().max().unwrap_or(0) as usize + 1;
    let n = ids.len();
    let mut out = vec![0f32; c * n];
    for (i, &v) in ids.iter().enumerate() {
        out[v as usize * n + i] = 1.0;
    }
    (c, out)
}

/// Soft labels `(C, h*w)` of one target frame from its similarities to the context.
///
/// `sims` is `(h*w) × (n_ctx*h*w)` row-major: row `q` holds `<f_t[q], f_k[s]>` for context frame
/// `k` and source `s` at column `k*h*w + s`. `ctx_labels[k]` is the `(C, h*w)` label map of
/// context frame `k`.
pub fn propagate_frame(
    cfg: &PropagationConfig,
    sims: &[f32],
    ctx_labels: &[&[f32]],
    c: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let hw = h * w;
    let n_ctx = ctx_labels.len();
    let total = n_ctx * hw;
    let k = cfg.topk.clamp(1, total.max(1));
    let r = cfg.size_mask_neighborhood;
    let t = cfg.temperature as f32;
    let per_query: Vec<Vec<f32>> = (0..hw)
        .into_par_iter()
        .map(|q| {
            let (qi, qj) = (q / w, q % w);
            let (i0, i1, j0, j1) = if r == 0 {
                (0, h - 1, 0, w - 1)
            } else {
                (
                    qi.saturating_sub(r),
                    (qi + r).min(h - 1),
                    qj.saturating_sub(r),
                    (qj + r).min(w - 1),
                )
            };
            let row = &sims[q * total..(q + 1) * total];
            // (affinity, context, source) of every source inside the window; the others are 0.
            let mut cand: Vec<(f32, usize, usize)> = Vec::new();
            for kk in 0..n_ctx {
                for si in i0..=i1 {
                    for sj in j0..=j1 {
                        let s = si * w + sj;
                        // torch: exp(bmm(...) / 0.1) in float32
                        cand.push(((row[kk * hw + s] / t).exp(), kk, s));
                    }
                }
            }
            // The k-th largest over all n_ctx*hw positions (masked ones are 0).
            let mut vals: Vec<f32> = cand.iter().map(|c| c.0).collect();
            let thr = if k <= vals.len() {
                *vals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
            } else {
                0.0
            };
            let kept: Vec<&(f32, usize, usize)> = cand.iter().filter(|c| c.0 >= thr).collect();
            let sum: f32 = kept.iter().map(|c| c.0).sum();
            let mut out = vec![0f32; c];
            for &&(a, kk, s) in &kept {
                let wgt = a / sum;
                let lab = ctx_labels[kk];
                for (ch, o) in out.iter_mut().enumerate() {
                    *o += lab[ch * hw + s] * wgt;
                }
            }
            out
        })
        .collect();
    let mut labels = vec![0f32; c * hw];
    for (q, v) in per_query.iter().enumerate() {
        for ch in 0..c {
            labels[ch * hw + q] = v[ch];
        }
    }
    labels
}

/// [`propagate_frame`] computed where `sims` `(h*w, n_ctx*h*w)` lives: the window mask, the k-th
/// largest affinity of each query (k rounds of a row-wise argmax taken out, as
/// [`crate::eval::topk`]) and the weighted sum of the context labels (a matmul) stay on the
/// device; one read brings back the `(C, h*w)` soft labels. Equal to the host path up to the
/// order of the f32 sums.
pub fn propagate_frame_on_device(
    cfg: &PropagationConfig,
    sims: &Tensor,
    ctx_labels: &[&[f32]],
    c: usize,
    h: usize,
    w: usize,
) -> Result<Vec<f32>> {
    let dev = sims.device();
    let hw = h * w;
    let n_ctx = ctx_labels.len();
    let total = n_ctx * hw;
    let k = cfg.topk.clamp(1, total.max(1));
    let r = cfg.size_mask_neighborhood;
    // 1 where a source lies in the query's window (every context frame alike)
    let mut window = vec![0u8; hw * total];
    for q in 0..hw {
        let (qi, qj) = (q / w, q % w);
        for kk in 0..n_ctx {
            for s in 0..hw {
                let (si, sj) = (s / w, s % w);
                if r == 0 || (qi.abs_diff(si) <= r && qj.abs_diff(sj) <= r) {
                    window[q * total + kk * hw + s] = 1;
                }
            }
        }
    }
    let window = Tensor::from_vec(window, (hw, total), dev)?;
    let aff = (sims.to_dtype(DType::F32)? / cfg.temperature)?.exp()?;
    let neg = Tensor::full(f32::NEG_INFINITY, (hw, total), dev)?;
    let zero = Tensor::zeros((hw, total), DType::F32, dev)?;
    let inside = window.where_cond(&aff, &neg)?;
    // the k-th largest of each row: take the k-1 largest out, then the row max
    let cols = Tensor::arange(0u32, total as u32, dev)?.reshape((1, total))?;
    let mut rest = inside.clone();
    for _ in 1..k {
        let idx = rest.argmax_keepdim(D::Minus1)?;
        rest = cols.broadcast_eq(&idx)?.where_cond(&neg, &rest)?;
    }
    let thr = rest.max_keepdim(D::Minus1)?; // -inf when the window holds fewer than k
    let kept = inside.broadcast_ge(&thr)?.where_cond(&aff, &zero)?;
    let kept = window.where_cond(&kept, &zero)?;
    let sum = kept.sum_keepdim(D::Minus1)?;
    // labels of every context position, (n_ctx*hw, C)
    let mut lab = Vec::with_capacity(total * c);
    for l in ctx_labels {
        for s in 0..hw {
            lab.extend((0..c).map(|ch| l[ch * hw + s]));
        }
    }
    let lab = Tensor::from_vec(lab, (total, c), dev)?;
    let soft = kept.matmul(&lab)?.broadcast_div(&sum)?; // (hw, C)
    Ok(crate::util::host_read::vec1::<f32>(
        &soft.t()?.flatten_all()?,
    )?)
}

/// The saved segmentation of a target frame: upsample the `(C, h, w)` soft labels ×`patch`
/// (bilinear, align_corners=False), min-max normalise each channel whose max is > 0, argmax over
/// channels (a NaN, from a constant positive channel as in the reference, wins), then nearest
/// resize to `ori_h × ori_w`.
pub fn frame_output(
    soft: &[f32],
    c: usize,
    h: usize,
    w: usize,
    patch: usize,
    ori_h: usize,
    ori_w: usize,
) -> Vec<u8> {
    let (uh, uw) = (h * patch, w * patch);
    let planes: Vec<Vec<f32>> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut p = resize_plane(&soft[ch * h * w..(ch + 1) * h * w], h, w, uh, uw);
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max > 0.0 {
                let min = p.iter().copied().fold(f32::INFINITY, f32::min);
                for v in p.iter_mut() {
                    *v -= min;
                }
                let m2 = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for v in p.iter_mut() {
                    *v /= m2;
                }
            }
            p
        })
        .collect();
    let arg: Vec<u8> = (0..uh * uw)
        .into_par_iter()
        .map(|i| {
            let mut best = 0usize;
            let mut bv = planes[0][i];
            for (ch, p) in planes.iter().enumerate().skip(1) {
                let v = p[i];
                if bv.is_nan() {
                    break;
                }
                if v.is_nan() || v > bv {
                    best = ch;
                    bv = v;
                }
            }
            best as u8
        })
        .collect();
    nearest_resize_u8(&arg, uh, uw, ori_h, ori_w)
}

/// Propagate the first-frame labels through a sequence.
///
/// `feats[t]` is frame `t`'s `(h*w, D)` feature tensor (any device), L2-normalised along `D`;
/// `first` the `(C, h*w)` one-hot labels of frame 0. Returns the soft labels `(C, h*w)` of frames
/// `1..T`, in order. `on_frame(t, soft)` is called as soon as each frame is done.
pub fn propagate_sequence(
    cfg: &PropagationConfig,
    feats: &[Tensor],
    first: Vec<f32>,
    c: usize,
    h: usize,
    w: usize,
    mut on_frame: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let mut queue: VecDeque<(usize, Vec<f32>)> = VecDeque::with_capacity(cfg.n_last_frames + 1);
    for t in 1..feats.len() {
        let mut idx = vec![0usize];
        idx.extend(queue.iter().map(|(i, _)| *i));
        let ctx: Vec<&Tensor> = idx.iter().map(|&i| &feats[i]).collect();
        let src = Tensor::cat(&ctx, 0)?; // (n_ctx*hw, D)
        let sims = feats[t].matmul(&src.t()?)?; // (hw, n_ctx*hw)
        let mut labels: Vec<&[f32]> = vec![first.as_slice()];
        labels.extend(queue.iter().map(|(_, l)| l.as_slice()));
        let soft = if sims.device().is_cpu() {
            let sims: Vec<f32> = sims.flatten_all()?.to_vec1()?;
            propagate_frame(cfg, &sims, &labels, c, h, w)
        } else {
            // on a GPU only the (C, h*w) soft labels come back, not the affinities
            propagate_frame_on_device(cfg, &sims, &labels, c, h, w)?
        };
        on_frame(t, &soft)?;
        if cfg.n_last_frames == 0 {
            continue;
        }
        if queue.len() == cfg.n_last_frames {
            queue.pop_front();
        }
        queue.push_back((t, soft));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_path_gives_the_host_labels() {
        use candle_core::Device;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (h, w, c, n_ctx) = (4, 5, 3, 3);
        let hw = h * w;
        let sims: Vec<f32> = (0..hw * n_ctx * hw)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let labels: Vec<Vec<f32>> = (0..n_ctx)
            .map(|_| (0..c * hw).map(|_| rng.gen::<f32>()).collect())
            .collect();
        let ctx: Vec<&[f32]> = labels.iter().map(|l| l.as_slice()).collect();
        let t = Tensor::from_vec(sims.clone(), (hw, n_ctx * hw), &Device::Cpu).unwrap();
        for (r, k) in [(1, 5), (0, 5), (2, 1), (1, 200)] {
            let cfg = PropagationConfig {
                size_mask_neighborhood: r,
                topk: k,
                ..PropagationConfig::default()
            };
            let host = propagate_frame(&cfg, &sims, &ctx, c, h, w);
            let dev = propagate_frame_on_device(&cfg, &t, &ctx, c, h, w).unwrap();
            assert_eq!(host.len(), dev.len());
            for (a, b) in host.iter().zip(&dev) {
                assert!((a - b).abs() < 1e-5, "r {r} k {k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn frame_size_rule() {
        // DAVIS 854x480 -> 832x480 (long side floored to a multiple of 64)
        assert_eq!(dino_frame_size(480, 854, 480, 64), (480, 832));
        assert_eq!(dino_frame_size(854, 480, 480, 64), (832, 480));
        assert_eq!(dino_frame_size(64, 96, 32, 16), (32, 48));
    }

    #[test]
    fn pil_nearest() {
        // PIL: Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3)).resize((5, 3), 0)
        // -> [[0,0,1,2,2],[3,3,4,5,5],[3,3,4,5,5]]
        let src = [0u8, 1, 2, 3, 4, 5];
        assert_eq!(
            nearest_resize_u8(&src, 2, 3, 3, 5),
            vec![0, 0, 1, 2, 2, 3, 3, 4, 5, 5, 3, 3, 4, 5, 5]
        );
        assert_eq!(nearest_resize_u8(&src, 2, 3, 1, 1), vec![4]);
    }

    #[test]
    fn one_hot_channels() {
        let (c, oh) = one_hot(&[0, 2, 255, 1]);
        assert_eq!(c, 3);
        assert_eq!(oh, vec![1., 0., 1., 0., 0., 0., 0., 1., 0., 1., 0., 0.]);
    }

    #[test]
    fn matches_dino_reference() {
        // Printed by tests/golden/propagation/dino_label_propagation.py (the DINO code, torch 2.15).
        const SOFT: [[f32; 36]; 4] = [
            [
                0.9365762, 0.2808594, 0.006397, 0.9999877, 0.2589289, 0.046788, 0.5854154,
                0.004154, 0.979939, 0.6248962, 0.0, 0.2853503, 0.0270317, 0.7191406, 0.993603,
                1.23e-05, 0.0, 0.0, 0.4145845, 0.9958459, 0.0, 0.0, 0.0854885, 0.7146497,
                0.0363921, 0.0, 0.0, 0.0, 0.7410711, 0.953212, 0.0, 0.0, 0.020061, 0.3751039,
                0.9145116, 0.0,
            ],
            [
                0.6858469, 0.2920659, 0.1986477, 0.9999831, 0.3017572, 0.3929979, 0.3477886,
                0.0038436, 0.840964, 0.3036282, 0.0080502, 0.3014127, 0.2904522, 0.707934,
                0.8013523, 1.69e-05, 0.0, 0.0120279, 0.6522114, 0.9961563, 0.0, 0.0, 0.3479809,
                0.6985874, 0.0237009, 0.0, 0.0, 0.0, 0.6982428, 0.5949741, 0.0, 0.0, 0.159036,
                0.6963719, 0.6439689, 0.0,
            ],
            [
                0.2648019, 0.1634368, 0.7777314, 0.999984, 0.1444146, 0.6221371, 0.1036666,
                0.2129839, 0.6766525, 0.0893243, 0.0609426, 0.1262176, 0.7276642, 0.8365631,
                0.2222686, 1.6e-05, 0.0, 0.2212652, 0.8963335, 0.7870161, 0.0, 0.0, 0.6313011,
                0.8737824, 0.0075339, 0.0, 0.0, 0.0, 0.8555855, 0.1565976, 0.0, 0.0, 0.3233476,
                0.9106757, 0.3077564, 0.0,
            ],
            [
                0.1387295, 0.0915456, 0.9337515, 0.9999837, 0.0936209, 0.6051392, 0.0331824,
                0.4963969, 0.5968702, 0.0304155, 0.2818794, 0.0627393, 0.8589506, 0.9084544,
                0.0662485, 1.62e-05, 0.0014138, 0.3449544, 0.9668176, 0.5036032, 0.0, 0.0781984,
                0.6205972, 0.9372607, 0.0023199, 0.0, 0.0, 0.0, 0.9049653, 0.0499064, 0.0, 0.0,
                0.4031298, 0.8913862, 0.0975234, 0.0,
            ],
        ];
        const SEG: [[u8; 63]; 4] = [
            [
                0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 1, 2,
                2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0, 2, 2, 2, 2, 2, 1, 1, 0, 0,
                0, 2, 2, 2, 2, 1, 1,
            ],
            [
                0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 1, 2,
                2, 2, 2, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 1, 1, 1, 0, 0,
                2, 2, 2, 2, 2, 1, 1,
            ],
            [
                1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 2, 2, 0, 1, 1, 1, 1, 1, 1, 2,
                2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 2,
                2, 2, 2, 2, 1, 1, 1,
            ],
            [
                1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 1, 0, 2,
                2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 2,
                2, 2, 1, 1, 1, 1, 1,
            ],
        ];
        let (h, w, d, t_n) = (3usize, 4usize, 4usize, 5usize);
        let dev = candle_core::Device::Cpu;
        let feats: Vec<Tensor> = (0..t_n)
            .map(|t| {
                let mut v = Vec::new();
                for i in 0..h * w {
                    let row: Vec<f64> = (0..d)
                        .map(|dd| {
                            let (t, i, dd) = (t as f64, i as f64, dd as f64);
                            (0.37 * t + 1.1 * i + 0.83 * dd + 0.1 * i * dd).sin()
                        })
                        .collect();
                    let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                    v.extend(row.iter().map(|x| (x / n) as f32));
                }
                Tensor::from_vec(v, (h * w, d), &dev).unwrap()
            })
            .collect();
        let small = [0u8, 1, 1, 0, 2, 2, 0, 1, 0, 0, 2, 1];
        let (c, first) = one_hot(&small);
        assert_eq!(c, 3);
        let cfg = PropagationConfig {
            n_last_frames: 2,
            size_mask_neighborhood: 1,
            topk: 3,
            temperature: 0.1,
        };
        let mut n = 0;
        propagate_sequence(&cfg, &feats, first, c, h, w, |t, soft| {
            for (i, (g, want)) in soft.iter().zip(SOFT[t - 1]).enumerate() {
                assert!((g - want).abs() < 2e-5, "frame {t} [{i}]: {g} vs {want}");
            }
            let seg = frame_output(soft, c, h, w, 2, 7, 9);
            assert_eq!(seg, SEG[t - 1].to_vec(), "frame {t}");
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 4);
    }
}

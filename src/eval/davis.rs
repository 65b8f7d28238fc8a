//! DAVIS-2017 semi-supervised J&F, a port of the official `davis2017-evaluation`
//! (`davis2017/metrics.py`, `utils.py`, `evaluation.py`, `evaluation_method.py`).
//!
//! * Frames are the sorted annotation PNGs of a sequence; only frames `1..=N-2` are evaluated
//!   (first and last skipped, for ground truth and predictions; those prediction files are not read).
//! * GT value 255 becomes background (no void mask in the semi-supervised task). The object count
//!   `K` is the maximum id of GT frame 0; object `k`'s masks are `gt == k` / `pred == k`.
//!   A prediction id above `K` in an evaluated frame is an error (the official script aborts).
//! * J = |P∩G|/|P∪G| (1 on an empty union). F: boundaries by `seg2bmap`, dilated by the disk of
//!   radius `ceil(0.008 * ||(H, W)||)`, precision/recall of the boundary matches, F = 2PR/(P+R).
//! * Per object: mean, recall (fraction > 0.5), decay (mean of the first minus the last of 4
//!   overlapping bins); global values are means over **all objects** of all sequences.
//!
//! One deliberate difference: the reference casts the decay-bin indices to `uint8`, which would
//! wrap for sequences with more than 256 evaluated frames; here they are computed without wrapping.

mod png_io;
mod report;

use std::path::{Path, PathBuf};

use rayon::prelude::*;

pub use png_io::{davis_palette, read_palette_png, write_palette_png};
pub(crate) use png_io::{decode_index_png, PngIssue};
pub use report::{DavisGlobal, DavisObject, DavisReport, DavisSequence, DavisStats};

use super::segmentation::{nanmean, numpy_sum};

/// The official boundary threshold (fraction of the image diagonal).
pub const BOUND_TH: f64 = 0.008;

/// Errors of the DAVIS evaluation; messages name the file or sequence and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DavisError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode PNG {path}: {message}")]
    Png { path: PathBuf, message: String },
    #[error("cannot write PNG {path}: {message}")]
    PngWrite { path: PathBuf, message: String },
    #[error("{path} is a {found} PNG; expected an 8-bit palette (P) PNG whose indices are object ids (8-bit grayscale is also accepted)")]
    NotPalettePng { path: PathBuf, found: String },
    #[error("image set {path} lists no sequence; expected one sequence name per line")]
    EmptyImageSet { path: PathBuf },
    #[error(
        "sequence {sequence}: no annotation PNG in {dir}; check the DAVIS root and the image set"
    )]
    MissingSequence { sequence: String, dir: PathBuf },
    #[error("sequence {sequence} has {n_frames} annotated frames; the semi-supervised evaluation needs at least 3 (first and last are not evaluated)")]
    TooFewFrames { sequence: String, n_frames: usize },
    #[error("missing prediction frame {path} (sequence {sequence}, frame {frame}); write one PNG per annotated frame, named like the annotation")]
    MissingPrediction {
        sequence: String,
        frame: String,
        path: PathBuf,
    },
    #[error("size mismatch: {path} is {got_h}x{got_w} (HxW) but the sequence's first annotation is {want_h}x{want_w}; predictions must have the annotation size")]
    SizeMismatch {
        path: PathBuf,
        got_h: usize,
        got_w: usize,
        want_h: usize,
        want_w: usize,
    },
    #[error("sequence {sequence}: predictions contain object id {found} but the first annotation frame has only {n_objects} objects; remove the extra ids")]
    TooManyObjects {
        sequence: String,
        found: u8,
        n_objects: u8,
    },
    #[error("no object to evaluate in any sequence of {path}")]
    NoObjects { path: PathBuf },
}

/// Boundary map of a binary mask (official `_seg2bmap`, no resizing).
/// `mask` must hold `h*w` values (row-major); this and the other per-frame functions below
/// index it directly and panic otherwise.
pub fn seg2bmap(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    let mut b = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            let m = mask[y * w + x];
            let e = x + 1 < w && mask[y * w + x + 1];
            let s = y + 1 < h && mask[(y + 1) * w + x];
            let se = x + 1 < w && y + 1 < h && mask[(y + 1) * w + x + 1];
            b[y * w + x] = if y + 1 == h && x + 1 == w {
                false
            } else if x + 1 == w {
                m ^ s
            } else if y + 1 == h {
                m ^ e
            } else {
                (m ^ e) | (m ^ s) | (m ^ se)
            };
        }
    }
    b
}

/// `ceil(0.008 * sqrt(H^2 + W^2))`, the disk radius used by F.
pub fn bound_pix(h: usize, w: usize) -> usize {
    let norm = ((h as f64) * (h as f64) + (w as f64) * (w as f64)).sqrt();
    (BOUND_TH * norm).ceil() as usize
}

/// Dilate a binary map with the disk `dx^2 + dy^2 <= r^2` (outside pixels count as 0),
/// like `cv2.dilate(b, skimage.morphology.disk(r))`.
pub fn dilate_disk(b: &[bool], h: usize, w: usize, r: usize) -> Vec<bool> {
    let ri = r as i64;
    // half-width of the disk on each row offset
    let spans: Vec<(i64, i64)> = (-ri..=ri)
        .map(|dy| {
            let mut hw = 0i64;
            while (hw + 1) * (hw + 1) + dy * dy <= ri * ri {
                hw += 1;
            }
            (dy, hw)
        })
        .collect();
    let mut out = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            if !b[y * w + x] {
                continue;
            }
            for &(dy, hw) in &spans {
                let yy = y as i64 + dy;
                if yy < 0 || yy >= h as i64 {
                    continue;
                }
                let x0 = (x as i64 - hw).max(0) as usize;
                let x1 = (x as i64 + hw).min(w as i64 - 1) as usize;
                let row = yy as usize * w;
                out[row + x0..=row + x1].fill(true);
            }
        }
    }
    out
}

/// Region similarity J of one frame (1 when both masks are empty).
pub fn j_measure(pred: &[bool], gt: &[bool]) -> f64 {
    let (mut inter, mut union) = (0u64, 0u64);
    for (&p, &g) in pred.iter().zip(gt) {
        inter += (p & g) as u64;
        union += (p | g) as u64;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Boundary measure F of one frame with disk radius `bound_pix`.
pub fn f_measure(pred: &[bool], gt: &[bool], h: usize, w: usize, bound_pix: usize) -> f64 {
    let fg_b = seg2bmap(pred, h, w);
    let gt_b = seg2bmap(gt, h, w);
    let n_fg = fg_b.iter().filter(|&&v| v).count();
    let n_gt = gt_b.iter().filter(|&&v| v).count();
    let (precision, recall) = if n_fg == 0 && n_gt > 0 {
        (1.0, 0.0)
    } else if n_fg > 0 && n_gt == 0 {
        (0.0, 1.0)
    } else if n_fg == 0 && n_gt == 0 {
        (1.0, 1.0)
    } else {
        let gt_dil = dilate_disk(&gt_b, h, w, bound_pix);
        let fg_dil = dilate_disk(&fg_b, h, w, bound_pix);
        let fg_match = fg_b.iter().zip(&gt_dil).filter(|(&a, &b)| a & b).count();
        let gt_match = gt_b.iter().zip(&fg_dil).filter(|(&a, &b)| a & b).count();
        (fg_match as f64 / n_fg as f64, gt_match as f64 / n_gt as f64)
    };
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// Decay bin boundaries: `round(linspace(1, n, 5) + 1e-10) - 1` (numpy linspace and
/// round-half-even; the 1e-10 makes halves round up).
pub fn decay_bin_ids(n: usize) -> [usize; 5] {
    let step = (n as f64 - 1.0) / 4.0;
    let mut ids = [0usize; 5];
    for (i, id) in ids.iter_mut().enumerate() {
        let y = if i == 4 {
            n as f64
        } else {
            i as f64 * step + 1.0
        };
        *id = ((y + 1e-10).round_ties_even() - 1.0).max(0.0) as usize;
    }
    ids
}

/// Per-object statistics of a per-frame series (official `db_statistics`).
pub fn db_statistics(v: &[f64]) -> DavisStats {
    let mean = nanmean(v);
    let above: Vec<f64> = v.iter().map(|&x| if x > 0.5 { 1.0 } else { 0.0 }).collect();
    let recall = numpy_sum(&above) / v.len() as f64;
    let ids = decay_bin_ids(v.len());
    let bin = |k: usize| -> &[f64] {
        let a = ids[k].min(v.len());
        let b = (ids[k + 1] + 1).min(v.len());
        &v[a..b.max(a)]
    };
    let decay = nanmean(bin(0)) - nanmean(bin(3));
    DavisStats {
        mean,
        recall,
        decay,
    }
}

fn list_frames(dir: &Path) -> Result<Vec<(String, PathBuf)>, std::io::Error> {
    let mut v = Vec::new();
    for e in fs_err::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "png") && p.is_file() {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            v.push((stem.unwrap_or_default(), p));
        }
    }
    v.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(v)
}

/// Read a label frame and check its size; 255 (void) becomes 0.
fn read_frame(path: &Path, want: Option<(usize, usize)>) -> Result<Vec<u8>, DavisError> {
    let (h, w, mut data) = read_palette_png(path)?;
    if let Some((want_h, want_w)) = want {
        if (h, w) != (want_h, want_w) {
            return Err(DavisError::SizeMismatch {
                path: path.to_path_buf(),
                got_h: h,
                got_w: w,
                want_h,
                want_w,
            });
        }
    }
    for v in &mut data {
        if *v == 255 {
            *v = 0;
        }
    }
    Ok(data)
}

/// J and F of objects `1..=n_objects` in one frame (`gt` with 255 already set to 0; both
/// slices hold `h*w` ids). Each object is evaluated on the crop of its
/// GT/prediction bounding box grown by one pixel (clamped to the image): outside it both masks,
/// both boundary maps and every boundary match are zero, so J and F equal the full-frame values.
pub fn frame_scores(gt: &[u8], pred: &[u8], h: usize, w: usize, n_objects: u8) -> Vec<(f64, f64)> {
    let bp = bound_pix(h, w);
    let n = n_objects as usize;
    // (y0, y1, x0, x1) per object id; y0 > y1 means "absent"
    let mut bbox = vec![(usize::MAX, 0usize, usize::MAX, 0usize); n + 1];
    for y in 0..h {
        for x in 0..w {
            for v in [gt[y * w + x], pred[y * w + x]] {
                if v != 0 && (v as usize) <= n {
                    let b = &mut bbox[v as usize];
                    *b = (b.0.min(y), b.1.max(y), b.2.min(x), b.3.max(x));
                }
            }
        }
    }
    (1..=n_objects)
        .map(|k| {
            let (y0, y1, x0, x1) = bbox[k as usize];
            if y0 > y1 {
                return (1.0, 1.0); // both masks empty
            }
            let (cy0, cy1) = (y0.saturating_sub(1), (y1 + 1).min(h - 1));
            let (cx0, cx1) = (x0.saturating_sub(1), (x1 + 1).min(w - 1));
            let (ch, cw) = (cy1 - cy0 + 1, cx1 - cx0 + 1);
            let mut g = Vec::with_capacity(ch * cw);
            let mut p = Vec::with_capacity(ch * cw);
            for y in cy0..=cy1 {
                g.extend(gt[y * w + cx0..=y * w + cx1].iter().map(|&v| v == k));
                p.extend(pred[y * w + cx0..=y * w + cx1].iter().map(|&v| v == k));
            }
            (j_measure(&p, &g), f_measure(&p, &g, ch, cw, bp))
        })
        .collect()
}

/// One evaluated frame: (highest predicted id, `(J, F)` per object).
type FrameScores = (u8, Vec<(f64, f64)>);

/// Evaluate one sequence: per-object J/F per evaluated frame and their statistics.
pub fn evaluate_sequence(
    davis_root: &Path,
    pred_dir: &Path,
    sequence: &str,
) -> Result<DavisSequence, DavisError> {
    let ann_dir = davis_root.join("Annotations/480p").join(sequence);
    let frames = list_frames(&ann_dir).unwrap_or_default();
    if frames.is_empty() {
        return Err(DavisError::MissingSequence {
            sequence: sequence.to_string(),
            dir: ann_dir,
        });
    }
    let n_frames = frames.len();
    if n_frames < 3 {
        return Err(DavisError::TooFewFrames {
            sequence: sequence.to_string(),
            n_frames,
        });
    }
    let (h, w, first) = read_palette_png(&frames[0].1)?;
    let n_objects = first.iter().map(|&v| if v == 255 { 0 } else { v }).max();
    let n_objects = n_objects.unwrap_or(0);
    let evaluated = &frames[1..n_frames - 1];
    let pred_seq = pred_dir.join(sequence);
    let per_frame: Vec<Result<FrameScores, DavisError>> = evaluated
        .par_iter()
        .map(|(name, gt_path)| {
            let gt = read_frame(gt_path, Some((h, w)))?;
            let pred_path = pred_seq.join(format!("{name}.png"));
            if !pred_path.is_file() {
                return Err(DavisError::MissingPrediction {
                    sequence: sequence.to_string(),
                    frame: name.clone(),
                    path: pred_path,
                });
            }
            let pred = read_frame(&pred_path, Some((h, w)))?;
            let pred_max = pred.iter().copied().max().unwrap_or(0);
            let jf = frame_scores(&gt, &pred, h, w, n_objects);
            Ok((pred_max, jf))
        })
        .collect();
    let mut rows = Vec::with_capacity(per_frame.len());
    for r in per_frame {
        rows.push(r?);
    }
    if let Some(found) = rows.iter().map(|r| r.0).max().filter(|&m| m > n_objects) {
        return Err(DavisError::TooManyObjects {
            sequence: sequence.to_string(),
            found,
            n_objects,
        });
    }
    let objects = (0..n_objects as usize)
        .map(|k| {
            let j: Vec<f64> = rows.iter().map(|r| r.1[k].0).collect();
            let f: Vec<f64> = rows.iter().map(|r| r.1[k].1).collect();
            DavisObject {
                sequence: sequence.to_string(),
                object_id: k as u8 + 1,
                j: db_statistics(&j),
                f: db_statistics(&f),
                j_per_frame: j,
                f_per_frame: f,
            }
        })
        .collect();
    Ok(DavisSequence {
        name: sequence.to_string(),
        height: h,
        width: w,
        n_frames,
        n_objects: n_objects as usize,
        bound_pix: bound_pix(h, w),
        evaluated_frames: evaluated.iter().map(|f| f.0.clone()).collect(),
        objects,
    })
}

/// Semi-supervised DAVIS-2017 evaluation of `<pred_dir>/<seq>/<frame>.png` against
/// `<davis_root>/Annotations/480p/<seq>/<frame>.png` for the sequences listed in
/// `<davis_root>/ImageSets/2017/<set>.txt`.
///
/// Sequences keep the order of the image set file (a repeated name counts once, at its first
/// line), and objects follow their sequence in id order: the official loader keys a dict by the
/// file's names and the evaluation lists `<seq>_<id>` as it walks that dict, so the per-sequence
/// tables and the global means follow the same order.
pub fn evaluate_davis(
    davis_root: &Path,
    pred_dir: &Path,
    set: &str,
) -> Result<DavisReport, DavisError> {
    let set_path = davis_root.join("ImageSets/2017").join(format!("{set}.txt"));
    let text = fs_err::read_to_string(&set_path).map_err(|source| DavisError::Io {
        path: set_path.clone(),
        source,
    })?;
    // File order, first occurrence of each name (the official loader's dict keys).
    let mut seen = std::collections::HashSet::new();
    let names: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && seen.insert(*l))
        .collect();
    if names.is_empty() {
        return Err(DavisError::EmptyImageSet { path: set_path });
    }
    let results: Vec<Result<DavisSequence, DavisError>> = names
        .par_iter()
        .map(|s| evaluate_sequence(davis_root, pred_dir, s))
        .collect();
    let mut sequences = Vec::with_capacity(results.len());
    for r in results {
        sequences.push(r?);
    }
    if sequences.iter().all(|s| s.objects.is_empty()) {
        return Err(DavisError::NoObjects { path: set_path });
    }
    Ok(DavisReport::from_sequences(set, sequences))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &[&str]) -> Vec<bool> {
        s.iter().flat_map(|r| r.chars().map(|c| c == '1')).collect()
    }

    #[test]
    fn seg2bmap_tiny_mask() {
        let m = bits(&["0000", "0110", "0110", "0000"]);
        let b = seg2bmap(&m, 4, 4);
        let want = bits(&["1110", "1010", "1110", "0000"]);
        assert_eq!(b, want);
        // a full mask has no boundary at all (last row uses m ^ e, last column m ^ s)
        assert_eq!(seg2bmap(&[true; 6], 2, 3), vec![false; 6]);
        let m = bits(&["110", "110"]);
        assert_eq!(seg2bmap(&m, 2, 3), bits(&["010", "010"]));
    }

    #[test]
    fn disk_dilation() {
        let mut b = vec![false; 25];
        b[12] = true;
        let d = dilate_disk(&b, 5, 5, 2);
        let want = bits(&["00100", "01110", "11111", "01110", "00100"]);
        assert_eq!(d, want);
        assert_eq!(bound_pix(480, 854), 8);
        assert_eq!(bound_pix(48, 80), 1);
        assert_eq!(bound_pix(64, 112), 2);
    }

    #[test]
    fn decay_bins() {
        assert_eq!(decay_bin_ids(4), [0, 1, 2, 2, 3]);
        assert_eq!(decay_bin_ids(6), [0, 1, 3, 4, 5]);
        assert_eq!(decay_bin_ids(8), [0, 2, 4, 5, 7]);
        // halves round up (numpy round-half-even on x.5 + 1e-10)
        assert_eq!(decay_bin_ids(7), [0, 2, 3, 5, 6]);
        assert_eq!(decay_bin_ids(1), [0, 0, 0, 0, 0]);
        let s = db_statistics(&[1.0, 0.0, 0.5, 0.25]);
        assert_eq!(s.mean, 0.4375);
        assert_eq!(s.recall, 0.25);
        // bins [0..=1] and [2..=3]
        assert_eq!(s.decay, 0.5 - 0.375);
    }

    #[test]
    fn cropped_scores_equal_full_frame() {
        let (h, w) = (40usize, 150usize);
        assert_eq!(bound_pix(h, w), 2);
        let mut state = 12345u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for trial in 0..40 {
            let mut gt = vec![0u8; h * w];
            let mut pred = vec![0u8; h * w];
            for img in [&mut gt, &mut pred] {
                for k in 1..=3u8 {
                    let (y0, x0) = (rnd() % h, rnd() % w);
                    let (y1, x1) = ((y0 + rnd() % 15).min(h - 1), (x0 + rnd() % 30).min(w - 1));
                    for y in y0..=y1 {
                        for x in x0..=x1 {
                            if rnd() % 7 != 0 {
                                img[y * w + x] = k;
                            }
                        }
                    }
                }
            }
            if trial % 5 == 0 {
                pred.iter_mut()
                    .for_each(|v| *v = if *v == 2 { 0 } else { *v });
            }
            let got = frame_scores(&gt, &pred, h, w, 4);
            for k in 1..=4u8 {
                let g: Vec<bool> = gt.iter().map(|&v| v == k).collect();
                let p: Vec<bool> = pred.iter().map(|&v| v == k).collect();
                let want = (j_measure(&p, &g), f_measure(&p, &g, h, w, 2));
                assert_eq!(got[k as usize - 1], want, "trial {trial} object {k}");
            }
        }
    }

    #[test]
    fn jf_edge_cases() {
        let e = vec![false; 16];
        let m = bits(&["0000", "0110", "0110", "0000"]);
        assert_eq!(j_measure(&e, &e), 1.0);
        assert_eq!(f_measure(&e, &e, 4, 4, 1), 1.0);
        assert_eq!(j_measure(&e, &m), 0.0);
        assert_eq!(f_measure(&e, &m, 4, 4, 1), 0.0);
        assert_eq!(f_measure(&m, &e, 4, 4, 1), 0.0);
        assert_eq!(f_measure(&m, &m, 4, 4, 1), 1.0);
    }
}

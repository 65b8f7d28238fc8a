//! `COCOeval` for `iouType` `bbox` and `segm` with default parameters: `evaluate` (IoU per
//! image x category, greedy matching per area range), `accumulate` (precision / recall arrays)
//! and `summarize` (the 12 stats), ported line by line from pycocotools `cocoeval.py`.
//!
//! Work is split over categories and, inside one, over images with rayon; every reduction
//! keeps pycocotools' order, so the numbers do not depend on the thread count.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rayon::prelude::*;

use super::dataset::{CocoDataset, CocoResults, Segmentation};
use super::iou::{bbox_iou, mask_iou, IouMatrix};
use super::CocoError;
use crate::data::mask::Rle;

/// Which geometry the IoU is computed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IouType {
    /// Boxes `[x, y, w, h]`.
    Bbox,
    /// RLE masks.
    Segm,
}

impl IouType {
    /// "bbox" or "segm".
    pub fn as_str(self) -> &'static str {
        match self {
            IouType::Bbox => "bbox",
            IouType::Segm => "segm",
        }
    }
}

/// `maxDets` (sorted).
pub const MAX_DETS: [usize; 3] = [1, 10, 100];
/// `areaRng` = all, small, medium, large (both ends inclusive).
pub const AREA_RANGES: [[f64; 2]; 4] =
    [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];
/// `areaRngLbl`.
pub const AREA_LABELS: [&str; 4] = ["all", "small", "medium", "large"];

const T: usize = 10;
const R: usize = 101;
const A: usize = 4;
const M: usize = 3;

/// `np.linspace(.5, 0.95, 10)` bit for bit.
pub fn iou_thresholds() -> [f64; 10] {
    let step = (0.95 - 0.5) / 9.0;
    let mut t = [0.0; 10];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step + 0.5;
    }
    t[9] = 0.95;
    t
}

/// `np.linspace(.0, 1.00, 101)` bit for bit.
pub fn recall_thresholds() -> [f64; 101] {
    let step = 1.0 / 100.0;
    let mut r = [0.0; 101];
    for (i, v) in r.iter_mut().enumerate() {
        *v = i as f64 * step + 0.0;
    }
    r[100] = 1.0;
    r
}

/// The outcome of evaluate + accumulate + summarize.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoEvalResult {
    /// The IoU type evaluated.
    pub iou_type: IouType,
    /// `COCOeval.stats` (see [`super::summary::format_summary`] for the order).
    pub stats: [f64; 12],
    /// Sorted COCO category ids (`params.catIds`).
    pub cat_ids: Vec<i64>,
    /// Per category: mean of `precision[:, :, k, all, 100]` over entries > -1, or -1.
    pub per_category_ap: Vec<f64>,
    /// Per category: mean of `recall[:, k, all, 100]` over entries > -1, or -1.
    pub per_category_ar: Vec<f64>,
    /// Sorted image ids (`params.imgIds`).
    pub img_ids: Vec<i64>,
    /// `eval['precision']`, shape `[T=10][R=101][K][A=4][M=3]`, row-major.
    pub precision: Vec<f64>,
    /// `eval['recall']`, shape `[T=10][K][A=4][M=3]`, row-major.
    pub recall: Vec<f64>,
}

/// `np.mean` of a 1-D float64 array: numpy's pairwise sum divided by the length.
pub fn numpy_mean(v: &[f64]) -> f64 {
    (0.0 + crate::util::numpy::numpy_sum(v)) / v.len() as f64
}

/// Mean over entries > -1, or -1 when there are none (`summarize`).
fn mean_valid(it: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = it.filter(|&x| x > -1.0).collect();
    if v.is_empty() {
        -1.0
    } else {
        numpy_mean(&v)
    }
}

/// Ground-truth and detection indices of one (image, category), in file order.
type Bucket = (Vec<usize>, Vec<usize>);

/// Per-(image, category, area) matching result (`evaluateImg`), T-major flags.
struct EvalImg {
    scores: Vec<f64>,
    /// Per detection, bit `t` set when it is a true positive at threshold `t`
    /// (`dtMatches != 0 and not dtIgnore`).
    tp: Vec<u16>,
    /// Per detection, bit `t` set when it is a false positive (`dtMatches == 0 and not dtIgnore`).
    fp: Vec<u16>,
    /// Number of non-ignored ground truths.
    npig: usize,
}

struct Geometry<'a> {
    gt: &'a CocoDataset,
    dt: &'a CocoResults,
    gt_rle: Vec<Rle>,
    dt_rle: Vec<Cow<'a, Rle>>,
    iou_type: IouType,
}

impl Geometry<'_> {
    fn ious(&self, dts: &[usize], gts: &[usize]) -> IouMatrix {
        let crowd: Vec<bool> = gts
            .iter()
            .map(|&g| self.gt.annotations[g].iscrowd)
            .collect();
        match self.iou_type {
            IouType::Bbox => {
                let d: Vec<[f64; 4]> = dts.iter().map(|&i| self.dt.detections[i].bbox).collect();
                let g: Vec<[f64; 4]> = gts.iter().map(|&i| self.gt.annotations[i].bbox).collect();
                bbox_iou(&d, &g, &crowd)
            }
            IouType::Segm => {
                let d: Vec<&Rle> = dts.iter().map(|&i| &*self.dt_rle[i]).collect();
                let g: Vec<&Rle> = gts.iter().map(|&i| &self.gt_rle[i]).collect();
                mask_iou(&d, &g, &crowd)
            }
        }
    }

    /// computeIoU + evaluateImg for all area ranges of one (image, category).
    fn eval_image(&self, gts: &[usize], dts_in: &[usize], thr: &[f64; T]) -> Vec<EvalImg> {
        let dets = &self.dt.detections;
        let mut dts = dts_in.to_vec();
        // Stable sort by descending score (= np.argsort(-score, kind='mergesort')).
        dts.sort_by(|&a, &b| {
            dets[b]
                .score
                .partial_cmp(&dets[a].score)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        dts.truncate(MAX_DETS[M - 1]);
        let ious = if gts.is_empty() || dts.is_empty() {
            None
        } else {
            Some(self.ious(&dts, gts))
        };
        let anns = &self.gt.annotations;
        let nd = dts.len();
        AREA_RANGES
            .iter()
            .map(|&[lo, hi]| {
                let g_ig: Vec<bool> = gts
                    .iter()
                    .map(|&g| anns[g].iscrowd || anns[g].area < lo || anns[g].area > hi)
                    .collect();
                // Non-ignored first, stable.
                let mut order: Vec<usize> = (0..gts.len()).collect();
                order.sort_by_key(|&j| g_ig[j]);
                let ng = order.len();
                let mut dtm = vec![false; T * nd];
                let mut dt_ig = vec![false; T * nd];
                if let Some(ious) = &ious {
                    let mut gtm = vec![false; ng];
                    for (ti, &t) in thr.iter().enumerate() {
                        gtm.iter_mut().for_each(|x| *x = false);
                        for d in 0..nd {
                            let mut best = t.min(1.0 - 1e-10);
                            let mut m: Option<usize> = None;
                            for (gi, &j) in order.iter().enumerate() {
                                let crowd = anns[gts[j]].iscrowd;
                                if gtm[gi] && !crowd {
                                    continue;
                                }
                                if let Some(mi) = m {
                                    if !g_ig[order[mi]] && g_ig[j] {
                                        break;
                                    }
                                }
                                let v = ious.get(d, j);
                                if v < best {
                                    continue;
                                }
                                best = v;
                                m = Some(gi);
                            }
                            if let Some(mi) = m {
                                dt_ig[ti * nd + d] = g_ig[order[mi]];
                                dtm[ti * nd + d] = anns[gts[order[mi]]].id != 0;
                                gtm[mi] = true;
                            }
                        }
                    }
                }
                for d in 0..nd {
                    let a = dets[dts[d]].area;
                    if a < lo || a > hi {
                        for ti in 0..T {
                            let k = ti * nd + d;
                            dt_ig[k] = dt_ig[k] || !dtm[k];
                        }
                    }
                }
                let (mut tp, mut fp) = (vec![0u16; nd], vec![0u16; nd]);
                for ti in 0..T {
                    for d in 0..nd {
                        let k = ti * nd + d;
                        if !dt_ig[k] {
                            if dtm[k] {
                                tp[d] |= 1 << ti;
                            } else {
                                fp[d] |= 1 << ti;
                            }
                        }
                    }
                }
                EvalImg {
                    scores: dts.iter().map(|&d| dets[d].score).collect(),
                    tp,
                    fp,
                    npig: g_ig.iter().filter(|&&x| !x).count(),
                }
            })
            .collect()
    }
}

/// accumulate for one (category, area, maxDet): `items` are the `(image, detection)` pairs in
/// stable score order; writes `prec[t * R + r]` and `rec[t]`.
fn accumulate_one(
    imgs: &[&EvalImg],
    items: &[(u32, u32)],
    rec_thr: &[f64; R],
    prec: &mut [f64],
    rec: &mut [f64],
) {
    let npig: usize = imgs.iter().map(|e| e.npig).sum();
    if npig == 0 {
        return;
    }
    let nd = items.len();
    // One gather per detection, then contiguous walks per threshold.
    let flags: Vec<(u16, u16)> = items
        .iter()
        .map(|&(ei, d)| {
            let e = imgs[ei as usize];
            (e.tp[d as usize], e.fp[d as usize])
        })
        .collect();
    // pycocotools computes rc / pr at every index, takes the right-to-left running max of pr
    // and reads it at the first index with rc >= r. Both only change where tp grows: rc is
    // constant and pr non-increasing between such events, and the first index with rc >= r is
    // index 0 or an event. So evaluating the same expressions at index 0 and at the events
    // only gives bit-identical numbers.
    let mut rc: Vec<f64> = Vec::new();
    let mut pr: Vec<f64> = Vec::new();
    let npf = npig as f64;
    for t in 0..T {
        rc.clear();
        pr.clear();
        let (mut tp, mut fp) = (0u64, 0u64);
        for (i, &(tpm, fpm)) in flags.iter().enumerate() {
            let is_tp = (tpm >> t) & 1 == 1;
            tp += is_tp as u64;
            fp += ((fpm >> t) & 1) as u64;
            if is_tp || i == 0 {
                let (tpf, fpf) = (tp as f64, fp as f64);
                rc.push(tpf / npf);
                pr.push(tpf / (fpf + tpf + f64::EPSILON));
            }
        }
        rec[t] = if nd > 0 { tp as f64 / npf } else { 0.0 };
        for i in (1..pr.len()).rev() {
            if pr[i] > pr[i - 1] {
                pr[i - 1] = pr[i];
            }
        }
        for (ri, &r) in rec_thr.iter().enumerate() {
            let pi = rc.partition_point(|&x| x < r);
            prec[t * R + ri] = if pi < pr.len() { pr[pi] } else { 0.0 };
        }
    }
}

/// Runs `evaluate(); accumulate(); summarize()` with default parameters.
pub fn evaluate(
    gt: &CocoDataset,
    dt: &CocoResults,
    iou_type: IouType,
) -> Result<CocoEvalResult, CocoError> {
    let mut img_ids: Vec<i64> = gt.images.iter().map(|i| i.id).collect();
    img_ids.sort_unstable();
    img_ids.dedup();
    let cat_map = gt.category_map();
    let cat_ids = cat_map.coco_ids().to_vec();
    let k_n = cat_ids.len();
    let img_pos = |id: i64| img_ids.binary_search(&id).ok();

    // (category index) -> image index -> (gt indices, dt indices), file order inside.
    let mut buckets: Vec<BTreeMap<usize, Bucket>> = vec![BTreeMap::new(); k_n];
    for (i, a) in gt.annotations.iter().enumerate() {
        if let (Some(k), Some(im)) = (cat_map.to_contiguous(a.category_id), img_pos(a.image_id)) {
            buckets[k].entry(im).or_default().0.push(i);
        }
    }
    for (i, d) in dt.detections.iter().enumerate() {
        if let (Some(k), Some(im)) = (cat_map.to_contiguous(d.category_id), img_pos(d.image_id)) {
            buckets[k].entry(im).or_default().1.push(i);
        }
    }

    let (gt_rle, dt_rle) = match iou_type {
        IouType::Bbox => (Vec::new(), Vec::new()),
        IouType::Segm => {
            let g = (0..gt.annotations.len())
                .into_par_iter()
                .map(|i| gt.ann_to_rle(i))
                .collect::<Result<Vec<_>, _>>()?;
            let d = dt
                .detections
                .par_iter()
                .map(|d| match &d.segmentation {
                    Segmentation::Rle(r) => Ok(Cow::Borrowed(r)),
                    seg => gt
                        .segmentation_to_rle(seg, d.image_id)
                        .map(Cow::Owned)
                        .map_err(|e| CocoError::Invalid {
                            path: dt.source.clone(),
                            msg: format!(
                                "detection {} (0-based) cannot be rasterised: {e}",
                                d.id - 1
                            ),
                        }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            (g, d)
        }
    };
    let geo = Geometry {
        gt,
        dt,
        gt_rle,
        dt_rle,
        iou_type,
    };
    let thr = iou_thresholds();
    let rec_thr = recall_thresholds();

    // Per category: precision [T][R][A][M] and recall [T][A][M].
    let per_cat: Vec<(Vec<f64>, Vec<f64>)> = buckets
        .par_iter()
        .map(|b| {
            let entries: Vec<&Bucket> = b.values().collect();
            let evals: Vec<Vec<EvalImg>> = entries
                .par_iter()
                .map(|(g, d)| geo.eval_image(g, d, &thr))
                .collect();
            let mut prec = vec![-1.0; T * R * A * M];
            let mut rec = vec![-1.0; T * A * M];
            let mut p_buf = vec![0.0; T * R];
            let mut r_buf = vec![0.0; T];
            // Stable score order of all kept (image, detection) pairs; the order for a smaller
            // maxDet is this one filtered, since a stable sort commutes with filtering.
            let mut order: Vec<(f64, u32, u32)> = Vec::new();
            for (ei, e) in evals.iter().enumerate() {
                for (d, &sc) in e[0].scores.iter().enumerate() {
                    order.push((sc, ei as u32, d as u32));
                }
            }
            order.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal));
            for (m, &max_det) in MAX_DETS.iter().enumerate() {
                let items: Vec<(u32, u32)> = order
                    .iter()
                    .filter(|x| (x.2 as usize) < max_det)
                    .map(|x| (x.1, x.2))
                    .collect();
                for a in 0..A {
                    let imgs: Vec<&EvalImg> = evals.iter().map(|e| &e[a]).collect();
                    if imgs.is_empty() {
                        continue;
                    }
                    p_buf.iter_mut().for_each(|x| *x = -1.0);
                    r_buf.iter_mut().for_each(|x| *x = -1.0);
                    accumulate_one(&imgs, &items, &rec_thr, &mut p_buf, &mut r_buf);
                    for t in 0..T {
                        for r in 0..R {
                            prec[((t * R + r) * A + a) * M + m] = p_buf[t * R + r];
                        }
                        rec[(t * A + a) * M + m] = r_buf[t];
                    }
                }
            }
            (prec, rec)
        })
        .collect();

    let mut precision = vec![-1.0; T * R * k_n * A * M];
    let mut recall = vec![-1.0; T * k_n * A * M];
    for (k, (p, r)) in per_cat.iter().enumerate() {
        for t in 0..T {
            for a in 0..A {
                for m in 0..M {
                    for ri in 0..R {
                        precision[(((t * R + ri) * k_n + k) * A + a) * M + m] =
                            p[((t * R + ri) * A + a) * M + m];
                    }
                    recall[((t * k_n + k) * A + a) * M + m] = r[(t * A + a) * M + m];
                }
            }
        }
    }
    let pidx = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        (((t * R + r) * k_n + k) * A + a) * M + m
    };
    let ridx = |t: usize, k: usize, a: usize, m: usize| ((t * k_n + k) * A + a) * M + m;

    // summarize(): slices flattened in numpy C order (t, r, k) / (t, k).
    let ap = |t_sel: Option<f64>, a: usize, m: usize| {
        let ts: Vec<usize> = match t_sel {
            None => (0..T).collect(),
            Some(v) => (0..T).filter(|&t| thr[t] == v).collect(),
        };
        mean_valid(
            ts.into_iter()
                .flat_map(|t| (0..R).flat_map(move |r| (0..k_n).map(move |k| (t, r, k))))
                .map(|(t, r, k)| precision[pidx(t, r, k, a, m)]),
        )
    };
    let ar = |a: usize, m: usize| {
        mean_valid(
            (0..T)
                .flat_map(|t| (0..k_n).map(move |k| (t, k)))
                .map(|(t, k)| recall[ridx(t, k, a, m)]),
        )
    };
    let stats = [
        ap(None, 0, 2),
        ap(Some(0.5), 0, 2),
        ap(Some(0.75), 0, 2),
        ap(None, 1, 2),
        ap(None, 2, 2),
        ap(None, 3, 2),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ];
    let per_category_ap = (0..k_n)
        .map(|k| {
            mean_valid(
                (0..T)
                    .flat_map(|t| (0..R).map(move |r| (t, r)))
                    .map(|(t, r)| precision[pidx(t, r, k, 0, 2)]),
            )
        })
        .collect();
    let per_category_ar = (0..k_n)
        .map(|k| mean_valid((0..T).map(|t| recall[ridx(t, k, 0, 2)])))
        .collect();
    Ok(CocoEvalResult {
        iou_type,
        stats,
        cat_ids,
        per_category_ap,
        per_category_ar,
        img_ids,
        precision,
        recall,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_numpy() {
        let t = iou_thresholds();
        assert_eq!(t[8], 0.8999999999999999);
        assert_eq!(t[5], 0.75);
        let r = recall_thresholds();
        assert_eq!(r[35], 0.35000000000000003);
        assert_eq!(r[100], 1.0);
    }

    #[test]
    fn pairwise_mean() {
        let v: Vec<f64> = (0..1000).map(|i| i as f64 * 0.1).collect();
        assert!((numpy_mean(&v) - 49.95).abs() < 1e-12);
    }

    /// The dense pycocotools loop (every index) for one threshold's tp / fp flags.
    fn dense(tp: &[bool], fp: &[bool], npig: usize, rec_thr: &[f64; R]) -> (Vec<f64>, f64) {
        let nd = tp.len();
        let (mut t, mut f) = (0.0, 0.0);
        let (mut rc, mut pr) = (vec![0.0; nd], vec![0.0; nd]);
        for i in 0..nd {
            t += tp[i] as u8 as f64;
            f += fp[i] as u8 as f64;
            rc[i] = t / npig as f64;
            pr[i] = t / (f + t + f64::EPSILON);
        }
        for i in (1..nd).rev() {
            pr[i - 1] = pr[i - 1].max(pr[i]);
        }
        let q = rec_thr
            .iter()
            .map(|&r| rc.iter().position(|&x| x >= r).map_or(0.0, |i| pr[i]))
            .collect();
        (q, if nd > 0 { rc[nd - 1] } else { 0.0 })
    }

    #[test]
    fn sparse_accumulate_equals_dense() {
        let rec_thr = recall_thresholds();
        let mut seed = 12345u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
        for case in 0..300 {
            let nd = (rnd() % 60) as usize;
            let npig = 1 + (rnd() % 40) as usize;
            let (mut tpm, mut fpm) = (vec![0u16; nd], vec![0u16; nd]);
            for d in 0..nd {
                for t in 0..T {
                    match rnd() % 4 {
                        0 | 1 => tpm[d] |= 1 << t,
                        2 => fpm[d] |= 1 << t,
                        _ => {} // ignored
                    }
                }
            }
            let img = EvalImg {
                scores: vec![0.5; nd],
                tp: tpm.clone(),
                fp: fpm.clone(),
                npig,
            };
            let items: Vec<(u32, u32)> = (0..nd as u32).map(|d| (0, d)).collect();
            let (mut prec, mut rec) = (vec![-1.0; T * R], vec![-1.0; T]);
            accumulate_one(&[&img], &items, &rec_thr, &mut prec, &mut rec);
            for t in 0..T {
                let tp: Vec<bool> = tpm.iter().map(|m| (m >> t) & 1 == 1).collect();
                let fp: Vec<bool> = fpm.iter().map(|m| (m >> t) & 1 == 1).collect();
                let (q, r) = dense(&tp, &fp, npig, &rec_thr);
                assert_eq!(rec[t].to_bits(), r.to_bits(), "case {case} t {t}");
                for ri in 0..R {
                    assert_eq!(
                        prec[t * R + ri].to_bits(),
                        q[ri].to_bits(),
                        "case {case} t {t} r {ri}"
                    );
                }
            }
        }
    }
}

//! Intersection over union of boxes and of RLE masks (`maskUtils.iou`, i.e. `bbIou` and
//! `rleIou`), with the COCO crowd rule: against a crowd ground truth the union is replaced by
//! the detection's own area, so a detection inside a crowd region scores 1.

use std::borrow::Borrow;

use crate::data::mask::Rle;

/// A detections x ground-truths IoU matrix, row-major (`get(d, g)`).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct IouMatrix {
    /// Number of rows (detections).
    pub n_dt: usize,
    /// Number of columns (ground truths).
    pub n_gt: usize,
    /// `data[d * n_gt + g]` = IoU of detection `d` with ground truth `g`.
    pub data: Vec<f64>,
}

impl IouMatrix {
    /// IoU of detection `d` with ground truth `g`.
    pub fn get(&self, d: usize, g: usize) -> f64 {
        self.data[d * self.n_gt + g]
    }

    /// Nested rows, `rows[d][g]`, as `maskUtils.iou` returns them.
    pub fn to_rows(&self) -> Vec<Vec<f64>> {
        if self.n_gt == 0 {
            return vec![Vec::new(); self.n_dt];
        }
        self.data.chunks(self.n_gt).map(|r| r.to_vec()).collect()
    }
}

fn crowd_at(iscrowd: &[bool], g: usize) -> bool {
    iscrowd.get(g).copied().unwrap_or(false)
}

/// IoU of one box pair `[x, y, w, h]` (no +1), literal `bbIou` arithmetic.
#[inline]
pub fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let ga = g[2] * g[3];
    let da = d[2] * d[3];
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let u = if crowd { da } else { da + ga - i };
    i / u
}

/// Box IoU matrix (`maskUtils.iou` on `[x, y, w, h]` lists). `iscrowd[g]` marks crowd ground
/// truths (missing entries count as not crowd).
pub fn bbox_iou(dt: &[[f64; 4]], gt: &[[f64; 4]], iscrowd: &[bool]) -> IouMatrix {
    let mut data = Vec::with_capacity(dt.len() * gt.len());
    for d in dt {
        for (g, gb) in gt.iter().enumerate() {
            data.push(box_iou(d, gb, crowd_at(iscrowd, g)));
        }
    }
    IouMatrix {
        n_dt: dt.len(),
        n_gt: gt.len(),
        data,
    }
}

/// Mask IoU matrix (`maskUtils.iou` on RLE lists, `rleIou`). Pairs whose boxes do not overlap
/// are 0 without a run walk; masks of different sizes give -1 (as pycocotools).
pub fn mask_iou<R: Borrow<Rle>>(dt: &[R], gt: &[R], iscrowd: &[bool]) -> IouMatrix {
    let db: Vec<[f64; 4]> = dt.iter().map(|r| r.borrow().to_bbox()).collect();
    let gb: Vec<[f64; 4]> = gt.iter().map(|r| r.borrow().to_bbox()).collect();
    let mut m = bbox_iou(&db, &gb, iscrowd);
    for (d, dr) in dt.iter().enumerate() {
        for (g, gr) in gt.iter().enumerate() {
            let o = &mut m.data[d * gt.len() + g];
            if *o > 0.0 {
                *o = rle_pair_iou(dr.borrow(), gr.borrow(), crowd_at(iscrowd, g));
            }
        }
    }
    m
}

/// Exact IoU of two masks (the run walk of `rleIou`), without the box pre-filter.
pub fn rle_pair_iou(dt: &Rle, gt: &Rle, crowd: bool) -> f64 {
    if dt.h != gt.h || dt.w != gt.w {
        return -1.0;
    }
    let (mut i, mut u) = (0u64, 0u64);
    for step in crate::data::mask::rle::run_walk(&dt.counts, &gt.counts) {
        let (va, vb) = step.on;
        if va || vb {
            u += step.len as u64;
            if va && vb {
                i += step.len as u64;
            }
        }
    }
    if i == 0 {
        u = 1;
    } else if crowd {
        u = dt.area();
    }
    i as f64 / u as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_crowd_rule() {
        let dt = [[0.0, 0.0, 10.0, 10.0]];
        let gt = [[5.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0]];
        let m = bbox_iou(&dt, &gt, &[false, true]);
        // inter 50; normal union 150; crowd union = det area 100.
        assert_eq!(m.get(0, 0), 50.0 / 150.0);
        assert_eq!(m.get(0, 1), 0.5);
        // A detection inside a crowd region scores 1.
        let inside = bbox_iou(&[[6.0, 1.0, 2.0, 2.0]], &gt, &[false, true]);
        assert_eq!(inside.get(0, 1), 1.0);
        // Touching boxes do not overlap.
        assert_eq!(
            box_iou(&[0.0, 0.0, 5.0, 5.0], &[5.0, 0.0, 5.0, 5.0], false),
            0.0
        );
    }

    #[test]
    fn mask_crowd_rule() {
        let dt = Rle::encode_col_major(&[1, 1, 0, 0], 2, 2).unwrap();
        let gt = Rle::encode_col_major(&[0, 1, 1, 1], 2, 2).unwrap();
        let m = mask_iou(std::slice::from_ref(&dt), &[gt.clone(), gt], &[false, true]);
        assert_eq!(m.get(0, 0), 0.25);
        assert_eq!(m.get(0, 1), 0.5);
        let other_size = Rle::empty(3, 3);
        assert_eq!(rle_pair_iou(&dt, &other_size, false), -1.0);
    }
}

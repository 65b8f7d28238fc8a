//! Box coding of the FCOS head (Tian et al., ICCV 2019, arXiv 1904.01355, and the "improvements"
//! of its official repo: `norm_reg_targets`, GIoU loss, centerness on the regression branch).
//!
//! Boxes are `[x1, y1, x2, y2]` in input pixels. A location `(x, y)` of a level with stride `s`
//! regresses the distances `(l, t, r, b)` to the four sides of its box, divided by `s`
//! (`norm_reg_targets`). [`encode`] / [`decode`] convert between the two; [`centerness`] is the
//! FCOS target `sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`; [`giou_loss_ltrb`] is the
//! differentiable GIoU loss of two sets of distances sharing their locations.

use candle_core::{Tensor, D};

use crate::model::error::Result;

/// A box `[x1, y1, x2, y2]`.
pub type BoxXyxy = [f32; 4];

/// Distances `(l, t, r, b) / stride` from `(x, y)` to the sides of `b`.
pub fn encode(x: f32, y: f32, stride: f32, b: &BoxXyxy) -> [f32; 4] {
    [
        (x - b[0]) / stride,
        (y - b[1]) / stride,
        (b[2] - x) / stride,
        (b[3] - y) / stride,
    ]
}

/// The box of distances `d = (l, t, r, b) / stride` regressed at `(x, y)`.
pub fn decode(x: f32, y: f32, stride: f32, d: &[f32; 4]) -> BoxXyxy {
    [
        x - d[0] * stride,
        y - d[1] * stride,
        x + d[2] * stride,
        y + d[3] * stride,
    ]
}

/// FCOS centerness target of positive distances (0 when a distance is not positive).
pub fn centerness(d: &[f32; 4]) -> f32 {
    let (l, t, r, b) = (d[0], d[1], d[2], d[3]);
    if l <= 0.0 || t <= 0.0 || r <= 0.0 || b <= 0.0 {
        return 0.0;
    }
    ((l.min(r) / l.max(r)) * (t.min(b) / t.max(b))).sqrt()
}

/// Clip a box to an image of `w x h` pixels.
pub fn clip(b: &BoxXyxy, w: f32, h: f32) -> BoxXyxy {
    [
        b[0].clamp(0.0, w),
        b[1].clamp(0.0, h),
        b[2].clamp(0.0, w),
        b[3].clamp(0.0, h),
    ]
}

/// Area of a box (0 for an empty one).
pub fn area(b: &BoxXyxy) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

/// IoU of two boxes (torchvision `box_iou`: no +1 on the sides; 0 when the union is empty).
pub fn iou(a: &BoxXyxy, b: &BoxXyxy) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// `[x, y, w, h]` (COCO) to `[x1, y1, x2, y2]`.
pub fn xywh_to_xyxy(b: [f64; 4]) -> BoxXyxy {
    [
        b[0] as f32,
        b[1] as f32,
        (b[0] + b[2]) as f32,
        (b[1] + b[3]) as f32,
    ]
}

/// `[x1, y1, x2, y2]` to `[x, y, w, h]` (COCO).
pub fn xyxy_to_xywh(b: &BoxXyxy) -> [f64; 4] {
    [
        b[0] as f64,
        b[1] as f64,
        (b[2] - b[0]) as f64,
        (b[3] - b[1]) as f64,
    ]
}

/// GIoU loss `1 - GIoU` per row of two `(N, 4)` distance sets regressed from the same locations
/// (so the boxes share their reference point and the overlap is computed from the distances).
/// `pred` must be non-negative (the head applies a ReLU). Returns `(N,)`.
pub fn giou_loss_ltrb(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let col = |t: &Tensor, i: usize| t.narrow(D::Minus1, i, 1).and_then(|c| c.squeeze(D::Minus1));
    let (pl, pt, pr, pb) = (col(pred, 0)?, col(pred, 1)?, col(pred, 2)?, col(pred, 3)?);
    let (tl, tt, tr, tb) = (
        col(target, 0)?,
        col(target, 1)?,
        col(target, 2)?,
        col(target, 3)?,
    );
    let p_area = ((&pl + &pr)? * (&pt + &pb)?)?;
    let t_area = ((&tl + &tr)? * (&tt + &tb)?)?;
    let iw = (pl.minimum(&tl)? + pr.minimum(&tr)?)?;
    let ih = (pt.minimum(&tt)? + pb.minimum(&tb)?)?;
    let inter = (iw * ih)?;
    let union = ((&p_area + &t_area)? - &inter)?;
    let eps = 1e-7;
    let ious = ((&inter + eps)? / (&union + eps)?)?;
    let cw = (pl.maximum(&tl)? + pr.maximum(&tr)?)?;
    let ch = (pt.maximum(&tt)? + pb.maximum(&tb)?)?;
    let enclose = ((cw * ch)? + eps)?;
    let giou = (&ious - ((&enclose - &union)? / &enclose)?)?;
    Ok(giou.affine(-1.0, 1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn encode_decode_roundtrip() {
        let b = [10.0, 20.0, 50.0, 44.0];
        let d = encode(30.0, 30.0, 8.0, &b);
        assert_eq!(d, [2.5, 1.25, 2.5, 1.75]);
        assert_eq!(decode(30.0, 30.0, 8.0, &d), b);
        // a location outside the box has a negative distance
        assert!(encode(5.0, 30.0, 8.0, &b)[0] < 0.0);
    }

    #[test]
    fn centerness_values() {
        assert_eq!(centerness(&[1.0, 2.0, 1.0, 2.0]), 1.0);
        let c = centerness(&[1.0, 1.0, 3.0, 1.0]);
        assert!((c - (1.0f32 / 3.0).sqrt()).abs() < 1e-6);
        assert_eq!(centerness(&[0.0, 1.0, 1.0, 1.0]), 0.0);
    }

    #[test]
    fn iou_and_clip() {
        let a = [0.0, 0.0, 2.0, 2.0];
        let b = [1.0, 1.0, 3.0, 3.0];
        assert!((iou(&a, &b) - 1.0 / 7.0).abs() < 1e-6);
        assert_eq!(iou(&a, &[5.0, 5.0, 6.0, 6.0]), 0.0);
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
        assert_eq!(
            clip(&[-3.0, 2.0, 70.0, 9.0], 64.0, 8.0),
            [0.0, 2.0, 64.0, 8.0]
        );
        let x = xyxy_to_xywh(&xywh_to_xyxy([1.5, 2.0, 3.0, 4.25]));
        assert_eq!(x, [1.5, 2.0, 3.0, 4.25]);
    }

    /// GIoU of two boxes from their corners (reference formula).
    fn giou_ref(a: &BoxXyxy, b: &BoxXyxy) -> f32 {
        let i = iou(a, b);
        let inter = {
            let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
            let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
            iw * ih
        };
        let union = area(a) + area(b) - inter;
        let c = (a[2].max(b[2]) - a[0].min(b[0])) * (a[3].max(b[3]) - a[1].min(b[1]));
        i - (c - union) / c
    }

    #[test]
    fn giou_loss_matches_corner_formula_and_has_gradient() {
        let dev = Device::Cpu;
        let p = [
            [1f32, 2.0, 3.0, 1.0],
            [0.5, 0.5, 0.5, 0.5],
            [2.0, 2.0, 2.0, 2.0],
        ];
        let t = [
            [1f32, 2.0, 3.0, 1.0],
            [2.0, 1.0, 0.2, 3.0],
            [0.1, 0.1, 0.1, 0.1],
        ];
        let pv = Var::new(&p, &dev).unwrap();
        let tt = Tensor::new(&t, &dev).unwrap();
        let l = giou_loss_ltrb(pv.as_tensor(), &tt).unwrap();
        let got = l.to_vec1::<f32>().unwrap();
        for i in 0..3 {
            let a = decode(0.0, 0.0, 1.0, &p[i]);
            let b = decode(0.0, 0.0, 1.0, &t[i]);
            let want = 1.0 - giou_ref(&a, &b);
            assert!((got[i] - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
        }
        assert!(got[0].abs() < 1e-5);
        let g = l.sum_all().unwrap().backward().unwrap();
        let gp = g.get(pv.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // growing the small box of row 1 toward the target lowers the loss
        assert!(gp[1][0] < 0.0 && gp[1][3] < 0.0);
    }
}

//! Greedy non-maximum suppression with torchvision's semantics (`torchvision.ops.nms` /
//! `batched_nms`): boxes are visited by decreasing score and a box is dropped when its IoU with an
//! already kept box is **greater than** the threshold. Ties in score keep the input order (a
//! stable sort), so the result is deterministic.

use super::box_coding::{iou, BoxXyxy};

/// Indices of the kept boxes, by decreasing score.
pub fn nms(boxes: &[BoxXyxy], scores: &[f32], iou_thr: f32) -> Vec<usize> {
    assert_eq!(boxes.len(), scores.len(), "one score per box");
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut keep: Vec<usize> = Vec::new();
    let mut removed = vec![false; boxes.len()];
    for (oi, &i) in order.iter().enumerate() {
        if removed[i] {
            continue;
        }
        keep.push(i);
        for &j in &order[oi + 1..] {
            if !removed[j] && iou(&boxes[i], &boxes[j]) > iou_thr {
                removed[j] = true;
            }
        }
    }
    keep
}

/// NMS independently per class (boxes of different classes never suppress each other); the kept
/// indices of all classes, by decreasing score (ties: input order).
pub fn batched_nms(
    boxes: &[BoxXyxy],
    scores: &[f32],
    classes: &[usize],
    iou_thr: f32,
) -> Vec<usize> {
    assert_eq!(boxes.len(), classes.len(), "one class per box");
    let mut by_class: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, &c) in classes.iter().enumerate() {
        by_class.entry(c).or_default().push(i);
    }
    let mut keep = Vec::new();
    for idx in by_class.values() {
        let b: Vec<BoxXyxy> = idx.iter().map(|&i| boxes[i]).collect();
        let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        keep.extend(nms(&b, &s, iou_thr).into_iter().map(|k| idx[k]));
    }
    keep.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suppresses_overlaps_above_threshold_only() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 0.0, 11.0, 10.0], // IoU 9/11 = 0.818 with box 0
            [20.0, 20.0, 30.0, 30.0],
            [0.0, 0.0, 10.0, 5.0], // IoU exactly 0.5 with box 0
        ];
        let scores = [0.9, 0.95, 0.5, 0.3];
        assert_eq!(nms(&boxes, &scores, 0.5), vec![1, 2, 3]);
        // at 0.9 nothing overlaps enough: every box stays, by decreasing score
        assert_eq!(nms(&boxes, &scores, 0.9), vec![1, 0, 2, 3]);
        assert_eq!(nms(&[], &[], 0.5), Vec::<usize>::new());
    }

    #[test]
    fn suppressed_boxes_do_not_suppress() {
        // A suppresses B, B would suppress C, but C survives because B was removed.
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [4.0, 0.0, 14.0, 10.0],
            [8.0, 0.0, 18.0, 10.0],
        ];
        let scores = [0.9, 0.8, 0.7];
        assert_eq!(nms(&boxes, &scores, 0.4), vec![0, 2]);
    }

    #[test]
    fn batched_keeps_classes_apart() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
        ];
        let scores = [0.5, 0.9, 0.7];
        assert_eq!(batched_nms(&boxes, &scores, &[0, 1, 0], 0.5), vec![1, 2]);
        // equal scores keep input order
        assert_eq!(nms(&boxes, &[0.5, 0.5, 0.5], 0.5), vec![0]);
    }
}

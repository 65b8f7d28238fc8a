//! FCOS: fully convolutional one-stage, anchor-free detection (Tian et al., ICCV 2019,
//! arXiv 1904.01355) with the improvements of its official repository that torchvision and
//! detectron2 also adopt: center sampling (radius 1.5 strides), distances normalised by the
//! stride with a ReLU (`norm_reg_targets`), GIoU loss weighted by the centerness target,
//! centerness predicted on the regression tower, score = `sqrt(cls * centerness)` at test time.
//!
//! Head: two towers of `num_convs` x (conv 3x3 -> LN -> ReLU), shared by all levels, then
//! `cls_logits` (K, prior 0.01), `bbox_pred` (4, times a learnable per-level scale, ReLU) and
//! `centerness` (1). Targets: a location is positive for a ground-truth box when it lies in the
//! box's center region and the box's largest distance fits the level's range
//! (`(8 s_{l-1}, 8 s_l]`, first level from 0, last to infinity: 0-32-64-128-inf at strides
//! 4..32, FCOS's 64-128-256-512 shifted one level down); among several, the smallest box wins.
//! Losses: sigmoid focal loss (alpha 0.25, gamma 2) over all locations / #positives, GIoU and
//! centerness BCE over positives.

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::box_coding::{self, centerness, decode, BoxXyxy};
use super::nms::batched_nms;
use super::nn::{bce_with_logits, sigmoid_focal_loss, Conv2d, LayerNorm2d};
use crate::model::error::Result;

/// One pyramid level as seen by the head: stride, size and its first row in the flattened output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelInfo {
    /// Stride in input pixels.
    pub stride: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Index of its first location among all levels' locations.
    pub offset: usize,
}

impl LevelInfo {
    /// Levels of maps `(B, H, W, C)` with these strides.
    pub fn of(feats: &[Tensor], strides: &[usize]) -> Result<Vec<LevelInfo>> {
        let mut off = 0;
        let mut out = Vec::new();
        for (f, &s) in feats.iter().zip(strides) {
            let (_, h, w, _) = f.dims4()?;
            out.push(LevelInfo {
                stride: s,
                h,
                w,
                offset: off,
            });
            off += h * w;
        }
        Ok(out)
    }

    /// Centre of location `(i, j)` in input pixels (FCOS: `j * s + s / 2`).
    pub fn location(&self, i: usize, j: usize) -> (f32, f32) {
        let s = self.stride;
        ((j * s + s / 2) as f32, (i * s + s / 2) as f32)
    }
}

/// Total locations over `levels`.
pub fn num_locations(levels: &[LevelInfo]) -> usize {
    levels.iter().map(|l| l.h * l.w).sum()
}

/// Raw head outputs, flattened over levels (level-major, then row-major locations).
#[derive(Debug, Clone)]
pub struct FcosOutput {
    /// Class logits `(B, L, K)`.
    pub cls: Tensor,
    /// Distances / stride `(B, L, 4)`, non-negative.
    pub reg: Tensor,
    /// Centerness logits `(B, L)`.
    pub ctr: Tensor,
    /// The levels.
    pub levels: Vec<LevelInfo>,
}

/// The FCOS head.
#[derive(Debug, Clone)]
pub struct FcosHead {
    cls_tower: Vec<(Conv2d, LayerNorm2d)>,
    box_tower: Vec<(Conv2d, LayerNorm2d)>,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    centerness: Conv2d,
    scales: Vec<Tensor>,
    num_classes: usize,
}

impl FcosHead {
    /// Head for `num_classes` classes on `dim`-channel maps of `num_levels` levels.
    pub fn new(
        num_classes: usize,
        dim: usize,
        num_convs: usize,
        num_levels: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let std01 = Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let tower = |name: &str| -> Result<Vec<(Conv2d, LayerNorm2d)>> {
            (0..num_convs)
                .map(|i| {
                    let v = vb.pp(name).pp(i);
                    Ok((
                        Conv2d::new(dim, dim, 3, std01, None, v.pp("conv"))?,
                        LayerNorm2d::new(dim, v.pp("norm"))?,
                    ))
                })
                .collect()
        };
        let prior = 0.01f64;
        let bias_cls = -((1.0 - prior) / prior).ln();
        Ok(Self {
            cls_tower: tower("cls_tower")?,
            box_tower: tower("bbox_tower")?,
            cls_logits: Conv2d::new(
                dim,
                num_classes,
                3,
                std01,
                Some(bias_cls),
                vb.pp("cls_logits"),
            )?,
            bbox_pred: Conv2d::new(dim, 4, 3, std01, Some(0.0), vb.pp("bbox_pred"))?,
            centerness: Conv2d::new(dim, 1, 3, std01, Some(0.0), vb.pp("centerness"))?,
            scales: (0..num_levels)
                .map(|i| {
                    vb.pp("scales")
                        .get_with_hints(1, &i.to_string(), Init::Const(1.0))
                })
                .collect::<candle_core::Result<_>>()?,
            num_classes,
        })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Run the head on every level (channels-last maps).
    pub fn forward(&self, feats: &[Tensor], strides: &[usize]) -> Result<FcosOutput> {
        let levels = LevelInfo::of(feats, strides)?;
        let (mut cls, mut reg, mut ctr) = (Vec::new(), Vec::new(), Vec::new());
        for (l, x) in feats.iter().enumerate() {
            let (b, h, w, _) = x.dims4()?;
            let mut c = x.clone();
            for (conv, norm) in &self.cls_tower {
                c = norm.forward(&conv.forward(&c)?)?.relu()?;
            }
            let mut r = x.clone();
            for (conv, norm) in &self.box_tower {
                r = norm.forward(&conv.forward(&r)?)?.relu()?;
            }
            let flat = |t: Tensor, k: usize| -> Result<Tensor> { Ok(t.reshape((b, h * w, k))?) };
            cls.push(flat(self.cls_logits.forward(&c)?, self.num_classes)?);
            let d = self
                .bbox_pred
                .forward(&r)?
                .broadcast_mul(&self.scales[l].reshape((1, 1, 1, 1))?)?
                .relu()?;
            reg.push(flat(d, 4)?);
            ctr.push(flat(self.centerness.forward(&r)?, 1)?.squeeze(D::Minus1)?);
        }
        Ok(FcosOutput {
            cls: Tensor::cat(&cls, 1)?,
            reg: Tensor::cat(&reg, 1)?,
            ctr: Tensor::cat(&ctr, 1)?,
            levels,
        })
    }
}

/// A ground-truth box with its contiguous class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtBox {
    /// `[x1, y1, x2, y2]` in input pixels.
    pub bbox: BoxXyxy,
    /// Class in `0..K`.
    pub class: usize,
}

/// Per-location assignment of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Index of the assigned box per location, or `None` (background).
    pub gt: Vec<Option<usize>>,
    /// Regression targets (distances / stride) per location (zeros for background).
    pub reg: Vec<[f32; 4]>,
}

impl Assignment {
    /// Positive locations.
    pub fn positives(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.gt
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.map(|g| (i, g)))
    }
}

/// The `(lower, upper]` range of the largest regression distance (pixels) of each level.
pub fn size_ranges(levels: &[LevelInfo]) -> Vec<(f32, f32)> {
    let n = levels.len();
    (0..n)
        .map(|i| {
            let lo = if i == 0 {
                -1.0
            } else {
                8.0 * levels[i - 1].stride as f32
            };
            let hi = if i + 1 == n {
                f32::INFINITY
            } else {
                8.0 * levels[i].stride as f32
            };
            (lo, hi)
        })
        .collect()
}

/// FCOS target assignment with center sampling of `radius` strides.
pub fn assign(levels: &[LevelInfo], gts: &[GtBox], radius: f32) -> Assignment {
    let n = num_locations(levels);
    let mut out = Assignment {
        gt: vec![None; n],
        reg: vec![[0.0; 4]; n],
    };
    let ranges = size_ranges(levels);
    for (lv, (lo, hi)) in levels.iter().zip(ranges) {
        let s = lv.stride as f32;
        for i in 0..lv.h {
            for j in 0..lv.w {
                let (x, y) = lv.location(i, j);
                let mut best: Option<(usize, f32)> = None;
                for (g, gt) in gts.iter().enumerate() {
                    let b = &gt.bbox;
                    let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                    let r = radius * s;
                    let (x0, y0) = ((cx - r).max(b[0]), (cy - r).max(b[1]));
                    let (x1, y1) = ((cx + r).min(b[2]), (cy + r).min(b[3]));
                    if !(x > x0 && x < x1 && y > y0 && y < y1) {
                        continue;
                    }
                    let d = [x - b[0], y - b[1], b[2] - x, b[3] - y];
                    let m = d.iter().cloned().fold(f32::MIN, f32::max);
                    if !(m > lo && m <= hi) {
                        continue;
                    }
                    let a = box_coding::area(b);
                    if best.is_none_or(|(_, ba)| a < ba) {
                        best = Some((g, a));
                    }
                }
                if let Some((g, _)) = best {
                    let k = lv.offset + i * lv.w + j;
                    out.gt[k] = Some(g);
                    out.reg[k] = box_coding::encode(x, y, s, &gts[g].bbox);
                }
            }
        }
    }
    out
}

/// Loss settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// Focal alpha.
    pub alpha: f64,
    /// Focal gamma.
    pub gamma: f64,
}

/// The three FCOS losses (already normalised) and the positive count.
#[derive(Debug, Clone)]
pub struct FcosLosses {
    /// Focal loss / #positives.
    pub cls: Tensor,
    /// Centerness-weighted GIoU loss.
    pub reg: Tensor,
    /// Centerness BCE / #positives.
    pub ctr: Tensor,
    /// Positive locations in the batch.
    pub num_pos: usize,
}

/// What the FCOS losses are divided by: the positive locations (focal and centerness losses)
/// and the sum of the positives' centerness targets (GIoU loss). Those of the batch, or, when a
/// global batch is split over data-parallel ranks, the sums of every rank's counts, so each
/// rank's loss is its share of the global batch's loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossNorm {
    /// Positive locations.
    pub num_pos: f64,
    /// Sum of the positives' centerness targets.
    pub ctr_sum: f64,
}

impl LossNorm {
    /// The normalisers of these assignments.
    pub fn of(assigns: &[Assignment]) -> LossNorm {
        let mut num_pos = 0usize;
        let mut ctr_sum = 0f32;
        for a in assigns {
            for (loc, _) in a.positives() {
                num_pos += 1;
                ctr_sum += centerness(&a.reg[loc]);
            }
        }
        LossNorm {
            num_pos: num_pos as f64,
            ctr_sum: ctr_sum as f64,
        }
    }
}

/// Losses of a batch with its assignments (one per image, with the images' ground truth),
/// normalised by the batch's own counts.
pub fn losses(
    out: &FcosOutput,
    assigns: &[Assignment],
    gts: &[Vec<GtBox>],
    cfg: &LossConfig,
) -> Result<FcosLosses> {
    losses_normalised(out, assigns, gts, cfg, &LossNorm::of(assigns))
}

/// Losses of a batch divided by the given normalisers (e.g. those of a global batch).
pub fn losses_normalised(
    out: &FcosOutput,
    assigns: &[Assignment],
    gts: &[Vec<GtBox>],
    cfg: &LossConfig,
    n: &LossNorm,
) -> Result<FcosLosses> {
    let (b, l, k) = out.cls.dims3()?;
    let dev = out.cls.device();
    let mut onehot = vec![0f32; b * l * k];
    let mut pos_idx: Vec<u32> = Vec::new();
    let mut reg_t: Vec<f32> = Vec::new();
    let mut ctr_t: Vec<f32> = Vec::new();
    for (bi, (a, g)) in assigns.iter().zip(gts).enumerate() {
        for (loc, gi) in a.positives() {
            let row = bi * l + loc;
            onehot[row * k + g[gi].class] = 1.0;
            pos_idx.push(row as u32);
            reg_t.extend_from_slice(&a.reg[loc]);
            ctr_t.push(centerness(&a.reg[loc]));
        }
    }
    let num_pos = pos_idx.len();
    let norm = n.num_pos.max(1.0);
    let t = Tensor::from_vec(onehot, (b, l, k), dev)?;
    let cls = (sigmoid_focal_loss(&out.cls, &t, cfg.alpha, cfg.gamma)?.sum_all()? / norm)?;
    let zero = Tensor::zeros((), out.cls.dtype(), dev)?;
    if num_pos == 0 {
        return Ok(FcosLosses {
            cls,
            reg: zero.clone(),
            ctr: zero,
            num_pos,
        });
    }
    let idx = Tensor::from_vec(pos_idx, num_pos, dev)?;
    let reg_p = out.reg.reshape((b * l, 4))?.index_select(&idx, 0)?;
    let ctr_p = out.ctr.reshape(b * l)?.index_select(&idx, 0)?;
    let reg_t = Tensor::from_vec(reg_t, (num_pos, 4), dev)?;
    let ctr_t = Tensor::from_vec(ctr_t, num_pos, dev)?;
    let giou = box_coding::giou_loss_ltrb(&reg_p, &reg_t)?;
    let reg = ((giou * &ctr_t)?.sum_all()? / n.ctr_sum.max(1e-6))?;
    let ctr = (bce_with_logits(&ctr_p, &ctr_t)?.sum_all()? / norm)?;
    Ok(FcosLosses {
        cls,
        reg,
        ctr,
        num_pos,
    })
}

/// A detection in input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// Box `[x1, y1, x2, y2]`.
    pub bbox: BoxXyxy,
    /// `sqrt(cls * centerness)`.
    pub score: f32,
    /// Class in `0..K`.
    pub class: usize,
}

/// Test-time settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostConfig {
    /// Minimum class probability of a candidate.
    pub score_thresh: f32,
    /// Candidates kept per level before NMS.
    pub pre_nms_topk: usize,
    /// NMS IoU threshold (per class).
    pub nms_thresh: f32,
    /// Detections kept per image.
    pub detections_per_image: usize,
}

/// Detections of one image from its host-side outputs: class probabilities `(L, K)`,
/// centerness probabilities `(L,)`, distances `(L, 4)`; boxes are clipped to `(w, h)`.
pub fn postprocess(
    cls_prob: &[f32],
    ctr_prob: &[f32],
    reg: &[f32],
    levels: &[LevelInfo],
    num_classes: usize,
    (w, h): (f32, f32),
    cfg: &PostConfig,
) -> Vec<Detection> {
    let k = num_classes;
    let mut cands: Vec<Detection> = Vec::new();
    for lv in levels {
        let mut lv_c: Vec<(f32, usize, usize)> = Vec::new(); // (cls*ctr, location, class)
        for loc in lv.offset..lv.offset + lv.h * lv.w {
            for c in 0..k {
                let p = cls_prob[loc * k + c];
                if p > cfg.score_thresh {
                    lv_c.push((p * ctr_prob[loc], loc, c));
                }
            }
        }
        lv_c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        lv_c.truncate(cfg.pre_nms_topk);
        for (s, loc, c) in lv_c {
            let r = loc - lv.offset;
            let (x, y) = lv.location(r / lv.w, r % lv.w);
            let d = [
                reg[loc * 4],
                reg[loc * 4 + 1],
                reg[loc * 4 + 2],
                reg[loc * 4 + 3],
            ];
            let b = box_coding::clip(&decode(x, y, lv.stride as f32, &d), w, h);
            if b[2] - b[0] > 0.0 && b[3] - b[1] > 0.0 {
                cands.push(Detection {
                    bbox: b,
                    score: s.sqrt(),
                    class: c,
                });
            }
        }
    }
    let boxes: Vec<BoxXyxy> = cands.iter().map(|d| d.bbox).collect();
    let scores: Vec<f32> = cands.iter().map(|d| d.score).collect();
    let classes: Vec<usize> = cands.iter().map(|d| d.class).collect();
    let keep = batched_nms(&boxes, &scores, &classes, cfg.nms_thresh);
    keep.into_iter()
        .take(cfg.detections_per_image)
        .map(|i| cands[i])
        .collect()
}

#[cfg(test)]
mod tests;

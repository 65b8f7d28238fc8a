//! One training forward pass of the detector: ViT features (detached when the encoder is
//! frozen) -> pyramid -> FCOS losses, then the mask loss on sampled RoIs. Mask RoIs follow
//! Mask R-CNN's positives: every ground-truth box plus the predicted boxes of positive
//! locations that overlap their ground truth by IoU >= 0.5, at most `mask_rois_per_image` per
//! image (a random subset drawn from the caller's generator, so runs are reproducible).

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use super::box_coding::{self, BoxXyxy};
use super::fcos::{self, Assignment, GtBox, LevelInfo, LossConfig};
use super::mask_head::mask_target;
use super::Detector;
use crate::data::detection::Instance;
use crate::model::error::Result;
use crate::model::VisionTransformer;

/// Losses of one batch: the total (with its graph) and its parts as numbers.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `cls + box + centerness + mask_loss_weight * mask`.
    pub total: Tensor,
    /// Focal loss.
    pub cls: f32,
    /// GIoU loss.
    pub reg: f32,
    /// Centerness BCE.
    pub ctr: f32,
    /// Mask BCE (0 without RoIs).
    pub mask: f32,
    /// Positive locations.
    pub num_pos: usize,
    /// Mask RoIs.
    pub num_rois: usize,
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

/// Level and location centre of a flattened location index.
pub fn location_of(levels: &[LevelInfo], loc: usize) -> (LevelInfo, f32, f32) {
    let l = *levels
        .iter()
        .rev()
        .find(|l| loc >= l.offset)
        .expect("location in range");
    let r = loc - l.offset;
    let (x, y) = l.location(r / l.w, r % l.w);
    (l, x, y)
}

/// Forward pass and losses of square `images` `(B, 3, S, S)` with their instances (boxes and
/// masks at input resolution).
pub fn forward_loss(
    det: &Detector,
    vit: &VisionTransformer,
    frozen: bool,
    images: &Tensor,
    instances: &[Vec<Instance>],
    rng: &mut impl Rng,
) -> Result<LossParts> {
    let cfg = det.config();
    let s = images.dim(3)?;
    let fmap = Detector::feature_map(vit, images)?;
    let fmap = if frozen { fmap.detach() } else { fmap };
    let feats = det.neck.forward(&fmap)?;
    let out = det.fcos.forward(&feats, det.strides())?;
    let gts: Vec<Vec<GtBox>> = instances
        .iter()
        .map(|v| {
            v.iter()
                .map(|i| GtBox {
                    bbox: i.bbox,
                    class: i.class,
                })
                .collect()
        })
        .collect();
    let radius = cfg.center_radius as f32;
    let assigns: Vec<Assignment> = gts
        .iter()
        .map(|g| fcos::assign(&out.levels, g, radius))
        .collect();
    let lcfg = LossConfig {
        alpha: cfg.focal_alpha,
        gamma: cfg.focal_gamma,
    };
    let fl = fcos::losses(&out, &assigns, &gts, &lcfg)?;

    let reg = out.reg.detach().to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let sf = s as f32;
    let (mut rois, mut classes, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let m = cfg.mask_size();
    for (b, (a, inst)) in assigns.iter().zip(instances).enumerate() {
        let mut cands: Vec<(BoxXyxy, usize)> =
            inst.iter().enumerate().map(|(g, i)| (i.bbox, g)).collect();
        for (loc, g) in a.positives() {
            let (l, x, y) = location_of(&out.levels, loc);
            let d = &reg[b][loc];
            let pb = box_coding::decode(x, y, l.stride as f32, &[d[0], d[1], d[2], d[3]]);
            let pb = box_coding::clip(&pb, sf, sf);
            if box_coding::iou(&pb, &inst[g].bbox) >= 0.5 {
                cands.push((pb, g));
            }
        }
        if cands.len() > cfg.mask_rois_per_image {
            // rand's partial_shuffle returns the chosen elements as its first slice
            let (chosen, _) = cands.partial_shuffle(rng, cfg.mask_rois_per_image);
            cands = chosen.to_vec();
        }
        for (bx, g) in cands {
            targets.extend(mask_target(&inst[g].mask, (s, s), &bx, m));
            rois.push((b, bx));
            classes.push(inst[g].class);
        }
    }
    let num_rois = rois.len();
    let mut total = ((&fl.cls + &fl.reg)? + &fl.ctr)?;
    let mut mask = 0f32;
    if num_rois > 0 {
        let logits = det.mask_logits(&feats, &rois)?;
        let ml = det.mask.loss(&logits, &classes, targets)?;
        mask = scalar(&ml)?;
        total = (total + (ml * cfg.mask_loss_weight)?)?;
    }
    Ok(LossParts {
        cls: scalar(&fl.cls)?,
        reg: scalar(&fl.reg)?,
        ctr: scalar(&fl.ctr)?,
        mask,
        num_pos: fl.num_pos,
        num_rois,
        total,
    })
}

//! One training forward pass of the detector: ViT features (detached when the encoder is
//! frozen) -> pyramid -> FCOS losses, then the mask loss on sampled RoIs. Mask RoIs follow
//! Mask R-CNN's positives: every ground-truth box plus the predicted boxes of positive
//! locations that overlap their ground truth by IoU >= 0.5, at most `mask_rois_per_image` per
//! image (a random subset drawn from the caller's generator of that image, so runs are
//! reproducible and an image's RoIs do not depend on the rest of its batch).

use candle_core::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use super::box_coding::{self, BoxXyxy};
use super::fcos::{self, Assignment, GtBox, LevelInfo, LossConfig, LossNorm};
use super::mask_head::mask_target;
use super::Detector;
use crate::data::detection::Instance;
use crate::model::error::Result;
use crate::model::VisionTransformer;

/// Losses of one batch: the total (with its graph) and its parts, detached scalars left on the
/// device (read them when they are logged, not every step).
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `cls + box + centerness + mask_loss_weight * mask`.
    pub total: Tensor,
    /// Focal loss.
    pub cls: Tensor,
    /// GIoU loss.
    pub reg: Tensor,
    /// Centerness BCE.
    pub ctr: Tensor,
    /// Mask BCE (0 without RoIs).
    pub mask: Tensor,
    /// Positive locations.
    pub num_pos: usize,
    /// Mask RoIs.
    pub num_rois: usize,
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

/// What the losses of a batch are divided by: the FCOS normalisers and the mask RoIs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norms {
    /// Positives and centerness-target sum.
    pub fcos: LossNorm,
    /// Mask RoIs.
    pub rois: f64,
}

impl Norms {
    /// As numbers, for an all-reduce: `[positives, centerness sum, RoIs]`.
    pub fn to_array(&self) -> [f32; 3] {
        [
            self.fcos.num_pos as f32,
            self.fcos.ctr_sum as f32,
            self.rois as f32,
        ]
    }

    /// Back from [`Norms::to_array`].
    pub fn from_array(v: &[f32]) -> Norms {
        Norms {
            fcos: LossNorm {
                num_pos: v[0] as f64,
                ctr_sum: v[1] as f64,
            },
            rois: v[2] as f64,
        }
    }
}

/// A batch after the forward pass, before its losses: the outputs, targets and sampled mask
/// RoIs, and the batch's own normalisers ([`Forward::norms`]). A data-parallel rank sums the
/// normalisers over the ranks before [`Forward::losses`], so its loss is its exact share of
/// the global batch's loss.
pub struct Forward {
    feats: Vec<Tensor>,
    out: fcos::FcosOutput,
    assigns: Vec<Assignment>,
    gts: Vec<Vec<GtBox>>,
    rois: Vec<(usize, BoxXyxy)>,
    classes: Vec<usize>,
    targets: Vec<f32>,
    norms: Norms,
}

/// Forward pass of square `images` `(B, 3, S, S)` with their instances (boxes and masks at
/// input resolution); image `b`'s mask RoIs are drawn from `rngs[b]`, so an image's RoIs do not
/// depend on the other images of its batch.
pub fn forward<R: Rng>(
    det: &Detector,
    vit: &VisionTransformer,
    frozen: bool,
    images: &Tensor,
    instances: &[Vec<Instance>],
    rngs: &mut [R],
) -> Result<Forward> {
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

    // the one read of a detection step: Mask R-CNN's RoIs are the predicted boxes of the
    // positives, chosen on the host
    let reg = crate::util::host_read::vec3::<f32>(&out.reg.detach().to_dtype(DType::F32)?)?;
    let sf = s as f32;
    let (mut rois, mut classes, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let m = cfg.mask_size();
    for (b, ((a, inst), rng)) in assigns.iter().zip(instances).zip(rngs).enumerate() {
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
    let norms = Norms {
        fcos: LossNorm::of(&assigns),
        rois: rois.len() as f64,
    };
    Ok(Forward {
        feats,
        out,
        assigns,
        gts,
        rois,
        classes,
        targets,
        norms,
    })
}

impl Forward {
    /// This batch's own normalisers.
    pub fn norms(&self) -> Norms {
        self.norms
    }

    /// The losses divided by `norms` and multiplied by `scale` (a data-parallel rank passes the
    /// global batch's normalisers and the number of ranks, so the mean over ranks is the
    /// global batch's loss).
    pub fn losses(self, det: &Detector, norms: &Norms, scale: f64) -> Result<LossParts> {
        let cfg = det.config();
        let lcfg = LossConfig {
            alpha: cfg.focal_alpha,
            gamma: cfg.focal_gamma,
        };
        let fl = fcos::losses_normalised(&self.out, &self.assigns, &self.gts, &lcfg, &norms.fcos)?;
        let num_rois = self.rois.len();
        let mut total = ((&fl.cls + &fl.reg)? + &fl.ctr)?;
        let mut mask = fl.cls.zeros_like()?;
        if num_rois > 0 {
            let m = cfg.mask_size();
            let logits = det.mask_logits(&self.feats, &self.rois)?;
            let per_pixel = det
                .mask
                .pixel_losses(&logits, &self.classes, self.targets)?;
            let ml = (per_pixel.sum_all()? / (norms.rois.max(1.0) * (m * m) as f64))?;
            mask = ml.detach();
            total = (total + (ml * cfg.mask_loss_weight)?)?;
        }
        let total = if scale == 1.0 {
            total
        } else {
            (total * scale)?
        };
        let scaled = |t: &Tensor| -> Result<Tensor> {
            let t = t.detach();
            Ok(if scale == 1.0 {
                t
            } else {
                t.affine(scale, 0.0)?
            })
        };
        Ok(LossParts {
            cls: scaled(&fl.cls)?,
            reg: scaled(&fl.reg)?,
            ctr: scaled(&fl.ctr)?,
            mask: scaled(&mask)?,
            num_pos: fl.num_pos,
            num_rois,
            total,
        })
    }
}

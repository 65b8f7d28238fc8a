//! COCO detection and instance segmentation on a plain ViT (the AP^box / AP^mask columns of the
//! C-JEPA paper, Table 1), following EVALS.md §2.4-2.5: ViTDet's simple feature pyramid on the
//! last ViT feature map, an **FCOS** anchor-free box head and a Mask R-CNN mask head on RoIAlign
//! features.
//!
//! Why FCOS rather than a full Mask R-CNN: one dense head replaces the RPN, its anchor generator,
//! proposal sampling and the second-stage box head with its own sampling and box coder, so there
//! are far fewer parts (and hyper-parameters) to get wrong in a port, training is a single
//! forward/backward without proposal bookkeeping, and the mask branch is exactly Mask R-CNN's
//! (RoIAlign 14x14 -> 4 convs -> 28x28 per-class masks, trained on the ground-truth boxes plus the
//! predicted boxes that overlap them by IoU >= 0.5, as Mask R-CNN trains on its positive
//! proposals). The same head, schedule and resolution must be used for every backbone compared;
//! the numbers are not comparable to 100-epoch ViTDet (EVALS.md §2.5).
//!
//! Parts, one file each: [`init`] (seeded parameter creation), [`nn`] (conv / deconv / LN / losses
//! with a backward), [`neck`] (simple feature pyramid), [`fcos`] (head, targets, losses,
//! decoding), [`box_coding`], [`nms`], [`roi_align`], [`mask_head`] (head, targets, pasting),
//! [`train`] (the losses of a batch), [`infer`] (detections with masks).

pub mod box_coding;
pub mod fcos;
pub mod infer;
pub mod init;
pub mod mask_head;
pub mod neck;
pub mod nms;
pub mod nn;
pub mod roi_align;
pub mod train;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::box_coding::BoxXyxy;
use self::fcos::{FcosHead, PostConfig};
use self::mask_head::MaskHead;
use self::neck::SimpleFeaturePyramid;
use self::roi_align::{fpn_level, roi_align, Roi, RoiAlignConfig};
use super::error::{ModelError, Result};
use super::VisionTransformer;

/// Architecture and loss / test settings of the detector (defaults: FCOS and Mask R-CNN papers,
/// ViTDet's 256-channel pyramid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Channels of the pyramid and of both heads.
    pub fpn_dim: usize,
    /// Convs per FCOS tower.
    pub head_convs: usize,
    /// Convs of the mask head.
    pub mask_convs: usize,
    /// RoIAlign output side (masks are twice that).
    pub roi_size: usize,
    /// RoIAlign samples per bin side (0 = adaptive, detectron2's default).
    pub sampling_ratio: usize,
    /// FCOS center-sampling radius in strides.
    pub center_radius: f64,
    /// Focal loss alpha.
    pub focal_alpha: f64,
    /// Focal loss gamma.
    pub focal_gamma: f64,
    /// Minimum class probability of a test candidate.
    pub score_thresh: f64,
    /// Per-class NMS IoU threshold.
    pub nms_thresh: f64,
    /// Candidates per level before NMS.
    pub pre_nms_topk: usize,
    /// Detections kept per image (COCO's maxDets is 100).
    pub detections_per_image: usize,
    /// Mask-head RoIs sampled per training image (ground-truth boxes + matching predictions).
    pub mask_rois_per_image: usize,
    /// Weight of the mask loss.
    pub mask_loss_weight: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            fpn_dim: 256,
            head_convs: 4,
            mask_convs: 4,
            roi_size: 14,
            sampling_ratio: 0,
            center_radius: 1.5,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            score_thresh: 0.05,
            nms_thresh: 0.6,
            pre_nms_topk: 1000,
            detections_per_image: 100,
            mask_rois_per_image: 64,
            mask_loss_weight: 1.0,
        }
    }
}

impl DetectorConfig {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, msg: &str| {
            Err(ModelError::Config {
                field,
                msg: msg.into(),
            })
        };
        if self.fpn_dim == 0 {
            return bad("fpn_dim", "must be positive");
        }
        if self.roi_size == 0 {
            return bad("roi_size", "must be positive");
        }
        if !(self.center_radius > 0.0) {
            return bad("center_radius", "must be > 0");
        }
        if !(0.0..=1.0).contains(&self.score_thresh) || !(0.0..=1.0).contains(&self.nms_thresh) {
            return bad(
                "score_thresh",
                "score_thresh and nms_thresh must lie in [0, 1]",
            );
        }
        if self.detections_per_image == 0 || self.pre_nms_topk == 0 {
            return bad(
                "detections_per_image",
                "detections_per_image and pre_nms_topk must be positive",
            );
        }
        Ok(())
    }

    /// The test-time settings of the FCOS head.
    pub fn post(&self) -> PostConfig {
        PostConfig {
            score_thresh: self.score_thresh as f32,
            pre_nms_topk: self.pre_nms_topk,
            nms_thresh: self.nms_thresh as f32,
            detections_per_image: self.detections_per_image,
        }
    }

    /// RoIAlign settings of the mask head (aligned, as detectron2's `ROIAlignV2`).
    pub fn roi_align(&self) -> RoiAlignConfig {
        RoiAlignConfig {
            output: self.roi_size,
            sampling_ratio: self.sampling_ratio,
            aligned: true,
        }
    }

    /// Mask side `M = 2 * roi_size`.
    pub fn mask_size(&self) -> usize {
        2 * self.roi_size
    }
}

/// Pyramid + FCOS head + mask head (the ViT itself is held by the caller).
#[derive(Debug, Clone)]
pub struct Detector {
    /// Simple feature pyramid.
    pub neck: SimpleFeaturePyramid,
    /// Box head.
    pub fcos: FcosHead,
    /// Mask head.
    pub mask: MaskHead,
    cfg: DetectorConfig,
}

impl Detector {
    /// A detector for `num_classes` classes on a ViT of width `embed_dim` and patch `patch`;
    /// variables under `neck.*`, `fcos.*`, `mask.*` of `vb`.
    pub fn new(
        cfg: &DetectorConfig,
        num_classes: usize,
        embed_dim: usize,
        patch: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.validate()?;
        if num_classes == 0 {
            return Err(ModelError::Config {
                field: "num_classes",
                msg: "the dataset has no categories".into(),
            });
        }
        let neck = SimpleFeaturePyramid::new(embed_dim, patch, cfg.fpn_dim, vb.pp("neck"))?;
        let fcos = FcosHead::new(
            num_classes,
            cfg.fpn_dim,
            cfg.head_convs,
            neck.strides().len(),
            vb.pp("fcos"),
        )?;
        let mask = MaskHead::new(cfg.fpn_dim, cfg.mask_convs, num_classes, vb.pp("mask"))?;
        Ok(Self {
            neck,
            fcos,
            mask,
            cfg: cfg.clone(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Strides of the pyramid levels.
    pub fn strides(&self) -> &[usize] {
        self.neck.strides()
    }

    /// The ViT's last feature map (after its final norm), channels-last `(B, H/p, W/p, D)`.
    pub fn feature_map(vit: &VisionTransformer, images: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = images.dims4()?;
        let (gh, gw) = vit.grid_for(h, w)?;
        let tok = vit.forward_features(images, None)?;
        let d = tok.dim(2)?;
        Ok(tok.reshape((b, gh, gw, d))?)
    }

    /// Index of the pyramid level a mask RoI is pooled from (Mask R-CNN's rule: a 224-pixel box
    /// goes to stride 16; the nearest available level in log scale).
    pub fn mask_level(&self, b: &BoxXyxy) -> usize {
        let k = fpn_level(b, i32::MIN / 2, i32::MAX / 2, 4);
        let st = self.strides();
        (0..st.len())
            .min_by_key(|&i| ((st[i] as f64).log2().round() as i32 - k).abs())
            .unwrap_or(0)
    }

    /// Mask logits `(R, M, M, K)` of the boxes `(image, box)` on the pyramid `feats`.
    pub fn mask_logits(&self, feats: &[Tensor], boxes: &[(usize, BoxXyxy)]) -> Result<Tensor> {
        let rois: Vec<Roi> = boxes
            .iter()
            .map(|&(b, bbox)| Roi {
                batch: b,
                level: self.mask_level(&bbox),
                bbox,
            })
            .collect();
        let x = roi_align(feats, self.strides(), &rois, &self.cfg.roi_align())?;
        self.mask.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c = DetectorConfig::default();
        assert_eq!(
            (c.fpn_dim, c.head_convs, c.roi_size, c.mask_size()),
            (256, 4, 14, 28)
        );
        assert_eq!(c.detections_per_image, 100);
        let mut bad = c.clone();
        bad.nms_thresh = 1.5;
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<DetectorConfig>(r#"{"fpn_dims": 3}"#).is_err());
    }

    #[test]
    fn mask_levels_follow_box_size() {
        let (_vars, vb) = crate::model::detect::init::SeededInit::cpu_vars(0);
        let cfg = DetectorConfig {
            fpn_dim: 8,
            head_convs: 1,
            mask_convs: 1,
            ..Default::default()
        };
        let d = Detector::new(&cfg, 2, 16, 16, vb).unwrap();
        assert_eq!(d.strides(), &[4, 8, 16, 32]);
        assert_eq!(d.mask_level(&[0.0, 0.0, 20.0, 20.0]), 0);
        assert_eq!(d.mask_level(&[0.0, 0.0, 150.0, 150.0]), 1);
        assert_eq!(d.mask_level(&[0.0, 0.0, 224.0, 224.0]), 2);
        assert_eq!(d.mask_level(&[0.0, 0.0, 900.0, 900.0]), 3);
    }
}

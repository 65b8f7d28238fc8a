//! Test-time detection: features -> FCOS decoding and per-class NMS per image -> mask head on
//! the kept boxes. Boxes are in input pixels; masks are the `M x M` probabilities of each box's
//! class, to be pasted into the image with [`super::mask_head::paste`].

use candle_core::Tensor;

use super::box_coding::BoxXyxy;
use super::fcos::{self, Detection};
use super::nn::sigmoid;
use super::Detector;
use crate::model::error::Result;
use crate::model::VisionTransformer;

/// Detections of one image with their mask probabilities (`M * M` each, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDetections {
    /// Boxes, scores, classes (by decreasing score).
    pub dets: Vec<Detection>,
    /// Mask probabilities, parallel to `dets`.
    pub masks: Vec<Vec<f32>>,
}

/// Detect on square `images` `(B, 3, S, S)`; `valid[b]` is the `(width, height)` of image `b`'s
/// content (boxes are clipped to it; the rest is padding).
pub fn detect(
    det: &Detector,
    vit: &VisionTransformer,
    images: &Tensor,
    valid: &[(f32, f32)],
) -> Result<Vec<ImageDetections>> {
    let k = det.fcos.num_classes();
    let m = det.config().mask_size();
    let post = det.config().post();
    let fmap = Detector::feature_map(vit, images)?.detach();
    let feats = det.neck.forward(&fmap)?;
    let out = det.fcos.forward(&feats, det.strides())?;
    let cls = sigmoid(&out.cls.detach())?.to_vec3::<f32>()?;
    let ctr = sigmoid(&out.ctr.detach())?.to_vec2::<f32>()?;
    let reg = out.reg.detach().to_vec3::<f32>()?;
    let mut per_image = Vec::with_capacity(valid.len());
    let mut boxes: Vec<(usize, BoxXyxy)> = Vec::new();
    let mut classes = Vec::new();
    for (b, &wh) in valid.iter().enumerate() {
        let (fc, fr) = (cls[b].concat(), reg[b].concat());
        let dets = fcos::postprocess(&fc, &ctr[b], &fr, &out.levels, k, wh, &post);
        for d in &dets {
            boxes.push((b, d.bbox));
            classes.push(d.class);
        }
        per_image.push(ImageDetections {
            dets,
            masks: Vec::new(),
        });
    }
    if boxes.is_empty() {
        return Ok(per_image);
    }
    let logits = det.mask_logits(&feats, &boxes)?.detach();
    let probs = sigmoid(&det.mask.select_class(&logits, &classes)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (i, (b, _)) in boxes.iter().enumerate() {
        per_image[*b]
            .masks
            .push(probs[i * m * m..(i + 1) * m * m].to_vec());
    }
    Ok(per_image)
}

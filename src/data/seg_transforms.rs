//! The mmsegmentation ADE20K pipelines (EVALS.md §3, `configs/_base_/datasets/ade20k.py`) on an
//! RGB image and its label map (labels already through `reduce_zero_label`, 255 = ignore).
//!
//! Train: `RandomResize(scale, ratio_range, keep_ratio)` → `RandomCrop(crop, cat_max_ratio)` →
//! `RandomFlip(0.5)` → normalise → pad to `crop × crop` (image 0 after normalisation, labels 255).
//! Test: `Resize(scale, keep_ratio)`, then sliding windows ([`slide_windows`]).
//!
//! Differences from mmseg, stated: images are resized with Pillow's bilinear filter (antialiased
//! when shrinking) instead of OpenCV's; `PhotoMetricDistortion` is not applied.

use image::RgbImage;
use rand::Rng;

use super::transforms::{
    self, to_chw_normalized, CropBox, Interpolation, IMAGENET_MEAN, IMAGENET_STD,
};

/// Ignore label.
pub const IGNORE: u8 = 255;

/// mmcv `rescale_size` with `keep_ratio`: scale factor `min(long / max(h, w), short / min(h, w))`,
/// new size `int(x * f + 0.5)`. `scale` is `(long, short)`. Returns `(height, width)`.
pub fn rescale_size(h: usize, w: usize, scale: (f64, f64)) -> (usize, usize) {
    let (long, short) = (scale.0.max(scale.1), scale.0.min(scale.1));
    let f = (long / h.max(w) as f64).min(short / h.min(w) as f64);
    let nh = (h as f64 * f + 0.5) as usize;
    let nw = (w as f64 * f + 0.5) as usize;
    (nh.max(1), nw.max(1))
}

/// OpenCV `INTER_NEAREST` resize of a label map (`src = floor(dst * in / out)`), what mmcv uses
/// for segmentation maps.
pub fn resize_labels_nearest(src: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    let xs: Vec<usize> = (0..ow)
        .map(|x| ((x as f64 * w as f64 / ow as f64) as usize).min(w - 1))
        .collect();
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        let yy = ((y as f64 * h as f64 / oh as f64) as usize).min(h - 1);
        out.extend(xs.iter().map(|&x| src[yy * w + x]));
    }
    out
}

/// A crop box `(top, left, height, width)` of `RandomCrop`: offsets uniform in
/// `0..=max(size - crop, 0)`, clipped to the image.
fn random_crop_box(
    h: usize,
    w: usize,
    crop: usize,
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let mh = h.saturating_sub(crop);
    let mw = w.saturating_sub(crop);
    let top = rng.gen_range(0..=mh);
    let left = rng.gen_range(0..=mw);
    (top, left, crop.min(h - top), crop.min(w - left))
}

fn crop_labels(l: &[u8], w: usize, b: (usize, usize, usize, usize)) -> Vec<u8> {
    let (top, left, ch, cw) = b;
    let mut out = Vec::with_capacity(ch * cw);
    for y in top..top + ch {
        out.extend_from_slice(&l[y * w + left..y * w + left + cw]);
    }
    out
}

/// mmseg `RandomCrop` box with `cat_max_ratio`: up to 10 draws until the crop holds more than
/// one (non-ignored) class and none covers `cat_max_ratio` or more of its labelled pixels; the
/// last draw is used if none qualifies.
pub fn cat_max_crop_box(
    labels: &[u8],
    h: usize,
    w: usize,
    crop: usize,
    cat_max_ratio: f64,
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let mut b = random_crop_box(h, w, crop, rng);
    if cat_max_ratio < 1.0 {
        for _ in 0..10 {
            let mut cnt = [0u64; 256];
            for &v in &crop_labels(labels, w, b) {
                cnt[v as usize] += 1;
            }
            cnt[IGNORE as usize] = 0;
            let n_cls = cnt.iter().filter(|&&c| c > 0).count();
            let total: u64 = cnt.iter().sum();
            let max = cnt.iter().copied().max().unwrap_or(0);
            if n_cls > 1 && (max as f64 / total as f64) < cat_max_ratio {
                break;
            }
            b = random_crop_box(h, w, crop, rng);
        }
    }
    b
}

/// Training-pipeline parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainAug {
    /// `(long, short)` target scale at ratio 1 (mmseg: 2048, 512).
    pub scale: (f64, f64),
    /// Ratio range of `RandomResize` (0.5, 2.0).
    pub ratio_range: (f64, f64),
    /// Square crop side (512).
    pub crop: usize,
    /// `cat_max_ratio` of `RandomCrop` (0.75).
    pub cat_max_ratio: f64,
    /// Horizontal flip probability (0.5).
    pub flip: f64,
}

/// One augmented training sample: normalised CHW image `3 × crop × crop` and labels
/// `crop × crop`, padded (image 0, labels 255).
pub fn train_sample(
    img: &RgbImage,
    labels: &[u8],
    aug: &TrainAug,
    rng: &mut impl Rng,
) -> (Vec<f32>, Vec<u8>) {
    let (h, w) = (img.height() as usize, img.width() as usize);
    // RandomResize: mmcv samples the ratio, scales the target, then Resize keeps the ratio.
    let ratio = aug.ratio_range.0 + (aug.ratio_range.1 - aug.ratio_range.0) * rng.gen::<f64>();
    let target = ((aug.scale.0 * ratio).trunc(), (aug.scale.1 * ratio).trunc());
    let (nh, nw) = rescale_size(h, w, target);
    let img = transforms::resize(img, nw as u32, nh as u32, Interpolation::Bilinear);
    let lab = resize_labels_nearest(labels, h, w, nh, nw);
    let b = cat_max_crop_box(&lab, nh, nw, aug.crop, aug.cat_max_ratio, rng);
    let img = transforms::crop(
        &img,
        CropBox {
            top: b.0 as u32,
            left: b.1 as u32,
            height: b.2 as u32,
            width: b.3 as u32,
        },
    );
    let mut lab = crop_labels(&lab, nw, b);
    let (ch, cw) = (b.2, b.3);
    let img = if rng.gen::<f64>() < aug.flip {
        for row in lab.chunks_mut(cw) {
            row.reverse();
        }
        transforms::hflip(&img)
    } else {
        img
    };
    let chw = to_chw_normalized(&img, IMAGENET_MEAN, IMAGENET_STD);
    let c = aug.crop;
    let mut out = vec![0f32; 3 * c * c];
    let mut out_l = vec![IGNORE; c * c];
    for y in 0..ch {
        for k in 0..3 {
            out[k * c * c + y * c..k * c * c + y * c + cw]
                .copy_from_slice(&chw.data[k * ch * cw + y * cw..k * ch * cw + (y + 1) * cw]);
        }
        out_l[y * c..y * c + cw].copy_from_slice(&lab[y * cw..(y + 1) * cw]);
    }
    (out, out_l)
}

/// mmseg `slide_inference` windows over an `h × w` image: `(top, left, height, width)`.
pub fn slide_windows(
    h: usize,
    w: usize,
    crop: usize,
    stride: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let stride = stride.max(1);
    let grids = |n: usize| (n + stride).saturating_sub(crop + 1) / stride + 1;
    let (hg, wg) = (grids(h), grids(w));
    let mut v = Vec::with_capacity(hg * wg);
    for hi in 0..hg {
        for wi in 0..wg {
            let y1 = hi * stride;
            let x1 = wi * stride;
            let y2 = (y1 + crop).min(h);
            let x2 = (x1 + crop).min(w);
            let y1 = y2.saturating_sub(crop);
            let x1 = x2.saturating_sub(crop);
            v.push((y1, x1, y2 - y1, x2 - x1));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rescale_like_mmcv() {
        // ADE val image 512x683 with scale (2048, 512): f = min(2048/683, 512/512) = 1
        assert_eq!(rescale_size(512, 683, (2048.0, 512.0)), (512, 683));
        // 256x341 -> f = min(2048/341, 512/256) = 2 -> 512x682
        assert_eq!(rescale_size(256, 341, (2048.0, 512.0)), (512, 682));
        // very wide: 100x1000 -> f = min(2.048, 5.12) -> 205x2048
        assert_eq!(rescale_size(100, 1000, (2048.0, 512.0)), (205, 2048));
    }

    #[test]
    fn slide_grid_like_mmseg() {
        // h_grids = max(h - crop + stride - 1, 0) // stride + 1
        assert_eq!(slide_windows(512, 683, 512, 341).len(), 2);
        let w = slide_windows(512, 683, 512, 341);
        assert_eq!(w[0], (0, 0, 512, 512));
        assert_eq!(w[1], (0, 171, 512, 512));
        // smaller than the crop: one window, the whole image
        assert_eq!(slide_windows(20, 30, 32, 21), vec![(0, 0, 20, 30)]);
        assert_eq!(slide_windows(32, 32, 32, 21), vec![(0, 0, 32, 32)]);
        assert_eq!(slide_windows(33, 32, 32, 21).len(), 2);
    }

    #[test]
    fn nearest_labels() {
        let src = [0u8, 1, 2, 3];
        // cv2 INTER_NEAREST 1x4 -> 1x2: floor(0*2), floor(1*2) -> [0, 2]
        assert_eq!(resize_labels_nearest(&src, 1, 4, 1, 2), vec![0, 2]);
        assert_eq!(resize_labels_nearest(&src, 2, 2, 4, 4)[..4], [0, 0, 1, 1]);
    }

    #[test]
    fn train_sample_shapes_and_padding() {
        let img = RgbImage::from_fn(20, 10, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let labels: Vec<u8> = (0..200).map(|i| (i % 3) as u8).collect();
        let aug = TrainAug {
            scale: (40.0, 10.0),
            ratio_range: (1.0, 1.0),
            crop: 16,
            cat_max_ratio: 0.75,
            flip: 0.5,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (x, l) = train_sample(&img, &labels, &aug, &mut rng);
        assert_eq!(x.len(), 3 * 16 * 16);
        assert_eq!(l.len(), 16 * 16);
        // the image is 10 rows high: rows 10.. are padding
        assert!(l[10 * 16..].iter().all(|&v| v == IGNORE));
        assert!(x[10 * 16..16 * 16].iter().all(|&v| v == 0.0));
        assert!(l[..10 * 16].iter().all(|&v| v < 3));
    }
}

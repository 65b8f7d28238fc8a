//! Detection inputs from a COCO split: a square `size x size` image plus its instances (boxes,
//! contiguous classes, binary masks at input resolution).
//!
//! * Training: ViTDet's large-scale jitter, scaled down (EVALS.md §2.4): horizontal flip, then
//!   `ResizeScale` (the image is scaled by `min(size * r / h, size * r / w)` with
//!   `r ~ U(scale_range)`, aspect kept, bilinear), then `FixedSizeCrop` (a random `size x size`
//!   window when larger, padding at the bottom / right when smaller). Crowd regions are skipped
//!   (detectron2 ignores them in training). Polygons are transformed, clipped to the visible
//!   window and rasterised with the pycocotools rasteriser; boxes are recomputed from the clipped
//!   polygons (`recompute_boxes`); instances left with an empty mask or a box under one pixel
//!   are dropped.
//! * Evaluation: the longer side is resized to `size` (ResizeShortestEdge with max size), the
//!   image sits at the top-left of the padded square; [`EvalImage::scale`] maps results back.
//!
//! Pixels are normalised with the ImageNet mean / std (the encoder's pretraining statistics);
//! padding is 0 after normalisation (the mean colour).

use image::RgbImage;
use rand::Rng;

use super::coco::{CocoDataset, CocoImage, RleCounts, Segmentation};
use super::transforms::{
    decode_rgb, hflip, resize, Chw, Interpolation, IMAGENET_MEAN, IMAGENET_STD,
};
use super::DataError;
use crate::data::mask::{polygons_to_rle, Rle};

/// One training instance at input resolution.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// `[x1, y1, x2, y2]` in input pixels.
    pub bbox: [f32; 4],
    /// Contiguous class `0..K`.
    pub class: usize,
    /// `size * size` row-major 0/1 mask.
    pub mask: Vec<u8>,
}

/// An augmented training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSample {
    /// Normalised `3 x size x size` image.
    pub image: Chw,
    /// Its instances.
    pub instances: Vec<Instance>,
}

/// An evaluation image.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalImage {
    /// Normalised `3 x size x size` image.
    pub image: Chw,
    /// COCO image id.
    pub image_id: u64,
    /// Original `(width, height)`.
    pub orig: (usize, usize),
    /// Input pixels per original pixel along x and y.
    pub scale: (f32, f32),
    /// `(width, height)` of the resized image inside the square (the rest is padding).
    pub valid: (usize, usize),
}

/// LSJ settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LsjConfig {
    /// Side of the square input.
    pub size: usize,
    /// Range of the scale factor `r`.
    pub scale_range: (f64, f64),
    /// Probability of a horizontal flip.
    pub flip_prob: f64,
}

/// Normalise `img` into the top-left corner of a zero `size x size` CHW buffer (cropping at
/// `(ox, oy)` when it is larger).
fn to_square(img: &RgbImage, size: usize, ox: usize, oy: usize) -> Chw {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * size * size];
    let raw = img.as_raw();
    for y in 0..size.min(h.saturating_sub(oy)) {
        for x in 0..size.min(w.saturating_sub(ox)) {
            let p = ((y + oy) * w + (x + ox)) * 3;
            for c in 0..3 {
                data[(c * size + y) * size + x] =
                    (raw[p + c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }
    Chw {
        channels: 3,
        height: size,
        width: size,
        data,
    }
}

/// Sutherland-Hodgman clipping of a polygon (`(x, y)` points) to `[0, w] x [0, h]`.
pub fn clip_polygon(pts: &[(f64, f64)], w: f64, h: f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = pts.to_vec();
    // (inside test, intersection) per edge: x >= 0, x <= w, y >= 0, y <= h
    for edge in 0..4 {
        if out.is_empty() {
            break;
        }
        let inside = |p: &(f64, f64)| match edge {
            0 => p.0 >= 0.0,
            1 => p.0 <= w,
            2 => p.1 >= 0.0,
            _ => p.1 <= h,
        };
        let cross = |a: &(f64, f64), b: &(f64, f64)| {
            let t = match edge {
                0 => (0.0 - a.0) / (b.0 - a.0),
                1 => (w - a.0) / (b.0 - a.0),
                2 => (0.0 - a.1) / (b.1 - a.1),
                _ => (h - a.1) / (b.1 - a.1),
            };
            (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1))
        };
        let input = std::mem::take(&mut out);
        for i in 0..input.len() {
            let cur = &input[i];
            let prev = &input[(i + input.len() - 1) % input.len()];
            match (inside(prev), inside(cur)) {
                (true, true) => out.push(*cur),
                (true, false) => out.push(cross(prev, cur)),
                (false, true) => {
                    out.push(cross(prev, cur));
                    out.push(*cur);
                }
                (false, false) => {}
            }
        }
    }
    out
}

/// Geometry of one augmentation: flip, per-axis scale, crop offset.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Geometry {
    flip: bool,
    w0: f64,
    sx: f64,
    sy: f64,
    ox: f64,
    oy: f64,
    /// Visible content `(w, h)` in the square.
    vis: (f64, f64),
}

impl Geometry {
    fn map(&self, x: f64, y: f64) -> (f64, f64) {
        let x = if self.flip { self.w0 - x } else { x };
        (x * self.sx - self.ox, y * self.sy - self.oy)
    }
}

fn load_image(ds: &CocoDataset, im: &CocoImage) -> Result<RgbImage, DataError> {
    let path = ds.image_path(im);
    let img = decode_rgb(&path)?;
    if (img.width(), img.height()) != (im.width, im.height) {
        return Err(DataError::image(
            &path,
            format!(
                "is {}x{} but image id {} declares {}x{}",
                img.width(),
                img.height(),
                im.id,
                im.width,
                im.height
            ),
        ));
    }
    Ok(img)
}

fn new_size(w0: usize, h0: usize, scale: f64) -> (usize, usize) {
    (
        ((w0 as f64 * scale).round() as usize).max(1),
        ((h0 as f64 * scale).round() as usize).max(1),
    )
}

/// An augmented training sample of image `image_id` (all draws from `rng`).
pub fn train_sample(
    ds: &CocoDataset,
    image_id: u64,
    cfg: &LsjConfig,
    rng: &mut impl Rng,
) -> Result<TrainSample, DataError> {
    let im = ds.image(image_id).ok_or_else(|| {
        DataError::invalid(
            CocoDataset::annotation_path(&ds.root, &ds.split),
            format!("image id {image_id} is not in the file"),
        )
    })?;
    let mut img = load_image(ds, im)?;
    let (w0, h0) = (im.width as usize, im.height as usize);
    let s = cfg.size;
    let flip = rng.gen::<f64>() < cfg.flip_prob;
    let (lo, hi) = cfg.scale_range;
    let r = if hi > lo { rng.gen_range(lo..hi) } else { lo };
    let scale = (s as f64 * r / h0 as f64).min(s as f64 * r / w0 as f64);
    let (nw, nh) = new_size(w0, h0, scale);
    let ox = if nw > s { rng.gen_range(0..=nw - s) } else { 0 };
    let oy = if nh > s { rng.gen_range(0..=nh - s) } else { 0 };
    if flip {
        img = hflip(&img);
    }
    let resized = resize(&img, nw as u32, nh as u32, Interpolation::Bilinear);
    let image = to_square(&resized, s, ox, oy);
    let g = Geometry {
        flip,
        w0: w0 as f64,
        sx: nw as f64 / w0 as f64,
        sy: nh as f64 / h0 as f64,
        ox: ox as f64,
        oy: oy as f64,
        vis: ((nw - ox).min(s) as f64, (nh - oy).min(s) as f64),
    };
    let mut instances = Vec::new();
    for a in ds.annotations_for(image_id) {
        if a.iscrowd != 0 {
            continue;
        }
        let class = ds.categories.to_contiguous(a.category_id).ok_or_else(|| {
            DataError::invalid(
                CocoDataset::annotation_path(&ds.root, &ds.split),
                format!(
                    "annotation id {} has category_id {} which is not in `categories`",
                    a.id, a.category_id
                ),
            )
        })?;
        let inst = match &a.segmentation {
            Some(Segmentation::Polygons(polys)) => polygon_instance(polys, &g, s, class),
            Some(Segmentation::Rle(rle)) => {
                let counts = match &rle.counts {
                    RleCounts::Uncompressed(c) => Rle::from_uncompressed(h0, w0, c),
                    RleCounts::Compressed(c) => Rle::from_compressed(c, h0, w0),
                };
                let m = counts.map_err(|e| {
                    DataError::invalid(
                        CocoDataset::annotation_path(&ds.root, &ds.split),
                        format!("annotation id {}: {e}", a.id),
                    )
                })?;
                mask_instance(&m.decode_row_major(), (w0, h0), &g, s, class)
            }
            // A box without a mask: the box as a polygon.
            None => {
                let [x, y, bw, bh] = a.bbox;
                let p = vec![x, y, x + bw, y, x + bw, y + bh, x, y + bh];
                polygon_instance(&[p], &g, s, class)
            }
        };
        if let Some(i) = inst {
            instances.push(i);
        }
    }
    Ok(TrainSample { image, instances })
}

fn polygon_instance(polys: &[Vec<f64>], g: &Geometry, s: usize, class: usize) -> Option<Instance> {
    let mut out: Vec<Vec<f64>> = Vec::new();
    let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    for p in polys {
        let pts: Vec<(f64, f64)> = p.chunks_exact(2).map(|c| g.map(c[0], c[1])).collect();
        let pts = clip_polygon(&pts, g.vis.0, g.vis.1);
        if pts.len() < 3 {
            continue;
        }
        for &(x, y) in &pts {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        out.push(pts.iter().flat_map(|&(x, y)| [x, y]).collect());
    }
    if out.is_empty() || x1 - x0 < 1.0 || y1 - y0 < 1.0 {
        return None;
    }
    let rle = polygons_to_rle(&out, s, s).ok()?;
    if rle.area() == 0 {
        return None;
    }
    Some(Instance {
        bbox: [x0 as f32, y0 as f32, x1 as f32, y1 as f32],
        class,
        mask: rle.decode_row_major(),
    })
}

fn mask_instance(
    src: &[u8],
    (w0, h0): (usize, usize),
    g: &Geometry,
    s: usize,
    class: usize,
) -> Option<Instance> {
    let mut mask = vec![0u8; s * s];
    let (vw, vh) = (g.vis.0 as usize, g.vis.1 as usize);
    for y in 0..vh {
        let sy = (((y as f64 + g.oy + 0.5) / g.sy) as usize).min(h0 - 1);
        for x in 0..vw {
            let mut sx = (((x as f64 + g.ox + 0.5) / g.sx) as usize).min(w0 - 1);
            if g.flip {
                sx = w0 - 1 - sx;
            }
            mask[y * s + x] = src[sy * w0 + sx];
        }
    }
    let rle = Rle::encode_row_major(&mask, s, s).ok()?;
    let [x, y, w, h] = rle.to_bbox();
    if rle.area() == 0 || w < 1.0 || h < 1.0 {
        return None;
    }
    Some(Instance {
        bbox: [x as f32, y as f32, (x + w) as f32, (y + h) as f32],
        class,
        mask,
    })
}

/// Image `im` resized (longer side = `size`) into the padded square.
pub fn eval_image(ds: &CocoDataset, im: &CocoImage, size: usize) -> Result<EvalImage, DataError> {
    let img = load_image(ds, im)?;
    let (w0, h0) = (im.width as usize, im.height as usize);
    let scale = size as f64 / w0.max(h0) as f64;
    let (nw, nh) = new_size(w0, h0, scale);
    let (nw, nh) = (nw.min(size), nh.min(size));
    let resized = resize(&img, nw as u32, nh as u32, Interpolation::Bilinear);
    Ok(EvalImage {
        image: to_square(&resized, size, 0, 0),
        image_id: im.id,
        orig: (w0, h0),
        scale: (nw as f32 / w0 as f32, nh as f32 / h0 as f32),
        valid: (nw, nh),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_a_polygon() {
        let sq = [(-5.0, -5.0), (5.0, -5.0), (5.0, 5.0), (-5.0, 5.0)];
        let c = clip_polygon(&sq, 10.0, 10.0);
        let (mut x0, mut x1) = (f64::MAX, f64::MIN);
        for p in &c {
            x0 = x0.min(p.0);
            x1 = x1.max(p.0);
            assert!(p.0 >= 0.0 && p.1 >= 0.0 && p.0 <= 10.0 && p.1 <= 10.0);
        }
        assert_eq!((x0, x1), (0.0, 5.0));
        assert!(clip_polygon(&[(20.0, 20.0), (30.0, 20.0), (25.0, 30.0)], 10.0, 10.0).is_empty());
    }

    #[test]
    fn geometry_flips_scales_and_crops() {
        let g = Geometry {
            flip: true,
            w0: 100.0,
            sx: 0.5,
            sy: 0.25,
            ox: 10.0,
            oy: 2.0,
            vis: (40.0, 23.0),
        };
        assert_eq!(
            g.map(30.0, 40.0),
            ((100.0 - 30.0) * 0.5 - 10.0, 40.0 * 0.25 - 2.0)
        );
        // flipped x: 80..90 -> 10..20 -> scaled 5..10 -> cropped -5..0: nothing visible
        let poly = vec![90.0, 20.0, 80.0, 20.0, 80.0, 60.0, 90.0, 60.0];
        assert!(polygon_instance(&[poly], &g, 48, 3).is_none());
        let g2 = Geometry { flip: false, ..g };
        let inst = polygon_instance(
            &[vec![40.0, 20.0, 80.0, 20.0, 80.0, 60.0, 40.0, 60.0]],
            &g2,
            48,
            3,
        )
        .unwrap();
        assert_eq!(inst.bbox, [10.0, 3.0, 30.0, 13.0]);
        assert_eq!(inst.class, 3);
        let area: usize = inst.mask.iter().map(|&v| v as usize).sum();
        assert!((180..=220).contains(&area), "{area}");
    }
}

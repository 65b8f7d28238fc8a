//! Image decoding and the standard torchvision preprocessing (EVALS.md §1.2), on 8-bit RGB
//! images, ending in a normalised `f32` CHW buffer.
//!
//! Resampling and the pixel crop are Pillow's, byte for byte ([`super::resample`], re-exported
//! here). RandomResizedCrop follows torchvision's 10-attempt algorithm with the central-crop
//! fallback; rounding uses Python's round-half-to-even where torchvision calls `round`.

use std::path::Path;

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::jpeg::{self, Decode};
pub use super::resample::{crop, resize, resize_bicubic, resize_box, CropBox, Interpolation};
use super::DataError;

/// ImageNet channel means (RGB).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A `f32` image in CHW order.
#[derive(Debug, Clone, PartialEq)]
pub struct Chw {
    /// Channels (3).
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// `channels * height * width` values, channel-major.
    pub data: Vec<f32>,
}

impl Chw {
    /// `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// Decode a JPEG/PNG file to 8-bit RGB (alpha dropped, gray replicated, palette expanded), like
/// PIL's `convert("RGB")`.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::image(path, format!("cannot open: {e}")))?
        .with_guessed_format()
        .map_err(|e| DataError::image(path, format!("cannot read: {e}")))?;
    let img = reader.decode().map_err(|e| {
        DataError::image(
            path,
            format!("cannot decode: {e}; re-download or regenerate it"),
        )
    })?;
    Ok(img.to_rgb8())
}

fn decode_rgb_named(bytes: &[u8], path: &Path) -> Result<RgbImage, DataError> {
    let img = image::load_from_memory(bytes).map_err(|e| {
        DataError::image(
            path,
            format!("cannot decode: {e}; re-download or regenerate it"),
        )
    })?;
    Ok(img.to_rgb8())
}

/// Decode an in-memory JPEG/PNG to 8-bit RGB; `name` is only used in error messages.
pub fn decode_rgb_bytes(bytes: &[u8], name: &str) -> Result<RgbImage, DataError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| DataError::image(name, format!("cannot decode: {e}")))?;
    Ok(img.to_rgb8())
}

// ----------------------------------------------------------------------------------------------
// Geometric ops.

/// Mirror left-right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// Flip with probability `p` (one `f64` draw, like `torch.rand(1) < p`).
pub fn random_hflip(img: RgbImage, p: f64, rng: &mut impl Rng) -> RgbImage {
    if rng.gen::<f64>() < p {
        hflip(&img)
    } else {
        img
    }
}

/// torchvision `Resize(size)` with an int: shorter side -> `size`, longer side
/// `int(size * long / short)`, bicubic.
pub fn resize_shorter(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == 0 {
        return img.clone();
    }
    let new_long = (size as u64 * long as u64) as f64 / short as f64;
    let new_long = new_long as u32;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    resize_bicubic(img, nw, nh)
}

/// torchvision `CenterCrop((h, w))`: zero-pads when the image is smaller, offsets rounded half
/// to even like Python's `round`.
pub fn center_crop(img: &RgbImage, crop_w: u32, crop_h: u32) -> RgbImage {
    let mut img = img.clone();
    let (w, h) = (img.width(), img.height());
    if crop_w > w || crop_h > h {
        let pl = if crop_w > w { (crop_w - w) / 2 } else { 0 };
        let pt = if crop_h > h { (crop_h - h) / 2 } else { 0 };
        let pr = if crop_w > w {
            (crop_w - w).div_ceil(2)
        } else {
            0
        };
        let pb = if crop_h > h {
            (crop_h - h).div_ceil(2)
        } else {
            0
        };
        let mut padded = RgbImage::new(w + pl + pr, h + pt + pb);
        image::imageops::replace(&mut padded, &img, pl as i64, pt as i64);
        img = padded;
    }
    let (w, h) = (img.width(), img.height());
    let top = ((h - crop_h) as f64 / 2.0).round_ties_even() as u32;
    let left = ((w - crop_w) as f64 / 2.0).round_ties_even() as u32;
    crop(
        &img,
        CropBox {
            top,
            left,
            height: crop_h,
            width: crop_w,
        },
    )
}

/// torchvision `RandomResizedCrop` parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomResizedCrop {
    /// Output side (square).
    pub size: u32,
    /// Range of the crop area as a fraction of the image area.
    pub scale: (f64, f64),
    /// Range of the crop aspect ratio (w/h), sampled log-uniformly.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// `RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3))`.
    pub fn new(size: u32) -> Self {
        RandomResizedCrop {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// torchvision `get_params`: 10 attempts, then the central-crop fallback.
    pub fn get_params(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropBox {
        let area = width as f64 * height as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area =
                area * (self.scale.0 + (self.scale.1 - self.scale.0) * rng.gen::<f64>());
            let aspect = (lr0 + (lr1 - lr0) * rng.gen::<f64>()).exp();
            let w = (target_area * aspect).sqrt().round_ties_even() as i64;
            let h = (target_area / aspect).sqrt().round_ties_even() as i64;
            if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
                let top = rng.gen_range(0..=(height as i64 - h)) as u32;
                let left = rng.gen_range(0..=(width as i64 - w)) as u32;
                return CropBox {
                    top,
                    left,
                    height: h as u32,
                    width: w as u32,
                };
            }
        }
        let in_ratio = width as f64 / height.max(1) as f64;
        let (rmin, rmax) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let (w, h) = if in_ratio < rmin {
            (
                width,
                ((width as f64 / rmin).round_ties_even() as u32).min(height),
            )
        } else if in_ratio > rmax {
            (
                ((height as f64 * rmax).round_ties_even() as u32).min(width),
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }

    /// Sample a box, crop, resize to `size x size` (bicubic).
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let b = self.get_params(img.width(), img.height(), rng);
        crop_resize(img, b, self.size)
    }
}

/// Crop `b` and resize to `size x size` (bicubic): the tail of [`RandomResizedCrop::apply`].
fn crop_resize(img: &RgbImage, b: CropBox, size: u32) -> RgbImage {
    resize_bicubic(&crop(img, b), size, size)
}

/// ToTensor (`/255`) + Normalize, to CHW `f32`.
pub fn to_chw_normalized(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Chw {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    // One 256-entry table per channel: the same f32 expression per byte value, so the result is
    // bit-identical to computing it per pixel, without a division per element.
    let lut: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    let mut data = vec![0f32; 3 * h * w];
    let (r, rest) = data.split_at_mut(h * w);
    let (g, b) = rest.split_at_mut(h * w);
    for (i, px) in raw.chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
    Chw {
        channels: 3,
        height: h,
        width: w,
        data,
    }
}

/// ToTensor only (`/255`), to CHW `f32` in `[0, 1]`.
pub fn to_chw(img: &RgbImage) -> Chw {
    to_chw_normalized(img, [0.0; 3], [1.0; 3])
}

/// A complete preprocessing pipeline, serialisable into configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Transform {
    /// RandomResizedCrop (bicubic) -> RandomHorizontalFlip(hflip) -> ToTensor -> Normalize.
    RandomResizedCrop {
        /// Crop parameters.
        rrc: RandomResizedCrop,
        /// Flip probability.
        hflip: f64,
        /// Normalisation mean.
        mean: [f32; 3],
        /// Normalisation std.
        std: [f32; 3],
    },
    /// Resize shorter side (bicubic) -> CenterCrop -> ToTensor -> Normalize.
    ResizeCenterCrop {
        /// Shorter side after resizing.
        resize: u32,
        /// Square crop side.
        crop: u32,
        /// Normalisation mean.
        mean: [f32; 3],
        /// Normalisation std.
        std: [f32; 3],
    },
    /// Resize to exactly `size x size` (aspect not kept, VISSL CLEVR) -> flip(hflip) -> Normalize.
    Resize {
        /// Output side.
        size: u32,
        /// Filter (torchvision's `Resize` default is bilinear).
        #[serde(default)]
        interpolation: Interpolation,
        /// Flip probability (0 for eval).
        hflip: f64,
        /// Normalisation mean.
        mean: [f32; 3],
        /// Normalisation std.
        std: [f32; 3],
    },
}

impl Transform {
    /// Linear-probe train transform: RRC(size, (0.08, 1), (3/4, 4/3)), flip 0.5, ImageNet norm.
    pub fn imagenet_train(size: u32) -> Self {
        Transform::RandomResizedCrop {
            rrc: RandomResizedCrop::new(size),
            hflip: 0.5,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Eval transform: resize shorter side to `size * 256 / 224` (MAE crop_pct 0.875), centre crop.
    pub fn imagenet_eval(size: u32) -> Self {
        Transform::ResizeCenterCrop {
            resize: size * 256 / 224,
            crop: size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// VISSL CLEVR: `Resize((size, size))` (torchvision default: bilinear), flip 0.5 when
    /// `train`, ImageNet norm.
    pub fn clevr(size: u32, train: bool) -> Self {
        Transform::Resize {
            size,
            interpolation: Interpolation::Bilinear,
            hflip: if train { 0.5 } else { 0.0 },
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Output `(height, width)`.
    pub fn output_hw(&self) -> (u32, u32) {
        match self {
            Transform::RandomResizedCrop { rrc, .. } => (rrc.size, rrc.size),
            Transform::ResizeCenterCrop { crop, .. } => (*crop, *crop),
            Transform::Resize { size, .. } => (*size, *size),
        }
    }

    /// Read and decode the image file `path`, then [`Transform::apply`]. With
    /// [`Decode::Scaled`] a RandomResizedCrop of a JPEG decodes only the crop's region at the
    /// smallest DCT scale that keeps it at least `size` pixels on each side
    /// ([`jpeg::draft_scale`]), then resamples it with Pillow's filter: the same random draws,
    /// and pixels within a few units of the exact path. Other transforms and files decode
    /// exactly.
    pub fn load(&self, path: &Path, decode: Decode, rng: &mut impl Rng) -> Result<Chw, DataError> {
        let Transform::RandomResizedCrop {
            rrc,
            hflip,
            mean,
            std,
        } = self
        else {
            return Ok(self.apply(&decode_rgb(path)?, rng));
        };
        if decode == Decode::Exact {
            return Ok(self.apply(&decode_rgb(path)?, rng));
        }
        let bytes = jpeg::read(path)?;
        if !jpeg::is_jpeg(&bytes) {
            return Ok(self.apply(&decode_rgb_named(&bytes, path)?, rng));
        }
        let name = path.to_string_lossy();
        let dims = jpeg::jpeg_size(&bytes, &name)?;
        let b = rrc.get_params(dims.0, dims.1, rng);
        let a = jpeg::draft_scale(b.width, b.height, rrc.size, rrc.size);
        let out = match jpeg::decode_region(&bytes, &name, dims, b, a)? {
            Some(r) => resize_box(
                &r.image,
                r.bbox,
                r.lo,
                r.hi,
                rrc.size,
                rrc.size,
                Interpolation::Bicubic,
            ),
            // A colour space libjpeg does not turn into RGB (CMYK): the exact decoder.
            None => crop_resize(&decode_rgb_named(&bytes, path)?, b, rrc.size),
        };
        let out = random_hflip(out, *hflip, rng);
        Ok(to_chw_normalized(&out, *mean, *std))
    }

    /// Apply to a decoded image. Random draws happen in torchvision order (crop, then flip).
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> Chw {
        match self {
            Transform::RandomResizedCrop {
                rrc,
                hflip,
                mean,
                std,
            } => {
                let out = random_hflip(rrc.apply(img, rng), *hflip, rng);
                to_chw_normalized(&out, *mean, *std)
            }
            Transform::ResizeCenterCrop {
                resize,
                crop,
                mean,
                std,
            } => {
                let out = center_crop(&resize_shorter(img, *resize), *crop, *crop);
                to_chw_normalized(&out, *mean, *std)
            }
            Transform::Resize {
                size,
                interpolation,
                hflip,
                mean,
                std,
            } => {
                let mut out = resize(img, *size, *size, *interpolation);
                if *hflip > 0.0 {
                    out = random_hflip(out, *hflip, rng);
                }
                to_chw_normalized(&out, *mean, *std)
            }
        }
    }
}

#[cfg(test)]
mod tests;

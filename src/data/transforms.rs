//! Image decoding and the standard torchvision preprocessing (EVALS.md §1.2), on 8-bit RGB
//! images, ending in a normalised `f32` CHW buffer.
//!
//! Resampling is a port of Pillow's `ImagingResample` for 8-bit images (what torchvision's PIL
//! path uses): separable two-pass convolution with the bicubic kernel `a = -0.5` (or the
//! bilinear triangle), support scaled by the downscale factor (antialiasing), coefficients
//! normalised and converted to 22-bit fixed point, rounding and clipping to `u8` after each
//! pass, Pillow 13's pass order. Unit tests compare bytes with Pillow 13.0 output. RandomResizedCrop follows torchvision's 10-attempt algorithm with the
//! central-crop fallback; rounding uses Python's round-half-to-even where torchvision calls `round`.

use std::path::Path;

use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::jpeg::{self, Decode};
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
// Pillow-exact resampling (8-bit path of `ImagingResample`).

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Resampling filter, as Pillow defines it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Triangle filter, support 1 (torchvision's default `Resize` interpolation).
    Bilinear,
    /// Cubic convolution `a = -0.5`, support 2 (what MAE / I-JEPA transforms ask for).
    #[default]
    Bicubic,
}

impl Interpolation {
    fn support(self) -> f64 {
        match self {
            Interpolation::Bilinear => 1.0,
            Interpolation::Bicubic => 2.0,
        }
    }

    fn filter(self, x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        match self {
            Interpolation::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Interpolation::Bicubic => {
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Per output pixel: first input index, number of taps, fixed-point weights (`ksize` each).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    k: Vec<i32>,
}

/// Pillow's `precompute_coeffs` for the input span `in0..in1` (fractional, relative to `lo`),
/// with the taps clamped to the pixels `lo..hi` instead of `0..in_size`. With `lo = 0`,
/// `hi = in_size`, `in0 = 0`, `in1 = in_size` this is Pillow's own computation; with `in0 = 0`,
/// `in1 = hi - lo` it is that of the crop `lo..hi`. Bounds are absolute (`lo` added).
fn precompute_coeffs_box(
    lo: usize,
    hi: usize,
    in0: f64,
    in1: f64,
    out_size: usize,
    interp: Interpolation,
) -> Coeffs {
    let in_size = hi - lo;
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = interp.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut pre = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, p) in pre.iter_mut().enumerate().take(n) {
            let w = interp.filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *p = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < n && ww != 0.0 {
                pre[x] / ww
            } else if x < n {
                pre[x]
            } else {
                0.0
            };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((lo + xmin, n));
    }
    Coeffs { bounds, ksize, k }
}

/// The rounding offset every accumulator starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize to exactly `out_w x out_h` with Pillow's antialiased bicubic filter.
pub fn resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    resize(img, out_w, out_h, Interpolation::Bicubic)
}

/// Resize to exactly `out_w x out_h` like Pillow's `Image.resize(size, filter)` (antialiased:
/// the filter support grows with the downscale factor). Pass order as Pillow 13: vertical first
/// when the height shrinks by more than twice as many pixels as the width, else horizontal first
/// (Pillow before that change always went horizontal first; results differ by at most 1 on a
/// few pixels in the vertical-first case).
pub fn resize(img: &RgbImage, out_w: u32, out_h: u32, interp: Interpolation) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    resize_span(img, [0.0, 0.0, w, h], out_w, out_h, interp)
}

/// Resample the part `bbox` (left, top, right, bottom, fractional pixel edges) of `img` to
/// `out_w x out_h` with Pillow's filter, the taps clamped to columns `lo[0]..hi[0]` and rows
/// `lo[1]..hi[1]` (the pixels the box touches). With an integer box and `lo`, `hi` its edges this
/// is `resize(&crop(img, box), ..)`, byte for byte; with a fractional box (a crop mapped into a
/// DCT-downscaled image) it is the same crop resampled from fewer pixels.
pub fn resize_box(
    img: &RgbImage,
    bbox: [f64; 4],
    lo: [u32; 2],
    hi: [u32; 2],
    out_w: u32,
    out_h: u32,
    interp: Interpolation,
) -> RgbImage {
    let lo = [lo[0].min(img.width()), lo[1].min(img.height())];
    let hi = [
        hi[0].clamp(lo[0], img.width()),
        hi[1].clamp(lo[1], img.height()),
    ];
    let sub = crop(
        img,
        CropBox {
            top: lo[1],
            left: lo[0],
            height: hi[1] - lo[1],
            width: hi[0] - lo[0],
        },
    );
    let (x, y) = (lo[0] as f64, lo[1] as f64);
    resize_span(
        &sub,
        [bbox[0] - x, bbox[1] - y, bbox[2] - x, bbox[3] - y],
        out_w,
        out_h,
        interp,
    )
}

/// [`resize`] of the span `s` (left, top, right, bottom) of `img`, taps clamped to the image.
fn resize_span(
    img: &RgbImage,
    s: [f64; 4],
    out_w: u32,
    out_h: u32,
    interp: Interpolation,
) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (out_w.max(1) as usize, out_h.max(1) as usize);
    let full_x = s[0] == 0.0 && s[2] == w as f64;
    let full_y = s[1] == 0.0 && s[3] == h as f64;
    if ((w, h) == (ow, oh) && full_x && full_y) || w == 0 || h == 0 {
        return img.clone();
    }
    let need_h = ow != w || !full_x;
    let need_v = oh != h || !full_y;
    let coeffs_x = || precompute_coeffs_box(0, w, s[0], s[2], ow, interp);
    let coeffs_y = || precompute_coeffs_box(0, h, s[1], s[3], oh, interp);
    let src = img.as_raw();
    let dh = h as i64 - oh as i64;
    let dw = w as i64 - ow as i64;
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let out = if horizontal_first {
        let cv = need_v.then(coeffs_y);
        let (tmp, row0) = if need_h {
            // Only the source rows the vertical pass reads.
            let (first, last) = match &cv {
                Some(c) => (
                    c.bounds[0].0,
                    c.bounds.iter().map(|&(a, n)| a + n).max().unwrap_or(h),
                ),
                None => (0, h),
            };
            (
                pass_horizontal(&src[first * w * 3..last * w * 3], w, &coeffs_x()),
                first,
            )
        } else {
            (src.to_vec(), 0)
        };
        match &cv {
            Some(c) => pass_vertical(&tmp, ow, c, row0),
            None => tmp,
        }
    } else {
        let tmp = if need_v {
            pass_vertical(src, w, &coeffs_y(), 0)
        } else {
            src.to_vec()
        };
        if need_h {
            pass_horizontal(&tmp, w, &coeffs_x())
        } else {
            tmp
        }
    };
    RgbImage::from_raw(ow as u32, oh as u32, out).unwrap_or_else(|| img.clone())
}

/// Horizontal pass over `src` (rows of `w` RGB pixels) to `c.bounds.len()` columns. Pillow's
/// 32-bit integer accumulators (the sums cannot overflow: |weights| sum to < 2 in 22-bit fixed
/// point). Computed as the vertical pass of the transposed rows (the same integer sums, so the
/// same bytes), whose inner loop runs over contiguous bytes and vectorises.
fn pass_horizontal(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    let rows = src.len() / (w * 3);
    let ow = c.bounds.len();
    let t = transpose_rgb(src, w, rows);
    let out_t = pass_vertical(&t, rows, c, 0);
    transpose_rgb(&out_t, rows, ow)
}

/// Transpose `h` rows of `w` RGB pixels into `w` rows of `h` pixels (in tiles, for the cache).
fn transpose_rgb(src: &[u8], w: usize, h: usize) -> Vec<u8> {
    const T: usize = 16;
    let mut out = vec![0u8; w * h * 3];
    for y0 in (0..h).step_by(T) {
        for x0 in (0..w).step_by(T) {
            for y in y0..(y0 + T).min(h) {
                for x in x0..(x0 + T).min(w) {
                    let s = (y * w + x) * 3;
                    let d = (x * h + y) * 3;
                    out[d..d + 3].copy_from_slice(&src[s..s + 3]);
                }
            }
        }
    }
    out
}

/// Vertical pass over `src` (rows of `w` RGB pixels, first row = source row `row0`): whole rows
/// at a time, so the inner loop is a multiply-add over contiguous bytes (AVX2 when the CPU has
/// it: the same integer arithmetic, so the same bytes).
fn pass_vertical(src: &[u8], w: usize, c: &Coeffs, row0: usize) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { pass_vertical_avx2(src, w, c, row0) };
        }
    }
    pass_vertical_impl(src, w, c, row0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pass_vertical_avx2(src: &[u8], w: usize, c: &Coeffs, row0: usize) -> Vec<u8> {
    pass_vertical_impl(src, w, c, row0)
}

#[inline(always)]
fn pass_vertical_impl(src: &[u8], w: usize, c: &Coeffs, row0: usize) -> Vec<u8> {
    let oh = c.bounds.len();
    let rw = w * 3;
    let mut out = vec![0u8; rw * oh];
    let mut acc = vec![0i32; rw];
    for (yy, orow) in out.chunks_exact_mut(rw).enumerate() {
        let (ymin, n) = c.bounds[yy];
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        acc.fill(HALF);
        for (y, &ky) in k.iter().enumerate() {
            let off = (y + ymin - row0) * rw;
            for (a, &p) in acc.iter_mut().zip(&src[off..off + rw]) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

// ----------------------------------------------------------------------------------------------
// Geometric ops.

/// A crop rectangle in pixels (torchvision order: top, left, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// Crop (the box must lie inside the image; it is clamped otherwise).
pub fn crop(img: &RgbImage, b: CropBox) -> RgbImage {
    let left = b.left.min(img.width());
    let top = b.top.min(img.height());
    let w = b.width.min(img.width() - left);
    let h = b.height.min(img.height() - top);
    image::imageops::crop_imm(img, left, top, w, h).to_image()
}

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
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = |c: u32| ((x * 37 + y * 91 + c * 53 + x * y * 7) % 256) as u8;
            image::Rgb([v(0), v(1), v(2)])
        })
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Expected bytes produced by Pillow 13.0 `Image.resize(size, Image.BICUBIC / BILINEAR)`.
    #[test]
    fn bicubic_matches_pillow() {
        let img = pattern(13, 9);
        let cases = [
            ((5, 4), "65828f7a87937b7d86707e8b7693737e8580908c868b827a808181899191709a7a80806e92897e7d84698c688283669685758c777a7d7f7c8681619c"),
            ((13, 4), "497e817376b26aa76a9c5e97538bc080b559aa4e834378b06da567995c99518d918285547aaf81619678967d738176a582a86aac6fa473a85eac6297659c5d9c618f659389978e6f9273b077b48177b48158867c9b9077559355a75a8f6ea359bf6da282a8694c7d6c9a8076947b498f659a795e8f8f5e968447836aa7aa98669f8a4f8473a84c656fa492558d7bb04d6d70ad945e968153887679ae"),
            ((6, 9), "174c8164a1d8bcaf6e423569508db8a5da2f7db8c1a76a46335fa59cc8af915454437eb9b677404b74b4b5aa695b508b91ba978e4f573671acb8b77b7d6b94a492525857979ed9a3a1aa6b7f6387a8a36476719ab69a5e6f78b2609c6b8b8b5780668f6ead766385638e4f5760959e5b9876a296669881649569699867a3935a8f7a679c795f9489598e88669b6f77ac855489a774ab659058649c7f6c8e8e874883"),
            ((3, 2), "7a88878382837d89817f7f8384817a847285"),
        ];
        for ((w, h), want) in cases {
            assert_eq!(resize_bicubic(&img, w, h).as_raw(), &hex(want), "{w}x{h}");
        }
        let up = resize_bicubic(&img, 17, 11);
        assert_eq!(
            &up.as_raw()[..24],
            &hex("002f6412477b30649e4d83c268a7dd8cc4ffabef9accca14")[..]
        );
        let bilinear = [
            ((5, 4), "6a838f7887927e7c867382897790767b86828c8d848d807e7f817f87909073937a80827190867f7c846d8a6a8083699284758a7a7980807c84816499"),
            ((3, 2), "7a88868382837d87817d818384807c847484"),
        ];
        for ((w, h), want) in bilinear {
            assert_eq!(
                resize(&img, w, h, Interpolation::Bilinear).as_raw(),
                &hex(want),
                "bilinear {w}x{h}"
            );
        }
        // Width grows, height shrinks: Pillow 13 runs the vertical pass first.
        let wide = resize(&img, 20, 3, Interpolation::Bilinear);
        assert_eq!(&wide.as_raw()[..12], &hex("52877c687e927e7ba4719882")[..]);
        let two = RgbImage::from_raw(2, 1, vec![0, 0, 0, 255, 255, 255]).unwrap();
        assert_eq!(resize_bicubic(&two, 1, 1).as_raw(), &vec![128, 128, 128]);
    }

    /// FNV-1a 64 of Pillow 13.0 `Image.resize` output bytes for a 37x29 test image.
    #[test]
    fn resize_hashes_match_pillow() {
        let img = RgbImage::from_fn(37, 29, |x, y| {
            let v = |c: u32| {
                ((x * 37 + y * 91 + c * 53 + x * y * 7 + (x * x * 3 + y * y * 5) % 17) % 256) as u8
            };
            image::Rgb([v(0), v(1), v(2)])
        });
        let fnv = |b: &[u8]| {
            b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
                (h ^ x as u64).wrapping_mul(0x100000001b3)
            })
        };
        let cases = [
            ((7, 5), Interpolation::Bicubic, 0x566335e883276aebu64),
            ((36, 28), Interpolation::Bicubic, 0xf57767f1fcdaf989),
            ((38, 30), Interpolation::Bicubic, 0x08e154a384bfc83e),
            ((74, 10), Interpolation::Bicubic, 0xe001336f5335f831),
            ((10, 74), Interpolation::Bicubic, 0xbfda0e55b1959dcb),
            ((16, 16), Interpolation::Bicubic, 0x422d26a5b5a05130),
            ((224, 224), Interpolation::Bicubic, 0x88953092191379a8),
            ((1, 1), Interpolation::Bicubic, 0xab5d5d197390205b),
            ((37, 3), Interpolation::Bicubic, 0xde2364183d746680),
            ((3, 29), Interpolation::Bicubic, 0xbffbd3621e3b4f45),
            ((50, 20), Interpolation::Bicubic, 0x6d367fcd6c3f3d90),
            ((20, 50), Interpolation::Bicubic, 0x6cfda20d7bb27551),
            ((36, 10), Interpolation::Bicubic, 0xbda912535630db33),
            ((12, 27), Interpolation::Bicubic, 0xc9b8fac277206f9c),
            ((7, 5), Interpolation::Bilinear, 0x473e432de68a65d3),
            ((36, 28), Interpolation::Bilinear, 0xaa9a7bb5475687f0),
            ((38, 30), Interpolation::Bilinear, 0xf48eb0980b937f82),
            ((74, 10), Interpolation::Bilinear, 0xa10582e37cef3b17),
            ((10, 74), Interpolation::Bilinear, 0xcb7d314efd277398),
            ((16, 16), Interpolation::Bilinear, 0x056fcdf7551a0719),
            ((224, 224), Interpolation::Bilinear, 0x7ca971a133ec8442),
            ((1, 1), Interpolation::Bilinear, 0xab5d5d197390205b),
            ((37, 3), Interpolation::Bilinear, 0xf82f1c110a76aef5),
            ((3, 29), Interpolation::Bilinear, 0x6e8ddb753b908a72),
            ((50, 20), Interpolation::Bilinear, 0x9a3f56012a5ee9d2),
            ((20, 50), Interpolation::Bilinear, 0xb40ba08b33d436a0),
            ((36, 10), Interpolation::Bilinear, 0xd6607d284ddf3b14),
            ((12, 27), Interpolation::Bilinear, 0x64a4af3defc87a0d),
        ];
        for ((w, h), f, want) in cases {
            assert_eq!(fnv(resize(&img, w, h, f).as_raw()), want, "{f:?} {w}x{h}");
        }
    }

    #[test]
    fn flip_twice_is_identity() {
        let img = pattern(7, 5);
        assert_ne!(hflip(&img), img);
        assert_eq!(hflip(&hflip(&img)), img);
        assert_eq!(hflip(&img).get_pixel(0, 0), img.get_pixel(6, 0));
    }

    #[test]
    fn resize_shorter_and_center_crop_sizes() {
        let img = pattern(100, 80);
        let r = resize_shorter(&img, 73);
        assert_eq!((r.width(), r.height()), (91, 73));
        let c = center_crop(&r, 64, 64);
        assert_eq!((c.width(), c.height()), (64, 64));
        // (5 - 2) / 2 = 1.5 rounds half to even -> 2, as Python's round.
        let small = pattern(5, 5);
        let c = center_crop(&small, 2, 2);
        assert_eq!(c.get_pixel(0, 0), small.get_pixel(2, 2));
        // Padding when the crop is larger than the image.
        let p = center_crop(&pattern(3, 3), 5, 4);
        assert_eq!((p.width(), p.height()), (5, 4));
        assert_eq!(p.get_pixel(0, 0), &image::Rgb([0, 0, 0]));
        let t = Transform::imagenet_eval(64);
        let out = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!(out.shape(), [3, 64, 64]);
    }

    #[test]
    fn normalize_values() {
        let img = RgbImage::from_raw(2, 1, vec![255, 0, 128, 0, 255, 64]).unwrap();
        let chw = to_chw_normalized(&img, IMAGENET_MEAN, IMAGENET_STD);
        assert_eq!(chw.shape(), [3, 1, 2]);
        let want = |v: f32, c: usize| (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        assert_eq!(
            chw.data,
            vec![
                want(255.0, 0),
                want(0.0, 0),
                want(0.0, 1),
                want(255.0, 1),
                want(128.0, 2),
                want(64.0, 2)
            ]
        );
        assert!((chw.data[0] - 2.2489083).abs() < 1e-6);
    }

    #[test]
    fn random_resized_crop_params() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let rrc = RandomResizedCrop::new(32);
        for _ in 0..200 {
            let b = rrc.get_params(50, 40, &mut rng);
            assert!(
                b.width > 0 && b.height > 0 && b.left + b.width <= 50 && b.top + b.height <= 40
            );
        }
        let full = RandomResizedCrop {
            size: 8,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
        };
        assert_eq!(
            full.get_params(20, 20, &mut rng),
            CropBox {
                top: 0,
                left: 0,
                height: 20,
                width: 20
            }
        );
        // Impossible request -> central-crop fallback.
        assert_eq!(
            full.get_params(100, 1, &mut rng),
            CropBox {
                top: 0,
                left: 49,
                height: 1,
                width: 1
            }
        );
        let t = Transform::imagenet_train(16);
        let img = pattern(40, 30);
        let a = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(9));
        let b = t.apply(&img, &mut ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, b);
        assert_eq!(a.shape(), [3, 16, 16]);
    }
}

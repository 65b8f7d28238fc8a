//! Pillow-exact resampling of 8-bit RGB images: a port of Pillow's `ImagingResample` (what
//! torchvision's PIL path uses), separable two-pass convolution with the bicubic kernel
//! `a = -0.5` (or the bilinear triangle), support scaled by the downscale factor (antialiasing),
//! coefficients normalised and converted to 22-bit fixed point, rounding and clipping to `u8`
//! after each pass, Pillow 13's pass order; and the pixel crop it resamples from. The unit tests
//! of [`super::transforms`] compare bytes with Pillow 13.0 output.

use image::RgbImage;
use serde::{Deserialize, Serialize};

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

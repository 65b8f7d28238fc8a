//! JPEG decoding for the loader's `decode: scaled` mode: only the rows and (whole-iMCU) columns
//! that a crop needs, at 1/1, 1/2, 1/4 or 1/8 scale in the DCT domain (what Pillow's `draft` and
//! DALI's ROI decoder do), with libjpeg-turbo (the system library, through `csrc/jpeg_region.c`),
//! the decoder Pillow ships.
//!
//! The scale follows Pillow's `draft(mode, size)`: the largest reduction `1/a`, `a` in 8, 4, 2, 1,
//! with `a <= min(crop_w / out_w, crop_h / out_h)` (integer division), so the scaled crop still
//! covers the output size. The crop box is then mapped into the scaled image with fractional
//! edges, and [`super::transforms::resize_box`] resamples it with Pillow's filter clamped to the
//! crop. At scale 1 this is the exact crop + resize of the decoded pixels. libjpeg-turbo's pixels
//! are Pillow's, byte for byte; the exact path's decoder (zune-jpeg, through the `image` crate)
//! differs from them by a few units on some pixels.

use std::os::raw::{c_char, c_int, c_uint, c_ulong};
use std::path::Path;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::transforms::CropBox;
use super::DataError;

/// How training images are decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decode {
    /// Decode the whole image at full size, then crop and resize (torchvision's PIL path).
    #[default]
    Exact,
    /// Decode only the crop's region, at the smallest DCT scale that keeps the crop at least as
    /// large as the output (JPEG only; other files take the exact path).
    Scaled,
}

impl Decode {
    /// True for the default (`exact`), which is left out of serialised params.
    pub fn is_exact(&self) -> bool {
        *self == Decode::Exact
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Decode::Exact => "exact",
            Decode::Scaled => "scaled",
        }
    }
}

impl std::str::FromStr for Decode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Decode::Exact),
            "scaled" => Ok(Decode::Scaled),
            _ => Err(format!(
                "unknown decode mode `{s}`; use `exact` or `scaled`"
            )),
        }
    }
}

extern "C" {
    fn cj_jpeg_size(
        buf: *const u8,
        len: c_ulong,
        w: *mut c_uint,
        h: *mut c_uint,
        msg: *mut c_char,
        msg_len: usize,
    ) -> c_int;
    fn cj_jpeg_decode_region(
        buf: *const u8,
        len: c_ulong,
        denom: c_uint,
        x: *mut c_uint,
        w: *mut c_uint,
        y: c_uint,
        h: c_uint,
        out: *mut u8,
        out_cap: c_ulong,
        scaled_w: *mut c_uint,
        scaled_h: *mut c_uint,
        msg: *mut c_char,
        msg_len: usize,
    ) -> c_int;
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// True when `bytes` start like a JPEG file (SOI marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.len() > 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF
}

/// Width and height from the JPEG header; `name` is only used in error messages.
pub fn jpeg_size(bytes: &[u8], name: &str) -> Result<(u32, u32), DataError> {
    let (mut w, mut h) = (0, 0);
    let mut msg = [0u8; 200];
    // SAFETY: the pointers are valid for the given lengths for the duration of the call.
    let rc = unsafe {
        cj_jpeg_size(
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            &mut w,
            &mut h,
            msg.as_mut_ptr().cast(),
            msg.len(),
        )
    };
    if rc != 0 {
        return Err(DataError::image(
            name,
            format!(
                "cannot read the JPEG header: {}; re-download or regenerate it",
                message(&msg)
            ),
        ));
    }
    Ok((w, h))
}

/// The DCT reduction (1, 2, 4 or 8) for a `crop_w x crop_h` crop resized to `out_w x out_h`:
/// Pillow's `draft` rule, the largest `a` with `a <= min(crop_w / out_w, crop_h / out_h)`
/// (integer division).
pub fn draft_scale(crop_w: u32, crop_h: u32, out_w: u32, out_h: u32) -> u32 {
    let s = (crop_w / out_w.max(1)).min(crop_h / out_h.max(1));
    [8, 4, 2, 1].into_iter().find(|&a| s >= a).unwrap_or(1)
}

/// Rows of the scaled image the resize may read beyond the crop's scaled edge (the filter is
/// clamped to the crop, so one pixel of rounding is enough; a few more keep libjpeg's edge
/// handling of partial iMCUs away from the pixels used).
const MARGIN: u32 = 2;

/// A region of a JPEG decoded at `1 / scale`, with where it lies.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledRegion {
    /// The decoded pixels.
    pub image: RgbImage,
    /// The reduction applied (1, 2, 4 or 8).
    pub scale: u32,
    /// Column of the scaled image where `image` starts.
    pub x: u32,
    /// Row of the scaled image where `image` starts.
    pub y: u32,
    /// The crop box mapped into `image` coordinates: left, top, right, bottom (fractional).
    pub bbox: [f64; 4],
    /// Pixels of `image` the resampling may read: columns `lo[0]..hi[0]`, rows `lo[1]..hi[1]`.
    pub lo: [u32; 2],
    /// See `lo`.
    pub hi: [u32; 2],
}

/// Decode the part of the JPEG `bytes` (of size `width x height`) that `crop` needs, at `1 /
/// scale`; `name` is only used in error messages. `Ok(None)` when libjpeg cannot produce RGB
/// for this file (CMYK / YCCK): use the exact path.
pub fn decode_region(
    bytes: &[u8],
    name: &str,
    (width, height): (u32, u32),
    crop: CropBox,
    scale: u32,
) -> Result<Option<ScaledRegion>, DataError> {
    let a = scale as f64;
    // Scaled image size (libjpeg rounds up).
    let (sw, sh) = (width.div_ceil(scale), height.div_ceil(scale));
    let bbox = [
        crop.left as f64 / a,
        crop.top as f64 / a,
        (crop.left + crop.width) as f64 / a,
        (crop.top + crop.height) as f64 / a,
    ];
    // Pixels the crop touches, clamped to the scaled image.
    let lo = [bbox[0].floor() as u32, bbox[1].floor() as u32];
    let hi = [
        (bbox[2].ceil() as u32).clamp(lo[0] + 1, sw),
        (bbox[3].ceil() as u32).clamp(lo[1] + 1, sh),
    ];
    let y0 = lo[1].saturating_sub(MARGIN);
    let y1 = (hi[1] + MARGIN).min(sh);
    let mut x = lo[0].saturating_sub(MARGIN);
    let mut w = (hi[0] + MARGIN).min(sw) - x;
    let rows = y1 - y0;
    let mut out = vec![0u8; sw as usize * rows as usize * 3];
    let (mut got_w, mut got_h) = (0, 0);
    let mut msg = [0u8; 200];
    // SAFETY: every pointer is valid for its length for the duration of the call; `out` holds
    // `sw * rows * 3` bytes, the most the decoder writes (it checks against `out_cap`).
    let rc = unsafe {
        cj_jpeg_decode_region(
            bytes.as_ptr(),
            bytes.len() as c_ulong,
            scale,
            &mut x,
            &mut w,
            y0,
            rows,
            out.as_mut_ptr(),
            out.len() as c_ulong,
            &mut got_w,
            &mut got_h,
            msg.as_mut_ptr().cast(),
            msg.len(),
        )
    };
    match rc {
        0 => {}
        -2 => return Ok(None),
        _ => {
            return Err(DataError::image(
                name,
                format!(
                    "cannot decode: {}; re-download or regenerate it",
                    message(&msg)
                ),
            ))
        }
    }
    if (got_w, got_h) != (sw, sh) {
        return Err(DataError::image(
            name,
            format!(
                "the decoder scaled {width}x{height} by 1/{scale} to {got_w}x{got_h}, expected \
                 {sw}x{sh}"
            ),
        ));
    }
    out.truncate(w as usize * rows as usize * 3);
    let image = RgbImage::from_raw(w, rows, out)
        .ok_or_else(|| DataError::image(name, "decoded region has the wrong size"))?;
    let (fx, fy) = (x as f64, y0 as f64);
    Ok(Some(ScaledRegion {
        image,
        scale,
        x,
        y: y0,
        bbox: [bbox[0] - fx, bbox[1] - fy, bbox[2] - fx, bbox[3] - fy],
        lo: [lo[0] - x, lo[1] - y0],
        hi: [hi[0] - x, hi[1] - y0],
    }))
}

/// Read a file for [`decode_region`].
pub fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::image(path, format!("cannot open: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::sample_rng;
    use crate::data::transforms::{crop, resize_box, Interpolation, RandomResizedCrop, Transform};

    /// A photo-like 8-bit image: smooth colour fields plus a fine texture.
    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f64, y as f64);
            let v = |c: f64| {
                let s = 127.0
                    + 60.0 * ((fx * 0.021 + c).sin() * (fy * 0.017 - c).cos())
                    + 30.0 * ((fx + 2.0 * fy) * 0.11 + c).sin()
                    + 12.0 * (((x * 7 + y * 13 + (c as u32) * 5) % 17) as f64 / 17.0 - 0.5);
                s.clamp(0.0, 255.0) as u8
            };
            image::Rgb([v(0.0), v(1.0), v(2.0)])
        })
    }

    fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .unwrap();
        out
    }

    #[test]
    fn draft_scale_is_pillows_rule() {
        assert_eq!(draft_scale(500, 375, 224, 224), 1);
        assert_eq!(draft_scale(448, 448, 224, 224), 2);
        assert_eq!(draft_scale(447, 1000, 224, 224), 1);
        assert_eq!(draft_scale(1000, 800, 224, 224), 2);
        assert_eq!(draft_scale(900, 900, 224, 224), 4);
        assert_eq!(draft_scale(2000, 1800, 224, 224), 8);
        assert_eq!(draft_scale(5000, 5000, 224, 224), 8);
        assert_eq!(draft_scale(500, 375, 64, 64), 4);
        assert_eq!(draft_scale(60, 300, 64, 64), 1);
        assert_eq!(draft_scale(10, 10, 0, 0), 8, "no division by zero");
    }

    #[test]
    fn names_parse_and_exact_is_the_default() {
        assert_eq!("exact".parse::<Decode>().unwrap(), Decode::default());
        assert_eq!("scaled".parse::<Decode>().unwrap(), Decode::Scaled);
        let e = "fast".parse::<Decode>().unwrap_err();
        assert!(e.contains("fast") && e.contains("scaled"), "{e}");
        assert_eq!(serde_json::to_value(Decode::Scaled).unwrap(), "scaled");
    }

    /// A region decoded at scale 1 holds the full decode's pixels at the mapped coordinates, and
    /// its box is the crop shifted by the region's origin.
    #[test]
    fn region_maps_the_crop() {
        let img = photo(203, 157);
        let bytes = jpeg_bytes(&img);
        let dims = jpeg_size(&bytes, "t").unwrap();
        assert_eq!(dims, (203, 157));
        let full = CropBox {
            top: 0,
            left: 0,
            height: 157,
            width: 203,
        };
        let whole = decode_region(&bytes, "t", dims, full, 1).unwrap().unwrap();
        assert_eq!((whole.x, whole.y), (0, 0));
        assert_eq!(whole.image.dimensions(), (203, 157));
        for (b, a) in [
            ((40, 33, 61, 90), 1),
            ((0, 0, 203, 157), 2),
            ((41, 17, 130, 100), 2),
            ((3, 5, 199, 150), 4),
            ((16, 8, 64, 64), 8),
        ] {
            let crop_box = CropBox {
                left: b.0,
                top: b.1,
                width: b.2,
                height: b.3,
            };
            let r = decode_region(&bytes, "t", dims, crop_box, a)
                .unwrap()
                .unwrap();
            let af = a as f64;
            assert_eq!(
                r.bbox,
                [
                    b.0 as f64 / af - r.x as f64,
                    b.1 as f64 / af - r.y as f64,
                    (b.0 + b.2) as f64 / af - r.x as f64,
                    (b.1 + b.3) as f64 / af - r.y as f64
                ]
            );
            assert!(r.lo[0] as f64 <= r.bbox[0] && r.bbox[2] <= r.hi[0] as f64);
            assert!(r.lo[1] as f64 <= r.bbox[1] && r.bbox[3] <= r.hi[1] as f64);
            assert!(r.hi[0] <= r.image.width() && r.hi[1] <= r.image.height());
            let scaled = decode_region(&bytes, "t", dims, full, a).unwrap().unwrap();
            for yy in r.lo[1]..r.hi[1] {
                for xx in r.lo[0]..r.hi[0] {
                    assert_eq!(
                        r.image.get_pixel(xx, yy),
                        scaled.image.get_pixel(xx + r.x, yy + r.y),
                        "{b:?} 1/{a} at ({xx}, {yy})"
                    );
                }
            }
        }
        // At scale 1 with an integer box, resize_box is crop + resize.
        let r = decode_region(
            &bytes,
            "t",
            dims,
            CropBox {
                left: 40,
                top: 33,
                width: 61,
                height: 90,
            },
            1,
        )
        .unwrap()
        .unwrap();
        let want = crate::data::transforms::resize(
            &crop(
                &whole.image,
                CropBox {
                    left: 40,
                    top: 33,
                    width: 61,
                    height: 90,
                },
            ),
            32,
            32,
            Interpolation::Bicubic,
        );
        let got = resize_box(&r.image, r.bbox, r.lo, r.hi, 32, 32, Interpolation::Bicubic);
        assert_eq!(got, want);
    }

    #[test]
    fn bad_bytes_are_an_error_naming_the_file() {
        let e = jpeg_size(b"\xff\xd8\xff\x00garbage", "bad.jpg").unwrap_err();
        assert!(e.to_string().contains("bad.jpg"), "{e}");
        let mut bytes = jpeg_bytes(&photo(64, 48));
        bytes.truncate(bytes.len() / 3);
        // libjpeg fills the missing rows of a truncated file (a warning, not an error); Pillow
        // raises instead unless LOAD_TRUNCATED_IMAGES is set. Either way: no panic, no abort.
        let _ = decode_region(
            &bytes,
            "cut.jpg",
            (64, 48),
            CropBox {
                left: 0,
                top: 0,
                width: 64,
                height: 48,
            },
            1,
        );
    }

    /// Scaled vs exact decode on the same crops: within the stated tolerance (8-bit units).
    #[test]
    fn scaled_decode_is_close_to_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jpg");
        std::fs::write(&path, jpeg_bytes(&photo(500, 375))).unwrap();
        for (size, max_mean) in [(224, 0.5), (64, 2.0)] {
            let t = Transform::RandomResizedCrop {
                rrc: RandomResizedCrop::new(size),
                hflip: 0.5,
                mean: [0.0; 3],
                std: [1.0 / 255.0; 3],
            };
            let (mut sum, mut n, mut max) = (0.0f64, 0usize, 0.0f32);
            for i in 0..12 {
                let e = t
                    .load(&path, Decode::Exact, &mut sample_rng(1, 0, i))
                    .unwrap();
                let s = t
                    .load(&path, Decode::Scaled, &mut sample_rng(1, 0, i))
                    .unwrap();
                assert_eq!(e.shape(), s.shape());
                for (a, b) in e.data.iter().zip(&s.data) {
                    let d = (a - b).abs();
                    sum += d as f64;
                    n += 1;
                    max = max.max(d);
                }
            }
            let mean = sum / n as f64;
            assert!(
                mean < max_mean,
                "size {size}: mean |diff| {mean}, max {max}"
            );
        }
    }
}

//! Tiny rasteriser for the synthetic generators: an `f32` RGB canvas, polygon masks (pixel
//! centres, even-odd rule), shape builders, colours, noise and deterministic PNG/JPEG writers.

use std::io::Cursor;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::{ImageFormat, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::data::DataError;

/// A 2-D point `(x, y)` in pixels.
pub type Pt = (f64, f64);

/// RGB colour, components in `[0, 1]`.
pub type Rgb = [f32; 3];

/// An RGB canvas with `f32` components in `[0, 1]`.
#[derive(Debug, Clone)]
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<Rgb>,
}

/// A binary mask, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    pub w: usize,
    pub h: usize,
    pub data: Vec<bool>,
}

impl Mask {
    pub fn new(w: usize, h: usize) -> Self {
        Mask {
            w,
            h,
            data: vec![false; w * h],
        }
    }
    pub fn area(&self) -> usize {
        self.data.iter().filter(|&&b| b).count()
    }
    pub fn union(&mut self, other: &Mask) {
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a |= *b;
        }
    }
    /// Tight box `[x, y, w, h]` of the set pixels (`[0; 4]` if empty), as pycocotools.
    pub fn bbox(&self) -> [f64; 4] {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..self.h {
            for x in 0..self.w {
                if self.data[y * self.w + x] {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
        }
        if x0 == usize::MAX {
            return [0.0; 4];
        }
        [
            x0 as f64,
            y0 as f64,
            (x1 - x0 + 1) as f64,
            (y1 - y0 + 1) as f64,
        ]
    }
    /// Uncompressed COCO RLE counts: column-major runs starting with a run of zeros.
    pub fn rle_counts(&self) -> Vec<u64> {
        let (w, h) = (self.w, self.h);
        let col_major = (0..w).flat_map(move |x| (0..h).map(move |y| self.data[y * w + x]));
        crate::data::mask::rle::encode_iter(h, w, col_major)
            .counts
            .into_iter()
            .map(u64::from)
            .collect()
    }
}

/// Even-odd point-in-polygon test.
fn inside(poly: &[Pt], x: f64, y: f64) -> bool {
    let mut c = false;
    let n = poly.len();
    let mut j = n.wrapping_sub(1);
    for i in 0..n {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            c = !c;
        }
        j = i;
    }
    c
}

/// Union of the polygons, sampled at pixel centres.
pub fn polygons_mask(w: usize, h: usize, polys: &[Vec<Pt>]) -> Mask {
    let mut m = Mask::new(w, h);
    for poly in polys.iter().filter(|p| p.len() >= 3) {
        let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
        for &(x, y) in poly {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        let xs = (x0.floor().max(0.0)) as usize;
        let ys = (y0.floor().max(0.0)) as usize;
        let xe = (x1.ceil().max(0.0) as usize).min(w);
        let ye = (y1.ceil().max(0.0) as usize).min(h);
        for y in ys..ye {
            for x in xs..xe {
                if inside(poly, x as f64 + 0.5, y as f64 + 0.5) {
                    m.data[y * w + x] = true;
                }
            }
        }
    }
    m
}

/// Shoelace area of a polygon.
pub fn shoelace(poly: &[Pt]) -> f64 {
    let n = poly.len();
    let mut s = 0.0;
    for i in 0..n {
        let (x0, y0) = poly[i];
        let (x1, y1) = poly[(i + 1) % n];
        s += x0 * y1 - x1 * y0;
    }
    s.abs() / 2.0
}

/// Sutherland-Hodgman clip of a polygon to `[0, w] x [0, h]`.
pub fn clip_to_rect(poly: &[Pt], w: f64, h: f64) -> Vec<Pt> {
    type Edge = (fn(Pt, f64) -> bool, fn(Pt, Pt, f64) -> Pt, f64);
    fn lerp_x(a: Pt, b: Pt, x: f64) -> Pt {
        let t = (x - a.0) / (b.0 - a.0);
        (x, a.1 + t * (b.1 - a.1))
    }
    fn lerp_y(a: Pt, b: Pt, y: f64) -> Pt {
        let t = (y - a.1) / (b.1 - a.1);
        (a.0 + t * (b.0 - a.0), y)
    }
    let edges: [Edge; 4] = [
        (|p, v| p.0 >= v, lerp_x, 0.0),
        (|p, v| p.0 <= v, lerp_x, w),
        (|p, v| p.1 >= v, lerp_y, 0.0),
        (|p, v| p.1 <= v, lerp_y, h),
    ];
    let mut out: Vec<Pt> = poly.to_vec();
    for (ins, cut, v) in edges {
        let input = std::mem::take(&mut out);
        let n = input.len();
        for i in 0..n {
            let cur = input[i];
            let prev = input[(i + n - 1) % n];
            match (ins(cur, v), ins(prev, v)) {
                (true, true) => out.push(cur),
                (true, false) => {
                    out.push(cut(prev, cur, v));
                    out.push(cur);
                }
                (false, true) => out.push(cut(prev, cur, v)),
                (false, false) => {}
            }
        }
    }
    out
}

/// Transform unit-shape points: scale by `(sx, sy)`, rotate by `angle` radians, translate.
pub fn place(points: &[Pt], cx: f64, cy: f64, sx: f64, sy: f64, angle: f64) -> Vec<Pt> {
    let (s, c) = angle.sin_cos();
    points
        .iter()
        .map(|&(x, y)| {
            let (x, y) = (x * sx, y * sy);
            (cx + x * c - y * s, cy + x * s + y * c)
        })
        .collect()
}

/// Unit ellipse (radii `rx`, `ry`, centre `(ox, oy)`) as an `n`-gon.
pub fn ellipse(ox: f64, oy: f64, rx: f64, ry: f64, n: usize) -> Vec<Pt> {
    (0..n)
        .map(|i| {
            let t = i as f64 / n as f64 * std::f64::consts::TAU;
            (ox + rx * t.cos(), oy + ry * t.sin())
        })
        .collect()
}

/// Regular `n`-gon of radius `r` (first vertex at angle 0).
pub fn regular(r: f64, n: usize) -> Vec<Pt> {
    ellipse(0.0, 0.0, r, r, n)
}

/// `n`-pointed star with outer radius `r_out` and inner radius `r_in`.
pub fn star(r_out: f64, r_in: f64, n: usize) -> Vec<Pt> {
    (0..2 * n)
        .map(|i| {
            let r = if i % 2 == 0 { r_out } else { r_in };
            let t = i as f64 / (2 * n) as f64 * std::f64::consts::TAU - std::f64::consts::FRAC_PI_2;
            (r * t.cos(), r * t.sin())
        })
        .collect()
}

/// Axis-aligned rectangle `[x0, x1] x [y0, y1]`.
pub fn rect(x0: f64, y0: f64, x1: f64, y1: f64) -> Vec<Pt> {
    vec![(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
}

/// HSV (h in degrees) to RGB.
pub fn hsv(h: f64, s: f64, v: f64) -> Rgb {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) as f32, (g + m) as f32, (b + m) as f32]
}

/// A colour with hue, saturation and value drawn uniformly from the ranges, in that order.
pub fn hsv_in(
    rng: &mut ChaCha8Rng,
    h: std::ops::Range<f64>,
    s: std::ops::Range<f64>,
    v: std::ops::Range<f64>,
) -> Rgb {
    let h = rng.gen_range(h);
    let s = rng.gen_range(s);
    hsv(h, s, rng.gen_range(v))
}

/// Random saturated-ish colour.
pub fn random_color(rng: &mut ChaCha8Rng) -> Rgb {
    hsv_in(rng, 0.0..360.0, 0.35..1.0, 0.3..1.0)
}

/// Luma of a colour.
pub fn luma(c: Rgb) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// Random colour whose luma differs from `bg` by at least `min_diff`.
pub fn contrasting_color(rng: &mut ChaCha8Rng, bg: Rgb, min_diff: f32) -> Rgb {
    for _ in 0..50 {
        let c = random_color(rng);
        if (luma(c) - luma(bg)).abs() >= min_diff {
            return c;
        }
    }
    if luma(bg) > 0.5 {
        [0.05, 0.05, 0.1]
    } else {
        [0.95, 0.95, 0.9]
    }
}

/// Linear mix of two colours.
pub fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

impl Canvas {
    pub fn new(w: usize, h: usize, c: Rgb) -> Self {
        Canvas {
            w,
            h,
            px: vec![c; w * h],
        }
    }

    /// Linear gradient from `a` to `b` along direction `angle`.
    pub fn gradient(w: usize, h: usize, a: Rgb, b: Rgb, angle: f64) -> Self {
        let (s, c) = angle.sin_cos();
        let norm = (w as f64).abs() * c.abs() + (h as f64) * s.abs();
        let mut cv = Canvas::new(w, h, a);
        for y in 0..h {
            for x in 0..w {
                let t = ((x as f64 - w as f64 / 2.0) * c + (y as f64 - h as f64 / 2.0) * s)
                    / norm.max(1.0)
                    + 0.5;
                cv.px[y * w + x] = mix(a, b, t.clamp(0.0, 1.0) as f32);
            }
        }
        cv
    }

    /// Paint the mask with a per-pixel colour function.
    pub fn paint(&mut self, m: &Mask, mut f: impl FnMut(usize, usize) -> Rgb) {
        for y in 0..self.h.min(m.h) {
            for x in 0..self.w.min(m.w) {
                if m.data[y * m.w + x] {
                    self.px[y * self.w + x] = f(x, y);
                }
            }
        }
    }

    /// Blend `c` over the mask with opacity `alpha`.
    pub fn shade(&mut self, m: &Mask, c: Rgb, alpha: f32) {
        for (i, &b) in m.data.iter().enumerate().take(self.px.len()) {
            if b {
                self.px[i] = mix(self.px[i], c, alpha);
            }
        }
    }

    /// Add uniform noise in `[-amp, amp]` to every component.
    pub fn noise(&mut self, rng: &mut ChaCha8Rng, amp: f32) {
        for p in &mut self.px {
            for v in p.iter_mut() {
                *v += rng.gen_range(-amp..=amp);
            }
        }
    }

    pub fn to_rgb8(&self) -> RgbImage {
        let raw: Vec<u8> = self
            .px
            .iter()
            .flat_map(|p| p.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8))
            .collect();
        RgbImage::from_raw(self.w as u32, self.h as u32, raw).unwrap_or_default()
    }

    pub fn save_png(&self, path: &Path) -> Result<(), DataError> {
        let mut buf = Cursor::new(Vec::new());
        self.to_rgb8()
            .write_to(&mut buf, ImageFormat::Png)
            .map_err(|e| DataError::image(path, format!("PNG encode: {e}")))?;
        fs_err::write(path, buf.into_inner())?;
        Ok(())
    }

    pub fn save_jpeg(&self, path: &Path, quality: u8) -> Result<(), DataError> {
        let mut buf = Vec::new();
        JpegEncoder::new_with_quality(&mut buf, quality.clamp(1, 100))
            .encode_image(&self.to_rgb8())
            .map_err(|e| DataError::image(path, format!("JPEG encode: {e}")))?;
        fs_err::write(path, buf)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_is_column_major() {
        // 3 rows x 2 cols, set pixels (y=1,x=0) and (y=0,x=1): column-major 0,1,0 | 1,0,0.
        let mut m = Mask::new(2, 3);
        m.data[2] = true; // y=1, x=0
        m.data[1] = true; // y=0, x=1
        assert_eq!(m.rle_counts(), vec![1, 1, 1, 1, 2]);
        assert_eq!(m.bbox(), [0.0, 0.0, 2.0, 2.0]);
        assert_eq!(Mask::new(2, 2).rle_counts(), vec![4]);
    }

    #[test]
    fn polygon_tools() {
        let sq = rect(1.0, 1.0, 3.0, 4.0);
        assert_eq!(shoelace(&sq), 6.0);
        assert_eq!(polygons_mask(5, 5, std::slice::from_ref(&sq)).area(), 6);
        let c = clip_to_rect(&rect(-2.0, -2.0, 2.0, 2.0), 10.0, 10.0);
        assert_eq!(shoelace(&c), 4.0);
    }
}

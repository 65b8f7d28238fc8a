//! Fine-tuning augmentations of the MAE recipe (EVALS.md §1.4, timm `create_transform` +
//! `Mixup`): RandAugment `rand-m9-mstd0.5-inc1`, RandomErasing (`pixel` mode), and batch Mixup /
//! CutMix with label smoothing. Every draw comes from the generator handed in.
//!
//! RandAugment follows timm's `_RAND_INCREASING_TRANSFORMS` list and level functions: 2 ops per
//! image drawn with replacement, each applied with probability 0.5, magnitude ~ N(9, 0.5)
//! clipped to [0, 10]; geometric ops fill with the ImageNet mean (124, 116, 104). Differences
//! from timm / Pillow, kept small on purpose: geometric ops always resample bilinearly (timm
//! picks bilinear or bicubic at random), and the colour enhancers round instead of reproducing
//! Pillow's fixed-point blending bit for bit.

use image::{Rgb, RgbImage};
use rand::Rng;

use super::transforms::Chw;

/// Fill colour of geometric ops: round(255 * ImageNet mean).
pub const FILL: [u8; 3] = [124, 116, 104];

/// The ops of timm's increasing RandAugment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Stretch each channel to [0, 255].
    AutoContrast,
    /// Histogram equalisation per channel (Pillow `ImageOps.equalize`).
    Equalize,
    /// 255 - x.
    Invert,
    /// Rotate by up to 30 degrees.
    Rotate,
    /// Keep 4 - int(m / 10 * 4) bits.
    Posterize,
    /// Invert pixels at or above 256 - int(m / 10 * 256).
    Solarize,
    /// Add int(m / 10 * 110) to pixels below 128.
    SolarizeAdd,
    /// Saturation factor 1 +- m / 10 * 0.9.
    Color,
    /// Contrast factor 1 +- m / 10 * 0.9.
    Contrast,
    /// Brightness factor 1 +- m / 10 * 0.9.
    Brightness,
    /// Sharpness factor 1 +- m / 10 * 0.9.
    Sharpness,
    /// Shear along x by up to 0.3.
    ShearX,
    /// Shear along y by up to 0.3.
    ShearY,
    /// Translate along x by up to 45 % of the width.
    TranslateX,
    /// Translate along y by up to 45 % of the height.
    TranslateY,
}

/// timm `_RAND_INCREASING_TRANSFORMS`, in its order.
pub const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

/// RandAugment settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    /// Ops per image.
    pub num_ops: usize,
    /// Mean magnitude (0..10).
    pub magnitude: f64,
    /// Std of the per-op magnitude noise.
    pub magnitude_std: f64,
    /// Probability each drawn op is applied.
    pub prob: f64,
}

impl RandAugment {
    /// `rand-m9-mstd0.5-inc1` (the MAE fine-tuning setting).
    pub fn mae() -> Self {
        RandAugment {
            num_ops: 2,
            magnitude: 9.0,
            magnitude_std: 0.5,
            prob: 0.5,
        }
    }

    /// Apply to an image.
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let mut out = img.clone();
        for _ in 0..self.num_ops {
            let op = OPS[rng.gen_range(0..OPS.len())];
            if self.prob < 1.0 && rng.gen::<f64>() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                m += self.magnitude_std * std_normal(rng);
            }
            let m = m.clamp(0.0, 10.0);
            out = apply_op(&out, op, m, rng);
        }
        out
    }
}

/// One standard normal draw (Box-Muller).
pub fn std_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn signed(v: f64, rng: &mut impl Rng) -> f64 {
    if rng.gen::<f64>() < 0.5 {
        -v
    } else {
        v
    }
}

fn map_lut(img: &RgbImage, lut: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for c in 0..3 {
            p.0[c] = lut[c][p.0[c] as usize];
        }
    }
    out
}

fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.pixels() {
        for c in 0..3 {
            h[c][p.0[c] as usize] += 1;
        }
    }
    h
}

fn blend(deg: &RgbImage, img: &RgbImage, factor: f64) -> RgbImage {
    let mut out = img.clone();
    for (o, (d, s)) in out.pixels_mut().zip(deg.pixels().zip(img.pixels())) {
        for c in 0..3 {
            let (a, b) = (d.0[c] as f64, s.0[c] as f64);
            o.0[c] = (a + factor * (b - a)).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

fn luma(p: &Rgb<u8>) -> u8 {
    ((p.0[0] as u32 * 19595 + p.0[1] as u32 * 38470 + p.0[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Inverse-mapped affine warp: output pixel centre `(x + 0.5, y + 0.5)` reads the input at
/// `(a x' + b y' + c, d x' + e y' + f)` (Pillow's `Image.transform(AFFINE)` convention),
/// bilinear, `FILL` outside.
pub fn affine(img: &RgbImage, m: [f64; 6]) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let mut out = RgbImage::new(img.width(), img.height());
    let px = |x: i64, y: i64, c: usize| -> f64 {
        if x < 0 || y < 0 || x >= w || y >= h {
            FILL[c] as f64
        } else {
            img.get_pixel(x as u32, y as u32).0[c] as f64
        }
    };
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xi = m[0] * xo + m[1] * yo + m[2] - 0.5;
            let yi = m[3] * xo + m[4] * yo + m[5] - 0.5;
            let inside = xi > -1.0 && yi > -1.0 && xi < w as f64 && yi < h as f64;
            let mut v = [0u8; 3];
            for (c, vc) in v.iter_mut().enumerate() {
                *vc = if !inside {
                    FILL[c]
                } else {
                    let (x0, y0) = (xi.floor(), yi.floor());
                    let (fx, fy) = (xi - x0, yi - y0);
                    let (x0, y0) = (x0 as i64, y0 as i64);
                    let top = px(x0, y0, c) * (1.0 - fx) + px(x0 + 1, y0, c) * fx;
                    let bot = px(x0, y0 + 1, c) * (1.0 - fx) + px(x0 + 1, y0 + 1, c) * fx;
                    (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8
                };
            }
            out.put_pixel(x as u32, y as u32, Rgb(v));
        }
    }
    out
}

/// Apply `op` at magnitude `m` (0..10); signs are drawn from `rng` where timm draws them.
pub fn apply_op(img: &RgbImage, op: Op, m: f64, rng: &mut impl Rng) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    match op {
        Op::AutoContrast => {
            let hist = histograms(img);
            let mut lut = [[0u8; 256]; 3];
            for c in 0..3 {
                let lo = hist[c].iter().position(|&v| v > 0).unwrap_or(0);
                let hi = hist[c].iter().rposition(|&v| v > 0).unwrap_or(255);
                for (i, l) in lut[c].iter_mut().enumerate() {
                    *l = if hi <= lo {
                        i as u8
                    } else {
                        let scale = 255.0 / (hi - lo) as f64;
                        let offset = -(lo as f64) * scale;
                        ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8
                    };
                }
            }
            map_lut(img, &lut)
        }
        Op::Equalize => {
            let hist = histograms(img);
            let mut lut = [[0u8; 256]; 3];
            for c in 0..3 {
                let nz: Vec<u64> = hist[c].iter().copied().filter(|&v| v > 0).collect();
                let step = if nz.len() <= 1 {
                    0
                } else {
                    (nz.iter().sum::<u64>() - nz[nz.len() - 1]) / 255
                };
                if step == 0 {
                    for (i, l) in lut[c].iter_mut().enumerate() {
                        *l = i as u8;
                    }
                } else {
                    let mut n = step / 2;
                    for i in 0..256 {
                        lut[c][i] = (n / step).min(255) as u8;
                        n += hist[c][i];
                    }
                }
            }
            map_lut(img, &lut)
        }
        Op::Invert => {
            let mut out = img.clone();
            for p in out.pixels_mut() {
                for v in p.0.iter_mut() {
                    *v = 255 - *v;
                }
            }
            out
        }
        Op::Rotate => {
            let deg = signed(m / 10.0 * 30.0, rng);
            // Pillow `rotate(deg)`: counter-clockwise about the centre.
            let a = -deg.to_radians();
            let (cs, sn) = (a.cos(), a.sin());
            let (cx, cy) = (w / 2.0, h / 2.0);
            let c = cs * -cx + sn * -cy + cx;
            let f = -sn * -cx + cs * -cy + cy;
            affine(img, [cs, sn, c, -sn, cs, f])
        }
        Op::Posterize => {
            let bits = 4 - (m / 10.0 * 4.0) as i32;
            let mask: u8 = if bits <= 0 {
                0
            } else {
                !((1u16 << (8 - bits)) - 1) as u8
            };
            let mut out = img.clone();
            for p in out.pixels_mut() {
                for v in p.0.iter_mut() {
                    *v &= mask;
                }
            }
            out
        }
        Op::Solarize => {
            let thresh = 256 - (m / 10.0 * 256.0) as i32;
            let mut out = img.clone();
            for p in out.pixels_mut() {
                for v in p.0.iter_mut() {
                    if *v as i32 >= thresh {
                        *v = 255 - *v;
                    }
                }
            }
            out
        }
        Op::SolarizeAdd => {
            let add = (m / 10.0 * 110.0) as i32;
            let mut out = img.clone();
            for p in out.pixels_mut() {
                for v in p.0.iter_mut() {
                    if *v < 128 {
                        *v = (*v as i32 + add).min(255) as u8;
                    }
                }
            }
            out
        }
        Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => {
            let factor = 1.0 + signed(m / 10.0 * 0.9, rng);
            let deg = match op {
                Op::Color => {
                    let mut d = img.clone();
                    for p in d.pixels_mut() {
                        let l = luma(p);
                        p.0 = [l, l, l];
                    }
                    d
                }
                Op::Contrast => {
                    let n = (img.width() * img.height()).max(1) as f64;
                    let mean = img.pixels().map(|p| luma(p) as f64).sum::<f64>() / n;
                    let g = (mean + 0.5) as u8;
                    RgbImage::from_pixel(img.width(), img.height(), Rgb([g, g, g]))
                }
                Op::Brightness => RgbImage::new(img.width(), img.height()),
                _ => smooth(img),
            };
            blend(&deg, img, factor)
        }
        Op::ShearX => {
            let s = signed(m / 10.0 * 0.3, rng);
            affine(img, [1.0, s, 0.0, 0.0, 1.0, 0.0])
        }
        Op::ShearY => {
            let s = signed(m / 10.0 * 0.3, rng);
            affine(img, [1.0, 0.0, 0.0, s, 1.0, 0.0])
        }
        Op::TranslateX => {
            let t = signed(m / 10.0 * 0.45, rng) * w;
            affine(img, [1.0, 0.0, t, 0.0, 1.0, 0.0])
        }
        Op::TranslateY => {
            let t = signed(m / 10.0 * 0.45, rng) * h;
            affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, t])
        }
    }
}

/// Pillow's `SMOOTH` filter (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13), border kept.
fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let mut v = [0u32; 3];
            for dy in 0..3 {
                for dx in 0..3 {
                    let k = if dx == 1 && dy == 1 { 5 } else { 1 };
                    let p = img.get_pixel(x + dx - 1, y + dy - 1);
                    for (vc, pc) in v.iter_mut().zip(p.0) {
                        *vc += k * pc as u32;
                    }
                }
            }
            out.put_pixel(
                x,
                y,
                Rgb([
                    ((v[0] + 6) / 13) as u8,
                    ((v[1] + 6) / 13) as u8,
                    ((v[2] + 6) / 13) as u8,
                ]),
            );
        }
    }
    out
}

/// timm `RandomErasing(probability, mode='pixel', max_count=1)` on a normalised CHW image:
/// area in [0.02, 1/3] of the image, log-uniform aspect in [0.3, 1/0.3], 10 attempts, the box
/// filled with per-pixel standard normal values.
pub fn random_erasing(img: &mut Chw, prob: f64, rng: &mut impl Rng) {
    if prob <= 0.0 || rng.gen::<f64>() > prob {
        return;
    }
    let (ch, ih, iw) = (img.channels, img.height, img.width);
    let area = (ih * iw) as f64;
    let (lo, hi) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for _ in 0..10 {
        let target = rng.gen_range(0.02..1.0 / 3.0) * area;
        let ar = rng.gen_range(lo..hi).exp();
        let h = (target * ar).sqrt().round() as usize;
        let w = (target / ar).sqrt().round() as usize;
        if w < iw && h < ih && w > 0 && h > 0 {
            let top = rng.gen_range(0..=ih - h);
            let left = rng.gen_range(0..=iw - w);
            for c in 0..ch {
                for y in top..top + h {
                    for x in left..left + w {
                        img.data[(c * ih + y) * iw + x] = std_normal(rng) as f32;
                    }
                }
            }
            return;
        }
    }
}

/// Gamma(shape, 1) by Marsaglia-Tsang (boosted for shape < 1).
pub fn gamma(shape: f64, rng: &mut impl Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = 1.0 - rng.gen::<f64>();
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = std_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = 1.0 - rng.gen::<f64>();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Beta(a, b) from two Gamma draws.
pub fn beta(a: f64, b: f64, rng: &mut impl Rng) -> f64 {
    let x = gamma(a, rng);
    let y = gamma(b, rng);
    if x + y == 0.0 {
        0.5
    } else {
        x / (x + y)
    }
}

/// timm `Mixup` settings (mode `batch`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixupConfig {
    /// Mixup alpha (0 = off).
    pub mixup_alpha: f64,
    /// CutMix alpha (0 = off).
    pub cutmix_alpha: f64,
    /// Probability a batch is mixed at all.
    pub prob: f64,
    /// Probability of CutMix when both are on.
    pub switch_prob: f64,
    /// Label smoothing folded into the soft targets.
    pub smoothing: f64,
}

/// Mix a batch in place (`images` = `[B, C, H, W]` values) and return the soft targets `B x C`
/// (row-major): `lam * onehot(y) + (1 - lam) * onehot(flip(y))`, each smoothed
/// (`off = smoothing / C`, `on = 1 - smoothing + off`). The partner of sample `i` is `B - 1 - i`.
pub fn mix_batch(
    images: &mut [f32],
    shape: [usize; 4],
    labels: &[usize],
    classes: usize,
    cfg: &MixupConfig,
    rng: &mut impl Rng,
) -> Vec<f32> {
    let [b, c, h, w] = shape;
    let mut lam = 1.0;
    let mut cutmix = false;
    if (cfg.mixup_alpha > 0.0 || cfg.cutmix_alpha > 0.0) && rng.gen::<f64>() < cfg.prob {
        if cfg.mixup_alpha > 0.0 && cfg.cutmix_alpha > 0.0 {
            cutmix = rng.gen::<f64>() < cfg.switch_prob;
            lam = if cutmix {
                beta(cfg.cutmix_alpha, cfg.cutmix_alpha, rng)
            } else {
                beta(cfg.mixup_alpha, cfg.mixup_alpha, rng)
            };
        } else if cfg.mixup_alpha > 0.0 {
            lam = beta(cfg.mixup_alpha, cfg.mixup_alpha, rng);
        } else {
            cutmix = true;
            lam = beta(cfg.cutmix_alpha, cfg.cutmix_alpha, rng);
        }
    }
    if lam < 1.0 {
        let orig = images.to_vec();
        let per = c * h * w;
        if cutmix {
            let ratio = (1.0 - lam).sqrt();
            let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
            let cy = rng.gen_range(0..h as i64);
            let cx = rng.gen_range(0..w as i64);
            let yl = (cy - cut_h / 2).clamp(0, h as i64) as usize;
            let yh = (cy + cut_h / 2).clamp(0, h as i64) as usize;
            let xl = (cx - cut_w / 2).clamp(0, w as i64) as usize;
            let xh = (cx + cut_w / 2).clamp(0, w as i64) as usize;
            for i in 0..b {
                let j = b - 1 - i;
                for ch in 0..c {
                    for y in yl..yh {
                        let row = ch * h * w + y * w;
                        images[i * per + row + xl..i * per + row + xh]
                            .copy_from_slice(&orig[j * per + row + xl..j * per + row + xh]);
                    }
                }
            }
            lam = 1.0 - ((yh - yl) * (xh - xl)) as f64 / (h * w) as f64;
        } else {
            for i in 0..b {
                let j = b - 1 - i;
                for k in 0..per {
                    images[i * per + k] = (orig[i * per + k] as f64 * lam
                        + orig[j * per + k] as f64 * (1.0 - lam))
                        as f32;
                }
            }
        }
    }
    let off = cfg.smoothing / classes as f64;
    let on = 1.0 - cfg.smoothing + off;
    let mut t = vec![0f32; b * classes];
    for i in 0..b {
        let j = b - 1 - i;
        for k in 0..classes {
            let a = if labels[i] == k { on } else { off };
            let z = if labels[j] == k { on } else { off };
            t[i * classes + k] = (lam * a + (1.0 - lam) * z) as f32;
        }
    }
    t
}

#[cfg(test)]
mod tests;

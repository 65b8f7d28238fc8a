//! Synthetic ADE20K: outdoor-like scenes with a handful of ADE classes, each with its own
//! colour range and texture, written as `ADE_*.jpg` images and mode-L label PNGs (0 = other).

use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::draw::{self, Canvas, Mask, Pt, Rgb};
use super::item_rng;
use crate::data::ade20k::{write_label_png, LabelMap};
use crate::data::{DataError, DataFormat};

/// ADE20K raw labels used (wall, sky, floor, tree, road, person, car); 0 = other.
pub const USED_LABELS: [u8; 7] = [1, 3, 4, 5, 7, 13, 21];
const WALL: u8 = 1;
const SKY: u8 = 3;
const FLOOR: u8 = 4;
const TREE: u8 = 5;
const ROAD: u8 = 7;
const PERSON: u8 = 13;
const CAR: u8 = 21;
const OTHER: u8 = 0;

/// ADE20K generator parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ade20kParams {
    /// Images in `training`.
    pub train_images: usize,
    /// Images in `validation`.
    pub val_images: usize,
    /// Square image side.
    pub size: u32,
    /// JPEG quality.
    pub jpeg_quality: u8,
}

impl Default for Ade20kParams {
    fn default() -> Self {
        Ade20kParams {
            train_images: 64,
            val_images: 16,
            size: 64,
            jpeg_quality: 90,
        }
    }
}

struct Scene {
    cv: Canvas,
    labels: Vec<u8>,
    rng: ChaCha8Rng,
}

impl Scene {
    /// Paint `mask` with `label`, colour `base` and a texture.
    fn fill(&mut self, m: &Mask, label: u8, base: Rgb, texture: u8) {
        let jitter = self.rng.gen_range(-0.08f32..0.08);
        let base = base.map(|v| (v + jitter).clamp(0.0, 1.0));
        let period = self.rng.gen_range(3.0..6.0);
        let mut noise_rng = self.rng.clone();
        self.cv.paint(m, |x, y| {
            let (xf, yf) = (x as f64, y as f64);
            let t: f32 = match texture {
                1 => ((yf / period).floor() as i64 % 2) as f32 * 0.15, // horizontal bands
                2 => ((xf / period).floor() as i64 % 2) as f32 * 0.12, // vertical planks
                3 => noise_rng.gen_range(0.0..0.3),                    // foliage
                4 => (((xf / period).floor() + (yf / period).floor()) as i64 % 2) as f32 * 0.2, // windows
                _ => 0.0,
            };
            draw::mix(base, [0.0, 0.0, 0.0], t)
        });
        for (l, &b) in self.labels.iter_mut().zip(&m.data) {
            if b {
                *l = label;
            }
        }
    }
}

fn poly_mask(s: usize, polys: &[Vec<Pt>]) -> Mask {
    draw::polygons_mask(s, s, polys)
}

fn render(seed: u64, split: &str, i: usize, s: usize) -> (Canvas, Vec<u8>) {
    let rng = item_rng(seed, DataFormat::Ade20k, split, i);
    let mut sc = Scene {
        cv: Canvas::new(s, s, [0.0; 3]),
        labels: vec![OTHER; s * s],
        rng,
    };
    let sf = s as f64;
    let horizon = sf * sc.rng.gen_range(0.3..0.6);
    // Sky, then ground (road or floor).
    let sky = poly_mask(s, &[draw::rect(0.0, 0.0, sf, horizon)]);
    let sky_c = draw::hsv_in(&mut sc.rng, 195.0..225.0, 0.3..0.7, 0.7..1.0);
    sc.fill(&sky, SKY, sky_c, 0);
    let ground = poly_mask(s, &[draw::rect(0.0, horizon, sf, sf)]);
    if sc.rng.gen_bool(0.5) {
        let c = draw::hsv(0.0, 0.0, sc.rng.gen_range(0.25..0.45));
        sc.fill(&ground, ROAD, c, 0);
        let lane = poly_mask(
            s,
            &[draw::rect(
                0.0,
                (horizon + sf) / 2.0 - 0.6,
                sf,
                (horizon + sf) / 2.0 + 0.6,
            )],
        );
        sc.cv.paint(&lane, |x, _| {
            if (x / 4) % 2 == 0 {
                [0.9, 0.9, 0.8]
            } else {
                [0.3, 0.3, 0.3]
            }
        });
    } else {
        let c = draw::hsv_in(&mut sc.rng, 20.0..40.0, 0.4..0.7, 0.4..0.7);
        sc.fill(&ground, FLOOR, c, 2);
    }
    // Walls / buildings standing on the horizon.
    for _ in 0..sc.rng.gen_range(0..3) {
        let (x0, bw) = (
            sc.rng.gen_range(-0.1..0.8) * sf,
            sc.rng.gen_range(0.15..0.45) * sf,
        );
        let top = horizon * sc.rng.gen_range(0.05..0.7);
        let m = poly_mask(s, &[draw::rect(x0, top, x0 + bw, horizon + 1.0)]);
        let c = draw::hsv_in(&mut sc.rng, 0.0..60.0, 0.05..0.3, 0.5..0.85);
        sc.fill(&m, WALL, c, 4);
    }
    // Trees: trunk + canopy.
    for _ in 0..sc.rng.gen_range(0..3) {
        let (cx, r) = (sc.rng.gen_range(0.0..sf), sc.rng.gen_range(0.08..0.16) * sf);
        let base = horizon + sc.rng.gen_range(0.0..0.1) * sf;
        let trunk = draw::rect(cx - r * 0.15, base - r * 1.2, cx + r * 0.15, base);
        let canopy = draw::ellipse(cx, base - r * 1.8, r, r * 1.1, 24);
        let m = poly_mask(s, &[trunk, canopy]);
        let c = draw::hsv_in(&mut sc.rng, 90.0..140.0, 0.5..0.9, 0.3..0.6);
        sc.fill(&m, TREE, c, 3);
    }
    // Other stuff (label 0).
    for _ in 0..sc.rng.gen_range(0..3) {
        let (cx, cy) = (sc.rng.gen_range(0.0..sf), sc.rng.gen_range(0.0..sf));
        let m = poly_mask(
            s,
            &[draw::place(
                &draw::regular(1.0, 5),
                cx,
                cy,
                sf * 0.06,
                sf * 0.06,
                sc.rng.gen_range(0.0..6.0),
            )],
        );
        let c = draw::random_color(&mut sc.rng);
        sc.fill(&m, OTHER, c, 0);
    }
    // Cars and people on the ground, far to near.
    let mut things: Vec<(f64, bool)> = (0..sc.rng.gen_range(0..4))
        .map(|_| (sc.rng.gen_range(horizon + 2.0..sf), sc.rng.gen_bool(0.5)))
        .collect();
    things.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (foot, is_car) in things {
        let scale = 0.15 + 0.35 * (foot - horizon) / (sf - horizon).max(1.0);
        let cx = sc.rng.gen_range(0.0..sf);
        if is_car {
            let (bw, bh) = (sf * scale, sf * scale * 0.45);
            let body = draw::rect(cx - bw / 2.0, foot - bh * 0.7, cx + bw / 2.0, foot);
            let cabin = draw::rect(cx - bw * 0.3, foot - bh, cx + bw * 0.25, foot - bh * 0.6);
            let m = poly_mask(s, &[body, cabin]);
            let c = draw::hsv_in(&mut sc.rng, 0.0..360.0, 0.5..0.9, 0.4..0.9);
            sc.fill(&m, CAR, c, 0);
        } else {
            let ph = sf * scale * 0.9;
            let head = draw::ellipse(cx, foot - ph * 0.85, ph * 0.12, ph * 0.12, 12);
            let body = draw::ellipse(cx, foot - ph * 0.38, ph * 0.16, ph * 0.38, 16);
            let m = poly_mask(s, &[head, body]);
            let c = draw::hsv_in(&mut sc.rng, 0.0..360.0, 0.2..0.6, 0.2..0.6);
            sc.fill(&m, PERSON, c, 1);
        }
    }
    let amp = sc.rng.gen_range(0.01..0.04);
    let mut rng = sc.rng.clone();
    sc.cv.noise(&mut rng, amp);
    (sc.cv, sc.labels)
}

pub(super) fn generate(out: &Path, seed: u64, p: &Ade20kParams) -> Result<(), DataError> {
    DataError::at_least("ade20k.size", p.size, 16, "pixels")?;
    for (split, tag, n) in [
        ("training", "train", p.train_images),
        ("validation", "val", p.val_images),
    ] {
        let idir = out.join("images").join(split);
        let adir = out.join("annotations").join(split);
        fs_err::create_dir_all(&idir)?;
        fs_err::create_dir_all(&adir)?;
        (0..n).into_par_iter().try_for_each(|i| {
            let (cv, labels) = render(seed, split, i, p.size as usize);
            let name = format!("ADE_{tag}_{:08}", i + 1);
            cv.save_jpeg(&idir.join(format!("{name}.jpg")), p.jpeg_quality)?;
            write_label_png(
                &adir.join(format!("{name}.png")),
                &LabelMap {
                    width: p.size,
                    height: p.size,
                    data: labels,
                },
            )
        })?;
    }
    Ok(())
}

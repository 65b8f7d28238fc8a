//! Synthetic ImageFolder: one class per shape structure; colour, position, scale, rotation,
//! background and noise are random so that colour alone does not identify the class.

use std::f64::consts::PI;
use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::draw::{self, Canvas, Mask, Pt};
use super::item_rng;
use crate::data::{DataError, DataFormat};

/// Class folder names, in generation order (labels follow the sorted order of the names used).
pub const CLASS_KINDS: [&str; 12] = [
    "circle", "square", "triangle", "star", "ring", "cross", "hexagon", "pair", "hstripes",
    "vstripes", "checker", "dots",
];

/// ImageFolder generator parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageFolderParams {
    /// Number of classes (1..=12), the first `classes` of [`CLASS_KINDS`].
    pub classes: usize,
    /// Training images per class.
    pub train_per_class: usize,
    /// Validation images per class.
    pub val_per_class: usize,
    /// Square image side in pixels.
    pub size: u32,
    /// JPEG quality of the written `.JPEG` files.
    pub jpeg_quality: u8,
}

impl Default for ImageFolderParams {
    fn default() -> Self {
        ImageFolderParams {
            classes: 10,
            train_per_class: 60,
            val_per_class: 20,
            size: 64,
            jpeg_quality: 90,
        }
    }
}

pub(super) fn generate(out: &Path, seed: u64, p: &ImageFolderParams) -> Result<(), DataError> {
    if p.classes == 0 || p.classes > CLASS_KINDS.len() {
        return Err(DataError::param(
            "imagefolder.classes",
            format!("{} not in 1..={}", p.classes, CLASS_KINDS.len()),
        ));
    }
    if p.size < 16 {
        return Err(DataError::param(
            "imagefolder.size",
            "must be at least 16 pixels",
        ));
    }
    for (split, per_class) in [("train", p.train_per_class), ("val", p.val_per_class)] {
        for kind in &CLASS_KINDS[..p.classes] {
            fs_err::create_dir_all(out.join(split).join(kind))?;
        }
        let n = p.classes * per_class;
        (0..n).into_par_iter().try_for_each(|i| {
            let (c, k) = (i % p.classes, i / p.classes);
            let mut rng = item_rng(seed, DataFormat::ImageFolder, split, i);
            let canvas = render(c, p.size as usize, &mut rng);
            let path = out
                .join(split)
                .join(CLASS_KINDS[c])
                .join(format!("{}_{:05}.JPEG", CLASS_KINDS[c], k));
            canvas.save_jpeg(&path, p.jpeg_quality)
        })?;
    }
    Ok(())
}

/// Render one image of class `class`.
fn render(class: usize, s: usize, rng: &mut ChaCha8Rng) -> Canvas {
    let sf = s as f64;
    let bg0 = draw::random_color(rng);
    let bg1 = draw::mix(bg0, draw::random_color(rng), 0.5);
    let mut cv = Canvas::gradient(s, s, bg0, bg1, rng.gen_range(0.0..2.0 * PI));
    let bg_mid = draw::mix(bg0, bg1, 0.5);
    let fg = draw::contrasting_color(rng, bg_mid, 0.25);
    let fg2 = draw::contrasting_color(rng, fg, 0.3);
    let r = sf * rng.gen_range(0.2..0.36);
    let cx = rng.gen_range(r * 0.9..sf - r * 0.9);
    let cy = rng.gen_range(r * 0.9..sf - r * 0.9);
    let rot = rng.gen_range(0.0..2.0 * PI);
    let polys: Vec<Vec<Pt>> = match CLASS_KINDS[class] {
        "circle" => vec![draw::place(&draw::regular(1.0, 48), cx, cy, r, r, 0.0)],
        "square" => vec![draw::place(
            &draw::rect(-0.8, -0.8, 0.8, 0.8),
            cx,
            cy,
            r,
            r,
            rot,
        )],
        "triangle" => vec![draw::place(&draw::regular(1.0, 3), cx, cy, r, r, rot)],
        "star" => vec![draw::place(&draw::star(1.0, 0.42, 5), cx, cy, r, r, rot)],
        "hexagon" => vec![draw::place(&draw::regular(1.0, 6), cx, cy, r, r, rot)],
        "cross" => {
            let a = draw::place(&draw::rect(-1.0, -0.3, 1.0, 0.3), cx, cy, r, r, rot);
            let b = draw::place(&draw::rect(-0.3, -1.0, 0.3, 1.0), cx, cy, r, r, rot);
            vec![a, b]
        }
        "pair" => {
            let d = 0.55;
            let a = draw::place(&draw::ellipse(-d, 0.0, 0.4, 0.4, 32), cx, cy, r, r, rot);
            let b = draw::place(&draw::ellipse(d, 0.0, 0.4, 0.4, 32), cx, cy, r, r, rot);
            vec![a, b]
        }
        "dots" => {
            let mut v = Vec::new();
            for gy in -1..=1 {
                for gx in -1..=1 {
                    v.push(draw::place(
                        &draw::ellipse(gx as f64 * 0.7, gy as f64 * 0.7, 0.2, 0.2, 16),
                        cx,
                        cy,
                        r,
                        r,
                        rot,
                    ));
                }
            }
            v
        }
        // Texture classes: a square patch filled by a pattern.
        _ => vec![draw::place(
            &draw::rect(-1.0, -1.0, 1.0, 1.0),
            cx,
            cy,
            r,
            r,
            rng.gen_range(-0.3..0.3),
        )],
    };
    let mut mask = draw::polygons_mask(s, s, &polys);
    if CLASS_KINDS[class] == "ring" {
        let outer = draw::polygons_mask(
            s,
            s,
            &[draw::place(&draw::regular(1.0, 48), cx, cy, r, r, 0.0)],
        );
        let inner = draw::polygons_mask(
            s,
            s,
            &[draw::place(&draw::regular(0.55, 48), cx, cy, r, r, 0.0)],
        );
        mask = Mask {
            w: s,
            h: s,
            data: outer
                .data
                .iter()
                .zip(&inner.data)
                .map(|(&o, &i)| o && !i)
                .collect(),
        };
    }
    let period = rng.gen_range(3.0..6.0) * (sf / 64.0).max(0.5);
    let phase = rng.gen_range(0.0..period);
    let tilt: f64 = rng.gen_range(-0.26..0.26);
    let (ts, tc) = tilt.sin_cos();
    match CLASS_KINDS[class] {
        "hstripes" | "vstripes" | "checker" => {
            let kind = CLASS_KINDS[class];
            cv.paint(&mask, |x, y| {
                let (u, v) = (
                    x as f64 * tc - y as f64 * ts + phase,
                    x as f64 * ts + y as f64 * tc + phase,
                );
                let on = match kind {
                    "hstripes" => (v / period).floor() as i64 % 2 == 0,
                    "vstripes" => (u / period).floor() as i64 % 2 == 0,
                    _ => ((u / period).floor() as i64 + (v / period).floor() as i64) % 2 == 0,
                };
                if on {
                    fg
                } else {
                    fg2
                }
            });
        }
        _ => {
            // Slight shading so objects are not flat.
            let shade = rng.gen_range(-0.15f32..0.15);
            cv.paint(&mask, |x, y| {
                let t = ((x as f64 - cx) + (y as f64 - cy)) / (2.0 * r);
                draw::mix(fg, [0.5, 0.5, 0.5], (shade * t as f32).abs())
            });
        }
    }
    let amp = rng.gen_range(0.02..0.08);
    cv.noise(rng, amp);
    cv
}

//! Synthetic ImageFolder: one class per shape structure; position, scale, rotation and noise are
//! random. In the `varied` style (the default) colours and a background gradient are random too,
//! so that colour alone does not identify the class; in the `gray` style the image is a light
//! gray shape on a dark gray ground (random levels), where the shape is most of what there is
//! to see (the style a short pretraining can learn from, as on real photographs of objects);
//! `mixed` draws every other image of each class in each style.

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
    /// How the images are coloured (not part of the key when `varied`, the default).
    pub style: Style,
}

/// How a synthetic ImageFolder's images are coloured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// Random colours for the shape and a random two-colour gradient behind it.
    #[default]
    Varied,
    /// A light gray shape (textures: light and mid gray) on a dark gray ground.
    Gray,
    /// Every other image of each class `gray`, the rest `varied`.
    Mixed,
}

impl Default for ImageFolderParams {
    fn default() -> Self {
        ImageFolderParams {
            classes: 10,
            train_per_class: 60,
            val_per_class: 20,
            size: 64,
            jpeg_quality: 90,
            style: Style::Varied,
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
    DataError::at_least("imagefolder.size", p.size, 16, "pixels")?;
    for (split, per_class) in [("train", p.train_per_class), ("val", p.val_per_class)] {
        for kind in &CLASS_KINDS[..p.classes] {
            fs_err::create_dir_all(out.join(split).join(kind))?;
        }
        let n = p.classes * per_class;
        (0..n).into_par_iter().try_for_each(|i| {
            let (c, k) = (i % p.classes, i / p.classes);
            let mut rng = item_rng(seed, DataFormat::ImageFolder, split, i);
            let canvas = render(c, p.size as usize, p.style.of_image(k), &mut rng);
            let path = out
                .join(split)
                .join(CLASS_KINDS[c])
                .join(format!("{}_{:05}.JPEG", CLASS_KINDS[c], k));
            canvas.save_jpeg(&path, p.jpeg_quality)
        })?;
    }
    Ok(())
}

impl Style {
    /// The style of the `k`-th image of a class.
    fn of_image(self, k: usize) -> Style {
        match self {
            Style::Mixed if k % 2 == 0 => Style::Gray,
            Style::Mixed => Style::Varied,
            s => s,
        }
    }
}

/// Render one image of class `class`.
fn render(class: usize, s: usize, style: Style, rng: &mut ChaCha8Rng) -> Canvas {
    let sf = s as f64;
    let (bg0, bg1, angle, fg, fg2) = match style {
        Style::Varied | Style::Mixed => {
            let bg0 = draw::random_color(rng);
            let bg1 = draw::mix(bg0, draw::random_color(rng), 0.5);
            let angle = rng.gen_range(0.0..2.0 * PI);
            let bg_mid = draw::mix(bg0, bg1, 0.5);
            let fg = draw::contrasting_color(rng, bg_mid, 0.25);
            let fg2 = draw::contrasting_color(rng, fg, 0.3);
            (bg0, bg1, angle, fg, fg2)
        }
        Style::Gray => {
            let bg = rng.gen_range(0.0f32..0.3);
            let fg = rng.gen_range(0.7f32..1.0);
            let fg2 = rng.gen_range(0.35f32..0.55);
            ([bg; 3], [bg; 3], 0.0, [fg; 3], [fg2; 3])
        }
    };
    let mut cv = Canvas::gradient(s, s, bg0, bg1, angle);
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Largest difference between two channels of one pixel.
    fn colour_spread(cv: &Canvas) -> f32 {
        cv.px
            .iter()
            .map(|p| (p[0] - p[1]).abs().max((p[1] - p[2]).abs()))
            .fold(0.0, f32::max)
    }

    #[test]
    fn gray_images_are_gray_and_varied_ones_are_coloured() {
        for class in 0..CLASS_KINDS.len() {
            let mut rng = ChaCha8Rng::seed_from_u64(class as u64);
            let gray = render(class, 32, Style::Gray, &mut rng);
            // only the per-channel noise (at most 0.08 each way) tells the channels apart
            assert!(colour_spread(&gray) <= 0.161, "{}", CLASS_KINDS[class]);
            let mut rng = ChaCha8Rng::seed_from_u64(class as u64);
            let varied = render(class, 32, Style::Varied, &mut rng);
            assert!(colour_spread(&varied) > 0.2, "{}", CLASS_KINDS[class]);
        }
    }

    #[test]
    fn mixed_alternates_the_styles_within_each_class() {
        let of: Vec<Style> = (0..4).map(|k| Style::Mixed.of_image(k)).collect();
        assert_eq!(of, [Style::Gray, Style::Varied, Style::Gray, Style::Varied]);
        assert_eq!(Style::Gray.of_image(1), Style::Gray);
        assert_eq!(Style::Varied.of_image(0), Style::Varied);
    }

    #[test]
    fn the_shape_stands_out_from_a_gray_ground() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let cv = render(0, 64, Style::Gray, &mut rng); // a circle
        let mut levels: Vec<f32> = cv.px.iter().map(|p| p[0]).collect();
        levels.sort_by(f32::total_cmp);
        let (dark, light) = (levels[levels.len() / 10], levels[levels.len() * 99 / 100]);
        assert!(light - dark > 0.3, "ground {dark}, shape {light}");
    }
}

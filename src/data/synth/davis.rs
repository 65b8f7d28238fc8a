//! Synthetic DAVIS-2017: sequences of textured objects that move, scale, rotate and occlude
//! each other over a slowly panning textured background. Frames are JPEGs, annotations 8-bit
//! palette PNGs (DAVIS palette, index = object id, 0 = background), plus `ImageSets/2017`.
//! Every object is fully visible in frame 0 (the given first-frame mask).

use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::draw::{self, Canvas, Pt, Rgb};
use super::item_rng;
use crate::data::davis::{davis_palette, write_palette_png, PaletteImage, RESOLUTION};
use crate::data::{DataError, DataFormat};

/// DAVIS generator parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DavisParams {
    /// Sequences listed in `train.txt`.
    pub train_sequences: usize,
    /// Sequences listed in `val.txt`.
    pub val_sequences: usize,
    /// Frames per sequence (at least 3: the metric skips the first and last).
    pub frames: usize,
    /// Frame height.
    pub height: u32,
    /// Frame width.
    pub width: u32,
    /// Maximum objects per sequence (1..=10).
    pub max_objects: usize,
    /// JPEG quality.
    pub jpeg_quality: u8,
}

impl Default for DavisParams {
    fn default() -> Self {
        DavisParams {
            train_sequences: 4,
            val_sequences: 3,
            frames: 8,
            height: 64,
            width: 96,
            max_objects: 3,
            jpeg_quality: 90,
        }
    }
}

const SHAPES: [&str; 6] = ["disc", "box", "star", "kite", "blob", "bar"];
const MOTIONS: [&str; 5] = ["drift", "bounce", "cross", "swap", "pass"];

/// Sequence name for global index `g` (unique across splits).
fn seq_name(g: usize) -> String {
    let n = SHAPES.len() * MOTIONS.len();
    let base = format!(
        "{}-{}",
        SHAPES[g % SHAPES.len()],
        MOTIONS[(g / SHAPES.len()) % MOTIONS.len()]
    );
    if g < n {
        base
    } else {
        format!("{base}-{}", g / n)
    }
}

struct Obj {
    shape: Vec<Pt>,
    pos: (f64, f64),
    vel: (f64, f64),
    r: f64,
    growth: f64,
    rot: f64,
    spin: f64,
    colors: (Rgb, Rgb),
    period: f64,
}

fn unit_shape(kind: usize, rng: &mut ChaCha8Rng) -> Vec<Pt> {
    match kind {
        0 => draw::regular(1.0, 32),
        1 => draw::rect(-0.8, -0.8, 0.8, 0.8),
        2 => draw::star(1.0, 0.5, 5),
        3 => vec![(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)],
        4 => (0..16)
            .map(|i| {
                let t = i as f64 / 16.0 * std::f64::consts::TAU;
                let r = rng.gen_range(0.7..1.0);
                (r * t.cos(), r * t.sin())
            })
            .collect(),
        _ => draw::rect(-1.0, -0.4, 1.0, 0.4),
    }
}

fn render_sequence(
    seed: u64,
    split: &str,
    i: usize,
    name: &str,
    root: &Path,
    p: &DavisParams,
) -> Result<(), DataError> {
    let mut rng = item_rng(seed, DataFormat::Davis, split, i);
    let (w, h) = (p.width as usize, p.height as usize);
    let (wf, hf) = (w as f64, h as f64);
    // Background larger than the frame, panned over time.
    let pan = (rng.gen_range(-1.5..1.5), rng.gen_range(-0.7..0.7));
    let margin = (p.frames as f64 * 1.5).ceil() as usize + 2;
    let (bw, bh) = (w + 2 * margin, h + 2 * margin);
    let mut bg = Canvas::gradient(
        bw,
        bh,
        draw::random_color(&mut rng),
        draw::random_color(&mut rng),
        rng.gen_range(0.0..6.3),
    );
    for _ in 0..12 {
        let (cx, cy) = (rng.gen_range(0.0..bw as f64), rng.gen_range(0.0..bh as f64));
        let r = rng.gen_range(2.0..hf * 0.2);
        let m = draw::polygons_mask(
            bw,
            bh,
            &[draw::place(
                &draw::regular(1.0, 7),
                cx,
                cy,
                r,
                r * 0.7,
                rng.gen_range(0.0..3.0),
            )],
        );
        let c = draw::random_color(&mut rng);
        bg.shade(&m, c, 0.5);
    }
    let n_obj = rng.gen_range(1..=p.max_objects.clamp(1, 10));
    let mut objs: Vec<Obj> = Vec::new();
    let mut attempts = 0;
    while objs.len() < n_obj && attempts < 200 {
        attempts += 1;
        let r = hf * rng.gen_range(0.12..0.22);
        let pos = (rng.gen_range(r..wf - r), rng.gen_range(r..hf - r));
        if objs.iter().any(|o| {
            ((o.pos.0 - pos.0).powi(2) + (o.pos.1 - pos.1).powi(2)).sqrt() < (o.r + r) * 1.05
        }) {
            continue;
        }
        // Later objects head towards an earlier one so that occlusions happen.
        let speed = rng.gen_range(0.03..0.08) * wf;
        let vel = match objs.first() {
            Some(o) if rng.gen_bool(0.7) => {
                let (dx, dy) = (o.pos.0 - pos.0, o.pos.1 - pos.1);
                let d = (dx * dx + dy * dy).sqrt().max(1e-6);
                (dx / d * speed, dy / d * speed)
            }
            _ => {
                let a: f64 = rng.gen_range(0.0..std::f64::consts::TAU);
                (a.cos() * speed, a.sin() * speed)
            }
        };
        let shape = unit_shape(rng.gen_range(0..SHAPES.len()), &mut rng);
        let c0 = draw::random_color(&mut rng);
        let c1 = draw::contrasting_color(&mut rng, c0, 0.2);
        objs.push(Obj {
            shape,
            pos,
            vel,
            r,
            growth: rng.gen_range(-0.03..0.03),
            rot: rng.gen_range(0.0..6.3),
            spin: rng.gen_range(-0.15..0.15),
            colors: (c0, c1),
            period: rng.gen_range(2.5..5.0),
        });
    }
    // Painting order (depth): a random permutation of object ids.
    let mut order: Vec<usize> = (0..objs.len()).collect();
    for k in (1..order.len()).rev() {
        order.swap(k, rng.gen_range(0..=k));
    }
    let fdir = root.join("JPEGImages").join(RESOLUTION).join(name);
    let adir = root.join("Annotations").join(RESOLUTION).join(name);
    fs_err::create_dir_all(&fdir)?;
    fs_err::create_dir_all(&adir)?;
    let palette = davis_palette();
    for t in 0..p.frames {
        let (ox, oy) = (
            (margin as f64 + pan.0 * t as f64) as usize,
            (margin as f64 + pan.1 * t as f64) as usize,
        );
        let mut cv = Canvas::new(w, h, [0.0; 3]);
        for y in 0..h {
            for x in 0..w {
                cv.px[y * w + x] = bg.px[(y + oy).min(bh - 1) * bw + (x + ox).min(bw - 1)];
            }
        }
        let mut ids = vec![0u8; w * h];
        for &k in &order {
            let o = &objs[k];
            let tf = t as f64;
            let s = o.r * (1.0 + o.growth * tf);
            let (cx, cy) = (
                bounce(o.pos.0, o.vel.0 * tf, o.r, wf),
                bounce(o.pos.1, o.vel.1 * tf, o.r, hf),
            );
            let ang = o.rot + o.spin * tf;
            let m = draw::polygons_mask(w, h, &[draw::place(&o.shape, cx, cy, s, s, ang)]);
            let (sa, ca) = ang.sin_cos();
            cv.paint(&m, |x, y| {
                let u = (x as f64 - cx) * ca + (y as f64 - cy) * sa;
                if (u / o.period).floor() as i64 % 2 == 0 {
                    o.colors.0
                } else {
                    o.colors.1
                }
            });
            for (v, &b) in ids.iter_mut().zip(&m.data) {
                if b {
                    *v = k as u8 + 1;
                }
            }
        }
        let amp = rng.gen_range(0.01..0.03);
        cv.noise(&mut rng, amp);
        cv.save_jpeg(&fdir.join(format!("{t:05}.jpg")), p.jpeg_quality)?;
        let ann = PaletteImage {
            width: p.width,
            height: p.height,
            indices: ids,
            palette: palette.clone(),
        };
        write_palette_png(&adir.join(format!("{t:05}.png")), &ann)?;
    }
    Ok(())
}

/// Position `p0 + d` reflected at the borders `[r, len - r]` (objects bounce off the frame edge).
fn bounce(p0: f64, d: f64, r: f64, len: f64) -> f64 {
    let (lo, hi) = (r, (len - r).max(r + 1e-6));
    let span = hi - lo;
    let t = (p0 + d - lo).rem_euclid(2.0 * span);
    lo + if t <= span { t } else { 2.0 * span - t }
}

pub(super) fn generate(out: &Path, seed: u64, p: &DavisParams) -> Result<(), DataError> {
    let why = "frames (the metric skips the first and the last)";
    DataError::at_least("davis.frames", p.frames, 3, why)?;
    DataError::at_least("davis.height/width", p.height.min(p.width), 16, "pixels")?;
    let sets = root_sets(out)?;
    let mut g = 0;
    for (split, n) in [("train", p.train_sequences), ("val", p.val_sequences)] {
        let names: Vec<String> = (g..g + n).map(seq_name).collect();
        g += n;
        names
            .par_iter()
            .enumerate()
            .try_for_each(|(i, name)| render_sequence(seed, split, i, name, out, p))?;
        let mut text = names.join("\n");
        text.push('\n');
        fs_err::write(sets.join(format!("{split}.txt")), text)?;
    }
    Ok(())
}

fn root_sets(out: &Path) -> Result<std::path::PathBuf, DataError> {
    let sets = out.join("ImageSets").join("2017");
    fs_err::create_dir_all(&sets)?;
    Ok(sets)
}

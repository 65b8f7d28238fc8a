//! Synthetic CLEVR: 3..10 objects (sphere / cube / cylinder, 8 CLEVR colours, rubber / metal,
//! large / small) on a ground plane seen by a pinhole camera. An object at camera depth `D`
//! appears with radius `f * r / D` and its ground contact at row `v0 + b / D`, so both the count
//! and the closest depth (`pixel_coords[2]`) are visible in the image. The number of objects and
//! the Dist bucket of the closest object are drawn uniformly, so both tasks are balanced.

use std::path::Path;

use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::draw::{self, Canvas, Rgb};
use super::item_rng;
use crate::data::clevr::{scenes_path, ClevrObject, ClevrScene, ClevrScenes};
use crate::data::{DataError, DataFormat};

/// CLEVR generator parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClevrParams {
    /// Scenes in `train`.
    pub train_images: usize,
    /// Scenes in `val`.
    pub val_images: usize,
    /// Image width (CLEVR's aspect is 3:2).
    pub width: u32,
    /// Image height.
    pub height: u32,
}

impl Default for ClevrParams {
    fn default() -> Self {
        ClevrParams {
            train_images: 200,
            val_images: 60,
            width: 96,
            height: 64,
        }
    }
}

const COLORS: [(&str, [u8; 3]); 8] = [
    ("gray", [87, 87, 87]),
    ("red", [173, 35, 35]),
    ("blue", [42, 75, 215]),
    ("green", [29, 105, 20]),
    ("brown", [129, 74, 25]),
    ("purple", [129, 38, 192]),
    ("cyan", [41, 208, 208]),
    ("yellow", [255, 238, 51]),
];
const SHAPES: [&str; 3] = ["cube", "sphere", "cylinder"];
/// Closest-depth ranges per Dist bucket (kept away from the thresholds).
const BUCKETS: [(f64, f64); 6] = [
    (7.0, 7.95),
    (8.05, 8.45),
    (8.55, 8.95),
    (9.05, 9.45),
    (9.55, 9.95),
    (10.05, 12.0),
];
const MAX_DEPTH: f64 = 14.0;

/// Camera for an image of height `h` and width `w`: focal length, principal column, ground row law.
struct Camera {
    f: f64,
    cx: f64,
    v0: f64,
    b: f64,
}

impl Camera {
    fn new(w: f64, h: f64) -> Self {
        let k = h / 64.0;
        Camera {
            f: 137.0 * k,
            cx: w / 2.0,
            v0: -25.07 * k,
            b: 581.5 * k,
        }
    }
    /// Image position of the centre of an object of radius `r` at lateral `x`, depth `d`.
    fn project(&self, x: f64, d: f64, r: f64) -> (f64, f64, f64) {
        let rp = self.f * r / d;
        (self.cx + self.f * x / d, self.v0 + self.b / d - rp, rp)
    }
}

fn render_scene(
    seed: u64,
    split: &str,
    i: usize,
    p: &ClevrParams,
    dir: &Path,
) -> Result<ClevrScene, DataError> {
    let mut rng = item_rng(seed, DataFormat::Clevr, split, i);
    let (w, h) = (p.width as f64, p.height as f64);
    let cam = Camera::new(w, h);
    let n = rng.gen_range(3..=10usize);
    let bucket = BUCKETS[rng.gen_range(0..BUCKETS.len())];
    let d_min = rng.gen_range(bucket.0..bucket.1) as f32 as f64;
    // (lateral x, depth, radius, u, v, apparent radius)
    let mut placed: Vec<(f64, f64, f64, f64, f64, f64)> = Vec::new();
    let mut tries = 0;
    while placed.len() < n {
        tries += 1;
        if tries > 30_000 {
            return Err(DataError::param(
                "clevr.width/height",
                "cannot place the objects; use a wider image (CLEVR is 3:2)",
            ));
        }
        if tries % 300 == 0 {
            placed.clear(); // start over; keeps n and d_min
        }
        let d = if placed.is_empty() {
            d_min
        } else {
            (rng.gen_range(d_min + 0.05..MAX_DEPTH) as f32) as f64
        };
        let r = if rng.gen_bool(0.5) { 0.7 } else { 0.35 };
        let half = (w / 2.0 - 2.0) * d / cam.f - r;
        if half <= 0.0 {
            continue;
        }
        let x = rng.gen_range(-half..half);
        let (u, v, rp) = cam.project(x, d, r);
        if v - rp < 0.0 || v + rp > h {
            continue;
        }
        if placed
            .iter()
            .any(|o| ((o.3 - u).powi(2) + (o.4 - v).powi(2)).sqrt() < (o.5 + rp) * 0.95)
        {
            continue;
        }
        placed.push((x, d, r, u, v, rp));
    }
    for k in (1..placed.len()).rev() {
        placed.swap(k, rng.gen_range(0..=k));
    }
    // Ground: lighter far away, plus noise.
    let g0 = rng.gen_range(0.55..0.7);
    let mut cv = Canvas::gradient(
        p.width as usize,
        p.height as usize,
        [g0 + 0.1; 3],
        [g0 - 0.15; 3],
        std::f64::consts::FRAC_PI_2,
    );
    let mut objects = Vec::new();
    let mut order: Vec<usize> = (0..placed.len()).collect();
    order.sort_by(|&a, &b| placed[b].1.total_cmp(&placed[a].1)); // far to near
    let mut drawn: Vec<Option<ClevrObject>> = vec![None; placed.len()];
    for &k in &order {
        let (x, d, r, u, v, rp) = placed[k];
        let shape = SHAPES[rng.gen_range(0..3)];
        let (cname, c) = COLORS[rng.gen_range(0..COLORS.len())];
        let metal = rng.gen_bool(0.5);
        let rotation = rng.gen_range(0.0..360.0);
        draw_object(
            &mut cv,
            shape,
            [
                c[0] as f32 / 255.0,
                c[1] as f32 / 255.0,
                c[2] as f32 / 255.0,
            ],
            metal,
            u,
            v,
            rp,
            rotation,
        );
        drawn[k] = Some(ClevrObject {
            color: cname.into(),
            size: if r > 0.5 { "large" } else { "small" }.into(),
            rotation,
            shape: shape.into(),
            coords_3d: [x, d - 10.0, r],
            material: if metal { "metal" } else { "rubber" }.into(),
            pixel_coords: [u.round(), v.round(), d],
        });
    }
    objects.extend(drawn.into_iter().flatten());
    let amp = rng.gen_range(0.01..0.03);
    cv.noise(&mut rng, amp);
    let image_filename = format!("CLEVR_{split}_{i:06}.png");
    cv.save_png(&dir.join(&image_filename))?;
    let (relationships, directions) = relations(&objects);
    Ok(ClevrScene {
        split: split.into(),
        image_index: i as u64,
        image_filename,
        objects,
        relationships,
        directions,
    })
}

#[allow(clippy::too_many_arguments)]
fn draw_object(
    cv: &mut Canvas,
    shape: &str,
    c: Rgb,
    metal: bool,
    u: f64,
    v: f64,
    rp: f64,
    rotation: f64,
) {
    let (w, h) = (cv.w, cv.h);
    // Shadow on the ground, offset to the lower right.
    let sh = draw::polygons_mask(
        w,
        h,
        &[draw::ellipse(
            u + rp * 0.35,
            v + rp * 0.8,
            rp * 1.05,
            rp * 0.35,
            20,
        )],
    );
    cv.shade(&sh, [0.0; 3], 0.35);
    let dark = draw::mix(c, [0.0; 3], 0.35);
    let light = draw::mix(c, [1.0; 3], if metal { 0.55 } else { 0.2 });
    match shape {
        "sphere" => {
            let m = draw::polygons_mask(
                w,
                h,
                &[draw::regular(1.0, 32)
                    .iter()
                    .map(|&(a, b)| (u + a * rp, v + b * rp))
                    .collect()],
            );
            cv.paint(&m, |x, y| {
                let (dx, dy) = ((x as f64 + 0.5 - u) / rp, (y as f64 + 0.5 - v) / rp);
                let t = ((dx + 0.4).powi(2) + (dy + 0.4).powi(2)).sqrt() / 1.5;
                if metal && t < 0.2 {
                    light
                } else {
                    draw::mix(c, dark, t.clamp(0.0, 1.0) as f32)
                }
            });
        }
        "cube" => {
            let ang = rotation.to_radians() * 0.25;
            let m = draw::polygons_mask(
                w,
                h,
                &[draw::place(
                    &draw::rect(-0.85, -0.85, 0.85, 0.85),
                    u,
                    v,
                    rp,
                    rp,
                    ang,
                )],
            );
            cv.paint(
                &m,
                |_, y| if (y as f64) < v - rp * 0.35 { light } else { c },
            );
        }
        _ => {
            let body = draw::rect(u - rp * 0.85, v - rp * 0.6, u + rp * 0.85, v + rp * 0.85);
            let m = draw::polygons_mask(
                w,
                h,
                &[
                    body,
                    draw::ellipse(u, v + rp * 0.85, rp * 0.85, rp * 0.25, 20),
                ],
            );
            cv.paint(&m, |x, _| {
                if ((x as f64 - u) / rp).abs() > 0.6 {
                    dark
                } else {
                    c
                }
            });
            let top = draw::polygons_mask(
                w,
                h,
                &[draw::ellipse(u, v - rp * 0.6, rp * 0.85, rp * 0.3, 20)],
            );
            cv.paint(&top, |_, _| light);
        }
    }
}

/// CLEVR `relationships` (eps 0.2 along each direction) and `directions`.
fn relations(objs: &[ClevrObject]) -> (Value, Value) {
    let dirs: [(&str, [f64; 3]); 4] = [
        ("behind", [0.0, 1.0, 0.0]),
        ("front", [0.0, -1.0, 0.0]),
        ("left", [-1.0, 0.0, 0.0]),
        ("right", [1.0, 0.0, 0.0]),
    ];
    let mut rel = Map::new();
    for (name, dv) in dirs {
        let lists: Vec<Vec<usize>> = objs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                (0..objs.len())
                    .filter(|&j| j != i)
                    .filter(|&j| {
                        (0..3)
                            .map(|k| (objs[j].coords_3d[k] - a.coords_3d[k]) * dv[k])
                            .sum::<f64>()
                            > 0.2
                    })
                    .collect()
            })
            .collect();
        rel.insert(name.into(), json!(lists));
    }
    let directions = json!({
        "behind": [0.0, 1.0, 0.0], "front": [0.0, -1.0, 0.0], "left": [-1.0, 0.0, 0.0],
        "right": [1.0, 0.0, 0.0], "above": [0.0, 0.0, 1.0], "below": [0.0, 0.0, -1.0]
    });
    (Value::Object(rel), directions)
}

pub(super) fn generate(out: &Path, seed: u64, p: &ClevrParams) -> Result<(), DataError> {
    DataError::at_least("clevr.width/height", p.width.min(p.height), 32, "pixels")?;
    fs_err::create_dir_all(out.join("scenes"))?;
    for (split, n) in [("train", p.train_images), ("val", p.val_images)] {
        let dir = out.join("images").join(split);
        fs_err::create_dir_all(&dir)?;
        let scenes: Vec<ClevrScene> = (0..n)
            .into_par_iter()
            .map(|i| render_scene(seed, split, i, p, &dir))
            .collect::<Result<_, _>>()?;
        let info = json!({"split": split, "license": "synthetic data generated by cjepa", "version": "1.0", "date": "synthetic"});
        let file = ClevrScenes { info, scenes };
        DataError::write_json(&scenes_path(out, split), "CLEVR scenes", &file)?;
    }
    Ok(())
}

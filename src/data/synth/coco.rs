//! Synthetic COCO: scenes of five shape categories with non-contiguous ids, polygon masks
//! (some objects with two polygons), crowd regions as uncompressed column-major RLE and objects
//! in all three COCO area ranges (< 32², 32²..96², > 96²).
//!
//! `area` of a polygon object is the sum of its polygons' shoelace areas (the polygons of one
//! object never overlap), `bbox` the tight box of its vertices; a crowd region's `area` is its
//! pixel count and its `bbox` the tight box of its pixels.

use std::f64::consts::PI;
use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::draw::{self, Canvas, Mask, Pt, Rgb};
use super::item_rng;
use crate::data::coco::{
    CocoAnnotation, CocoCategory, CocoDataset, CocoFile, CocoImage, Rle, RleCounts, Segmentation,
};
use crate::data::{DataError, DataFormat};

/// `(id, name, supercategory)` of the synthetic categories (ids deliberately not contiguous).
pub const SYNTH_CATEGORIES: [(u64, &str, &str); 5] = [
    (1, "person", "person"),
    (3, "car", "vehicle"),
    (7, "train", "vehicle"),
    (18, "dog", "animal"),
    (44, "bottle", "kitchen"),
];

/// Base hue of each category (colour is a weak cue; shape is the strong one).
const HUES: [f64; 5] = [20.0, 220.0, 120.0, 35.0, 180.0];

/// COCO generator parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CocoParams {
    /// Images in `train2017`.
    pub train_images: usize,
    /// Images in `val2017`.
    pub val_images: usize,
    /// Image width.
    pub width: u32,
    /// Image height (with `width`, large enough for objects above 96² pixels).
    pub height: u32,
    /// Maximum non-crowd objects per image (at least 1).
    pub max_objects: usize,
    /// Probability that an image holds a crowd region.
    pub crowd_prob: f64,
    /// JPEG quality.
    pub jpeg_quality: u8,
}

impl Default for CocoParams {
    fn default() -> Self {
        CocoParams {
            train_images: 64,
            val_images: 16,
            width: 160,
            height: 128,
            max_objects: 6,
            crowd_prob: 0.3,
            jpeg_quality: 90,
        }
    }
}

/// Unit shape of a category: polygons with bounding extent about 1.
fn unit_shape(cat: usize) -> Vec<Vec<Pt>> {
    match cat {
        // person: head + body (two polygons)
        0 => vec![
            draw::ellipse(0.0, -0.32, 0.18, 0.18, 16),
            draw::ellipse(0.0, 0.16, 0.24, 0.30, 20),
        ],
        // car: body + cabin silhouette
        1 => vec![vec![
            (-0.5, 0.3),
            (0.5, 0.3),
            (0.5, 0.0),
            (0.3, -0.02),
            (0.18, -0.3),
            (-0.2, -0.3),
            (-0.3, -0.02),
            (-0.5, 0.0),
        ]],
        // train: long box with a sloped front
        2 => vec![vec![
            (-0.5, -0.2),
            (0.36, -0.2),
            (0.5, 0.0),
            (0.5, 0.2),
            (-0.5, 0.2),
        ]],
        // dog: body + head (two polygons)
        3 => vec![
            draw::ellipse(-0.05, 0.08, 0.3, 0.16, 20),
            draw::ellipse(0.32, -0.12, 0.13, 0.13, 14),
        ],
        // bottle: body + neck
        _ => vec![vec![
            (-0.16, 0.5),
            (0.16, 0.5),
            (0.16, -0.15),
            (0.06, -0.25),
            (0.06, -0.5),
            (-0.06, -0.5),
            (-0.06, -0.25),
            (-0.16, -0.15),
        ]],
    }
}

struct Obj {
    cat: usize,
    polys: Vec<Vec<Pt>>,
    area: f64,
    color: Rgb,
}

fn polys_area(polys: &[Vec<Pt>]) -> f64 {
    polys.iter().map(|p| draw::shoelace(p)).sum()
}

fn round2(polys: Vec<Vec<Pt>>) -> Vec<Vec<Pt>> {
    polys
        .into_iter()
        .map(|p| {
            p.into_iter()
                .map(|(x, y)| ((x * 100.0).round() / 100.0, (y * 100.0).round() / 100.0))
                .collect()
        })
        .filter(|p: &Vec<Pt>| p.len() >= 3 && draw::shoelace(p) > 0.5)
        .collect()
}

/// Sample one object whose area falls in range `range` (0 small, 1 medium, 2 large) if possible.
fn sample_object(rng: &mut ChaCha8Rng, w: f64, h: f64, range: usize) -> Option<Obj> {
    for _ in 0..40 {
        let cat = rng.gen_range(0..SYNTH_CATEGORIES.len());
        let unit = unit_shape(cat);
        let (sx, sy) = (rng.gen_range(0.85..1.2), rng.gen_range(0.85..1.2));
        let flip = if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
        let rot = rng.gen_range(-0.25..0.25);
        let unit_area = polys_area(&unit) * sx * sy;
        let target = match range {
            0 => rng.gen_range(60.0..900.0),
            1 => rng.gen_range(1300.0..8000.0),
            _ => rng.gen_range(11000.0..(0.8 * w * h).max(11001.0)),
        };
        let s = (target / unit_area).sqrt();
        let (cx, cy) = (
            rng.gen_range(0.1 * w..0.9 * w),
            rng.gen_range(0.1 * h..0.9 * h),
        );
        let polys: Vec<Vec<Pt>> = unit
            .iter()
            .map(|p| draw::clip_to_rect(&draw::place(p, cx, cy, flip * s * sx, s * sy, rot), w, h))
            .collect();
        let polys = round2(polys);
        let area = polys_area(&polys);
        let ok = match range {
            0 => area > 20.0 && area < 1024.0,
            1 => area > 1024.0 && area < 9216.0,
            _ => area > 9216.0,
        };
        if ok {
            let hue = HUES[cat] + rng.gen_range(-50.0..50.0);
            let color = draw::hsv(hue, rng.gen_range(0.4..0.95), rng.gen_range(0.35..0.95));
            return Some(Obj {
                cat,
                polys,
                area,
                color,
            });
        }
    }
    None
}

fn bbox_of(polys: &[Vec<Pt>]) -> [f64; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
    for &(x, y) in polys.iter().flatten() {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    [x0, y0, x1 - x0, y1 - y0]
}

/// A cluster of tiny people: its mask and drawing polygons.
fn crowd(rng: &mut ChaCha8Rng, w: f64, h: f64) -> Vec<Vec<Pt>> {
    let (rw, rh) = (rng.gen_range(0.25..0.4) * w, rng.gen_range(0.2..0.3) * h);
    let (x0, y0) = (rng.gen_range(0.0..w - rw), rng.gen_range(0.0..h - rh));
    let mut polys = Vec::new();
    for _ in 0..rng.gen_range(6..14) {
        let s = rng.gen_range(9.0..15.0);
        let (cx, cy) = (x0 + rng.gen_range(0.0..rw), y0 + rng.gen_range(0.0..rh));
        for p in unit_shape(0) {
            polys.push(draw::clip_to_rect(
                &draw::place(&p, cx, cy, s, s, 0.0),
                w,
                h,
            ));
        }
    }
    polys
}

struct Rendered {
    image: CocoImage,
    anns: Vec<(usize, Segmentation, f64, [f64; 4], u8)>,
}

fn render_image(
    seed: u64,
    split: &str,
    i: usize,
    id: u64,
    p: &CocoParams,
    dir: &Path,
) -> Result<Rendered, DataError> {
    let mut rng = item_rng(seed, DataFormat::Coco, split, i);
    let (wu, hu) = (p.width as usize, p.height as usize);
    let (w, h) = (p.width as f64, p.height as f64);
    let bg0 = draw::hsv_in(&mut rng, 0.0..360.0, 0.0..0.4, 0.3..0.9);
    let bg1 = draw::mix(bg0, draw::random_color(&mut rng), 0.4);
    let mut cv = Canvas::gradient(wu, hu, bg0, bg1, rng.gen_range(0.0..2.0 * PI));
    // Unannotated clutter.
    for _ in 0..rng.gen_range(0..4) {
        let (cx, cy) = (rng.gen_range(0.0..w), rng.gen_range(0.0..h));
        let r = draw::place(
            &draw::rect(-1.0, -1.0, 1.0, 1.0),
            cx,
            cy,
            rng.gen_range(3.0..12.0),
            rng.gen_range(3.0..12.0),
            0.0,
        );
        let c = draw::mix(bg0, draw::random_color(&mut rng), 0.3);
        cv.paint(&draw::polygons_mask(wu, hu, &[r]), |_, _| c);
    }
    let n = rng.gen_range(1..=p.max_objects.max(1));
    let mut objs = Vec::new();
    for k in 0..n {
        // The first object cycles through the three ranges so every split has all of them.
        let range = if k == 0 {
            i % 3
        } else {
            [0, 0, 1, 1, 2][rng.gen_range(0..5)]
        };
        let range = if range == 2 && objs.iter().any(|o: &Obj| o.area > 9216.0) {
            1
        } else {
            range
        };
        if let Some(o) = sample_object(&mut rng, w, h, range) {
            objs.push(o);
        }
    }
    objs.sort_by(|a, b| b.area.total_cmp(&a.area)); // paint large first
    let mut anns = Vec::new();
    for o in &objs {
        let m = draw::polygons_mask(wu, hu, &o.polys);
        let (c2, stripe) = (
            draw::mix(o.color, [1.0, 1.0, 1.0], 0.3),
            rng.gen_range(3.0..8.0),
        );
        cv.paint(&m, |x, y| {
            if ((x + y) as f64 / stripe) as i64 % 2 == 0 {
                o.color
            } else {
                c2
            }
        });
        let flat: Vec<Vec<f64>> = o
            .polys
            .iter()
            .map(|p| p.iter().flat_map(|&(x, y)| [x, y]).collect())
            .collect();
        anns.push((
            o.cat,
            Segmentation::Polygons(flat),
            o.area,
            bbox_of(&o.polys),
            0u8,
        ));
    }
    if rng.gen_bool(p.crowd_prob.clamp(0.0, 1.0)) {
        let polys = crowd(&mut rng, w, h);
        let mut m = Mask::new(wu, hu);
        let color = draw::hsv(HUES[0] + rng.gen_range(-40.0..40.0), 0.6, 0.7);
        for poly in &polys {
            let pm = draw::polygons_mask(wu, hu, std::slice::from_ref(poly));
            cv.paint(&pm, |_, _| color);
            m.union(&pm);
        }
        if m.area() > 0 {
            let rle = Rle {
                size: [p.height, p.width],
                counts: RleCounts::Uncompressed(m.rle_counts()),
            };
            anns.push((0, Segmentation::Rle(rle), m.area() as f64, m.bbox(), 1u8));
        }
    }
    let amp = rng.gen_range(0.01..0.05);
    cv.noise(&mut rng, amp);
    let file_name = format!("{id:012}.jpg");
    cv.save_jpeg(&dir.join(&file_name), p.jpeg_quality)?;
    let image = CocoImage {
        id,
        width: p.width,
        height: p.height,
        file_name,
        extra: Default::default(),
    };
    Ok(Rendered { image, anns })
}

pub(super) fn generate(out: &Path, seed: u64, p: &CocoParams) -> Result<(), DataError> {
    let side = p.width.min(p.height);
    DataError::at_least(
        "coco.width/height",
        side,
        96,
        "so that large (> 96²) objects fit",
    )?;
    fs_err::create_dir_all(out.join("annotations"))?;
    for (split, n, id0) in [
        ("train", p.train_images, 100u64),
        ("val", p.val_images, 500_000u64),
    ] {
        let dir = CocoDataset::image_dir(out, split);
        fs_err::create_dir_all(&dir)?;
        let rendered: Vec<Rendered> = (0..n)
            .into_par_iter()
            .map(|i| render_image(seed, split, i, id0 + 7 * i as u64 + (i as u64 % 3), p, &dir))
            .collect::<Result<_, _>>()?;
        let mut file = CocoFile {
            info: Some(
                serde_json::json!({"description": "cjepa synthetic COCO-format dataset", "version": "1.0", "year": 2017, "seed": seed}),
            ),
            licenses: Vec::new(),
            images: Vec::new(),
            annotations: Vec::new(),
            categories: SYNTH_CATEGORIES
                .iter()
                .map(|&(id, name, sup)| CocoCategory {
                    id,
                    name: name.into(),
                    supercategory: sup.into(),
                })
                .collect(),
        };
        for r in rendered {
            for (cat, seg, area, bbox, iscrowd) in r.anns {
                let id = file.annotations.len() as u64 + 1;
                file.annotations.push(CocoAnnotation {
                    id,
                    image_id: r.image.id,
                    category_id: SYNTH_CATEGORIES[cat].0,
                    segmentation: Some(seg),
                    area,
                    bbox,
                    iscrowd,
                });
            }
            file.images.push(r.image);
        }
        file.save(&CocoDataset::annotation_path(out, split))?;
    }
    Ok(())
}

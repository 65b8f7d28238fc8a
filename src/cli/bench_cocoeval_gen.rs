//! The synthetic val2017-sized COCO problem of `cjepa bench cocoeval`: images of COCO sizes, about
//! 7.2 ground truths per image over the 80 COCO category ids (polygons, ~1% crowd regions with
//! uncompressed RLE), and a fixed number of scored detections per image with compressed RLE
//! masks: jittered copies of the ground truths (some with the wrong class) plus random false
//! positives. Every image draws from its own `stage_rng` stream, so the files are identical for
//! one seed whatever the thread count.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use cjepa::eval::coco::rle_from_polygon;
use cjepa::util::rng::stage_rng;

/// The 80 COCO category ids (1..=90 with the 10 unused ids left out).
pub fn coco_category_ids() -> Vec<i64> {
    const UNUSED: [i64; 10] = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83];
    (1..=90).filter(|i| !UNUSED.contains(i)).collect()
}

/// `images[]` entry.
#[derive(Serialize)]
pub struct Image {
    pub id: i64,
    pub width: usize,
    pub height: usize,
    pub file_name: String,
}

/// `categories[]` entry.
#[derive(Serialize)]
pub struct Category {
    pub id: i64,
    pub name: String,
    pub supercategory: String,
}

/// A ground-truth segmentation: polygons, or an uncompressed RLE for crowd regions.
#[derive(Serialize)]
#[serde(untagged)]
pub enum GtSeg {
    Polygons(Vec<Vec<f64>>),
    Rle { size: [usize; 2], counts: Vec<u32> },
}

/// `annotations[]` entry.
#[derive(Serialize)]
pub struct Annotation {
    pub id: i64,
    pub image_id: i64,
    pub category_id: i64,
    pub segmentation: GtSeg,
    pub area: f64,
    pub bbox: [f64; 4],
    pub iscrowd: u8,
}

/// A compressed RLE as in results files.
#[derive(Serialize)]
pub struct CompressedRle {
    pub size: [usize; 2],
    pub counts: String,
}

/// One entry of the results list.
#[derive(Serialize)]
pub struct Detection {
    pub image_id: i64,
    pub category_id: i64,
    pub bbox: [f64; 4],
    pub score: f64,
    pub segmentation: CompressedRle,
}

/// A COCO instances file.
#[derive(Serialize)]
pub struct Instances {
    pub info: serde_json::Value,
    pub licenses: Vec<serde_json::Value>,
    pub images: Vec<Image>,
    pub annotations: Vec<Annotation>,
    pub categories: Vec<Category>,
}

/// The generated problem.
pub struct Problem {
    pub gt: Instances,
    pub dets: Vec<Detection>,
}

/// An ellipse-like object: centre, radii.
#[derive(Clone, Copy)]
struct Shape {
    cx: f64,
    cy: f64,
    rx: f64,
    ry: f64,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A polygon of 8..=24 vertices around the ellipse, radii jittered, clipped to the image.
fn polygon(s: Shape, w: usize, h: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let n = rng.gen_range(8..=24);
    let mut xy = Vec::with_capacity(2 * n);
    for i in 0..n {
        let a = std::f64::consts::TAU * i as f64 / n as f64;
        let j = rng.gen_range(0.8..1.0);
        xy.push(round2((s.cx + j * s.rx * a.cos()).clamp(0.0, w as f64)));
        xy.push(round2((s.cy + j * s.ry * a.sin()).clamp(0.0, h as f64)));
    }
    xy
}

fn bounds(xy: &[f64]) -> [f64; 4] {
    let xs = xy.iter().step_by(2);
    let ys = xy.iter().skip(1).step_by(2);
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    [x0, y0, round2(x1 - x0), round2(y1 - y0)]
}

/// Shoelace area of a polygon (COCO's `area` of polygon annotations).
fn shoelace(xy: &[f64]) -> f64 {
    let n = xy.len() / 2;
    let mut s = 0.0;
    for i in 0..n {
        let j = (i + 1) % n;
        s += xy[2 * i] * xy[2 * j + 1] - xy[2 * j] * xy[2 * i + 1];
    }
    round2(s.abs() / 2.0)
}

/// A random object: side `sqrt(area)` log-uniform in 8..400 px (about 35% small, 28% medium,
/// 37% large), aspect ratio in e^[-0.7, 0.7], centre inside the image.
fn random_shape(w: usize, h: usize, rng: &mut ChaCha8Rng) -> Shape {
    let side = rng.gen_range(8f64.ln()..400f64.ln()).exp();
    let ar = rng.gen_range(-0.7..0.7f64).exp();
    let (bw, bh) = ((side * ar).min(w as f64), (side / ar).min(h as f64));
    Shape {
        cx: rng.gen_range(bw / 2.0..=w as f64 - bw / 2.0),
        cy: rng.gen_range(bh / 2.0..=h as f64 - bh / 2.0),
        rx: bw / 2.0,
        ry: bh / 2.0,
    }
}

/// A detection of `s` with relative localisation noise `noise`.
fn jitter(s: Shape, noise: f64, rng: &mut ChaCha8Rng) -> Shape {
    let mut d = |r: f64| r * rng.gen_range(-noise..=noise);
    Shape {
        cx: s.cx + d(s.rx),
        cy: s.cy + d(s.ry),
        rx: (s.rx * (1.0 + d(1.0))).max(1.0),
        ry: (s.ry * (1.0 + d(1.0))).max(1.0),
    }
}

fn detection(
    image: &Image,
    category_id: i64,
    s: Shape,
    score: f64,
    rng: &mut ChaCha8Rng,
) -> Detection {
    let (w, h) = (image.width, image.height);
    let rle = rle_from_polygon(&polygon(s, w, h, rng), h, w);
    // A box regressed separately from the mask: the ellipse's box, clipped.
    let (x0, y0) = ((s.cx - s.rx).max(0.0), (s.cy - s.ry).max(0.0));
    let (x1, y1) = ((s.cx + s.rx).min(w as f64), (s.cy + s.ry).min(h as f64));
    Detection {
        image_id: image.id,
        category_id,
        bbox: [
            round2(x0),
            round2(y0),
            round2((x1 - x0).max(0.0)),
            round2((y1 - y0).max(0.0)),
        ],
        score: (score.clamp(0.001, 1.0) * 1e4).round() / 1e4,
        segmentation: CompressedRle {
            size: [h, w],
            counts: rle.to_compressed(),
        },
    }
}

/// Ground truths and detections of image number `i`.
fn image_objects(
    image: &Image,
    seed: u64,
    cats: &[i64],
    dets_per_image: usize,
) -> (Vec<Annotation>, Vec<Detection>) {
    let mut rng = stage_rng("bench_cocoeval", seed, &format!("image {}", image.id));
    let (w, h) = (image.width, image.height);
    // 0..=14 objects, plus one with probability 0.2: mean 7.2 (val2017: 36,781 / 5,000).
    let n = rng.gen_range(0..=14) + rng.gen_bool(0.2) as usize;
    let mut anns = Vec::with_capacity(n);
    let mut dets = Vec::with_capacity(dets_per_image);
    for _ in 0..n {
        let s = random_shape(w, h, &mut rng);
        let cat = cats[rng.gen_range(0..cats.len())];
        let xy = polygon(s, w, h, &mut rng);
        let ann = if rng.gen_bool(0.01) {
            let rle = rle_from_polygon(&xy, h, w);
            Annotation {
                id: 0,
                image_id: image.id,
                category_id: cat,
                area: rle.area() as f64,
                bbox: rle.to_bbox(),
                segmentation: GtSeg::Rle {
                    size: [h, w],
                    counts: rle.counts,
                },
                iscrowd: 1,
            }
        } else {
            Annotation {
                id: 0,
                image_id: image.id,
                category_id: cat,
                area: shoelace(&xy),
                bbox: bounds(&xy),
                segmentation: GtSeg::Polygons(vec![xy]),
                iscrowd: 0,
            }
        };
        anns.push(ann);
        // 0..=3 detections of it; the better localised, the higher the score.
        for _ in 0..rng.gen_range(0..=3) {
            let noise = rng.gen_range(0.0..0.4);
            let c = if rng.gen_bool(0.85) {
                cat
            } else {
                cats[rng.gen_range(0..cats.len())]
            };
            let score = 1.0 - 1.5 * noise + rng.gen_range(-0.2..0.2);
            let sj = jitter(s, noise, &mut rng);
            dets.push(detection(image, c, sj, score, &mut rng));
        }
    }
    dets.truncate(dets_per_image);
    while dets.len() < dets_per_image {
        let s = random_shape(w, h, &mut rng);
        let c = cats[rng.gen_range(0..cats.len())];
        let score = rng.gen_range(0.0..0.6);
        dets.push(detection(image, c, s, score, &mut rng));
    }
    (anns, dets)
}

/// Generates the problem for `images` images (ids 1..=images) deterministically from `seed`.
pub fn generate(images: usize, dets_per_image: usize, seed: u64) -> Problem {
    const SIZES: [(usize, usize); 5] = [(640, 480), (480, 640), (640, 427), (427, 640), (640, 512)];
    let cats = coco_category_ids();
    let images: Vec<Image> = (0..images)
        .map(|i| {
            let (width, height) = SIZES[(i * 7 + i / 3) % SIZES.len()];
            Image {
                id: i as i64 + 1,
                width,
                height,
                file_name: format!("{:012}.jpg", i + 1),
            }
        })
        .collect();
    let per_image: Vec<(Vec<Annotation>, Vec<Detection>)> = images
        .par_iter()
        .map(|im| image_objects(im, seed, &cats, dets_per_image))
        .collect();
    let (mut annotations, mut dets) = (Vec::new(), Vec::new());
    for (a, d) in per_image {
        annotations.extend(a);
        dets.extend(d);
    }
    for (i, a) in annotations.iter_mut().enumerate() {
        a.id = i as i64 + 1;
    }
    let categories = cats
        .iter()
        .map(|&id| Category {
            id,
            name: format!("class_{id}"),
            supercategory: "object".into(),
        })
        .collect();
    Problem {
        gt: Instances {
            info: serde_json::json!({"description": "cjepa bench cocoeval synthetic val2017"}),
            licenses: vec![],
            images,
            annotations,
            categories,
        },
        dets,
    }
}

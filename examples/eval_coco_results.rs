//! COCO evaluation of a results file with the library's exact port of pycocotools' `COCOeval`
//! ([`evaluate_files`]), printing the 12 summary numbers per IoU type, as `cjepa eval coco` does.
//!
//! With no paths, it makes its own inputs: the synthetic COCO generator's `val2017` instances as
//! ground truth, and a results file built from them with [`CocoDataset`]: each object kept with
//! probability 4/5, its box shifted by up to 15 % of its size, its true mask as compressed RLE
//! (`Rle::to_compressed`), a random score; plus one false positive per image. The box AP is
//! then low at strict IoU thresholds, the mask AP near 1.
//!
//! Run: `cargo run --release --example eval_coco_results -- [INSTANCES.json RESULTS.json]
//! [bbox|segm|both]`

use std::path::{Path, PathBuf};

use cjepa::data::synth::CocoParams;
use cjepa::data::{synth, DataFormat, SynthParams};
use cjepa::eval::coco::{evaluate_files, parse_iou_types, CocoDataset, CocoReport};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Generate a small synthetic COCO val split under `dir` and a results file for it; returns
/// `(instances, results)` paths.
pub fn synthetic_inputs(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let params = SynthParams {
        coco: CocoParams {
            train_images: 1,
            val_images: 8,
            ..CocoParams::default()
        },
        ..SynthParams::default()
    };
    let root = dir.join("coco");
    synth(DataFormat::Coco, &root, 0, &params)?;
    let gt_path = cjepa::data::coco::CocoDataset::annotation_path(&root, "val");
    let gt = CocoDataset::from_file(&gt_path)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut results: Vec<Value> = Vec::new();
    for (i, a) in gt.annotations.iter().enumerate() {
        if a.iscrowd || rng.gen_bool(0.2) {
            continue;
        }
        let [x, y, w, h] = a.bbox;
        let mut jitter = |s: f64| rng.gen_range(-0.15..0.15) * s;
        let bbox = [x + jitter(w), y + jitter(h), w + jitter(w), h + jitter(h)];
        let rle = gt.ann_to_rle(i)?;
        results.push(json!({
            "image_id": a.image_id, "category_id": a.category_id,
            "score": rng.gen_range(0.3..1.0), "bbox": bbox,
            "segmentation": {"size": [rle.h, rle.w], "counts": rle.to_compressed()},
        }));
    }
    for im in &gt.images {
        let cat = gt.categories[rng.gen_range(0..gt.categories.len())].id;
        let (w, h) = (im.width as f64 / 4.0, im.height as f64 / 4.0);
        let (x, y) = (rng.gen_range(0.0..3.0 * w), rng.gen_range(0.0..3.0 * h));
        let poly = [x, y, x + w, y, x + w, y + h, x, y + h];
        results.push(json!({
            "image_id": im.id, "category_id": cat, "score": rng.gen_range(0.0..0.5),
            "bbox": [x, y, w, h], "segmentation": [poly],
        }));
    }
    let dt_path = dir.join("results.json");
    fs_err::write(&dt_path, serde_json::to_string(&results)?)?;
    Ok((gt_path, dt_path))
}

/// Evaluate `results` against `instances` for `iou_type` (`bbox`, `segm` or `both`).
pub fn evaluate(instances: &Path, results: &Path, iou_type: &str) -> anyhow::Result<CocoReport> {
    Ok(evaluate_files(
        instances,
        results,
        &parse_iou_types(iou_type)?,
    )?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir()?;
    let (gt, dt, iou_type) = match args.as_slice() {
        [gt, dt, rest @ ..] if rest.len() <= 1 => {
            let t = rest.first().map_or("both", String::as_str);
            (PathBuf::from(gt), PathBuf::from(dt), t.to_string())
        }
        [] => {
            let (gt, dt) = synthetic_inputs(tmp.path())?;
            (gt, dt, "both".to_string())
        }
        _ => {
            anyhow::bail!("usage: eval_coco_results [INSTANCES.json RESULTS.json [bbox|segm|both]]")
        }
    };
    println!("{} against {}", dt.display(), gt.display());
    let report = evaluate(&gt, &dt, &iou_type)?;
    print!("{}", report.to_text());
    for r in report.results() {
        let stats: Vec<String> = r.stats.iter().map(|s| format!("{s:.3}")).collect();
        println!("{} stats: [{}]", r.iou_type.as_str(), stats.join(", "));
    }
    Ok(())
}

//! `cjepa eval coco --gt INSTANCES.json --dt RESULTS.json [--iou-type bbox|segm|both] [--json]`:
//! the exact COCOeval (pycocotools 2.0.11 semantics) on files. Prints the 12-line summary per IoU
//! type, or with `--json` `{"bbox": {"stats": [12]}, "segm": {"stats": [12]}}` (a key only for
//! the evaluated types). Unreadable or inconsistent files fail with exit code 2 and a message
//! naming the file and the image / annotation id.

use std::path::PathBuf;

use anyhow::Context;
use cjepa::eval::coco::{evaluate_files, parse_iou_types};
use serde_json::{json, Map, Value};

/// Arguments of `cjepa eval coco`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ground truth: a COCO instances JSON file.
    #[arg(long, value_name = "INSTANCES.json")]
    pub gt: PathBuf,
    /// Detections: a COCO results JSON file (a list of {image_id, category_id, score, bbox,
    /// segmentation}).
    #[arg(long, value_name = "RESULTS.json")]
    pub dt: PathBuf,
    /// Which evaluation: bbox, segm or both.
    #[arg(long, default_value = "both", value_name = "bbox|segm|both")]
    pub iou_type: String,
    /// Print the stats as JSON instead of the summary text.
    #[arg(long)]
    pub json: bool,
}

/// Run the evaluation; errors (exit code 2) name the file and the offending id.
pub fn run(a: Args) -> anyhow::Result<i32> {
    let types = parse_iou_types(&a.iou_type)?;
    let report = evaluate_files(&a.gt, &a.dt, &types).with_context(|| {
        format!(
            "cannot evaluate {} against {}",
            a.dt.display(),
            a.gt.display()
        )
    })?;
    if a.json {
        let mut top = Map::new();
        for r in report.results() {
            top.insert(
                r.iou_type.as_str().to_string(),
                json!({ "stats": r.stats.to_vec() }),
            );
        }
        outln!("{}", serde_json::to_string_pretty(&Value::Object(top))?)?;
    } else {
        out!("{}", report.to_text())?;
    }
    Ok(0)
}

//! `cjepa eval <benchmark>`: the exact metrics on files of predictions, without a pipeline.
//!
//! - `cjepa eval coco --gt INSTANCES.json --dt RESULTS.json [--iou-type bbox|segm|both] [--json]`:
//!   COCO box / mask AP and AR (pycocotools 2.0.11 COCOeval), see `eval_coco.rs`.
//! - `cjepa eval seg --gt ANNOTATION_DIR --pred PRED_DIR [--json]`: ADE20K mIoU / aAcc / mAcc
//!   (mmseg `IoUMetric`, `reduce_zero_label`, 150 classes) and per-class IoU / Acc.
//! - `cjepa eval davis --davis DAVIS_ROOT --pred PRED_DIR [--set val] [--json]`: DAVIS-2017
//!   semi-supervised J&F (official `davis2017-evaluation`), global and per-object tables.
//!
//! Bad input (missing or malformed files) exits with code 2 and a message naming the file.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The subcommands of `cjepa eval`.
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// COCO detection / instance segmentation: the 12 COCOeval stats for bbox and / or segm.
    Coco(super::eval_coco::Args),
    /// ADE20K semantic segmentation: mIoU, aAcc, mAcc (x100) and per-class IoU / Acc.
    Seg(SegArgs),
    /// DAVIS-2017 semi-supervised video object segmentation: J&F, J and F mean / recall / decay.
    Davis(DavisArgs),
}

/// Arguments of `cjepa eval seg`.
#[derive(Debug, clap::Args)]
pub struct SegArgs {
    /// Folder of ground-truth label PNGs (8-bit, raw ADE labels 0..=150, 0 = other).
    #[arg(long)]
    gt: PathBuf,
    /// Folder of predicted PNGs (8-bit, classes 0..=149), one per annotation with the same stem.
    #[arg(long)]
    pred: PathBuf,
    /// Print JSON (`mIoU`, `aAcc`, `mAcc`, `per_class`, `totals`, `per_image`; metrics x100).
    #[arg(long)]
    json: bool,
}

/// Arguments of `cjepa eval davis`.
#[derive(Debug, clap::Args)]
pub struct DavisArgs {
    /// DAVIS root holding `Annotations/480p/<seq>/` and `ImageSets/2017/<set>.txt` (or its parent
    /// holding `DAVIS/`).
    #[arg(long)]
    davis: PathBuf,
    /// Folder of predictions: `<seq>/<frame>.png` palette PNGs, one per annotated frame.
    #[arg(long)]
    pred: PathBuf,
    /// Image set (`ImageSets/2017/<set>.txt`).
    #[arg(long, default_value = "val")]
    set: String,
    /// Print JSON (`global` with the 7 official measures as fractions, `sequences`, ...).
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a {
        Args::Coco(a) => super::eval_coco::run(a),
        Args::Seg(a) => seg(a),
        Args::Davis(a) => davis(a),
    }
}

fn require_dir(p: &Path, what: &str) -> anyhow::Result<()> {
    if !p.is_dir() {
        anyhow::bail!("{what} folder {} does not exist", p.display());
    }
    Ok(())
}

fn seg(a: SegArgs) -> anyhow::Result<i32> {
    require_dir(&a.gt, "annotation")?;
    require_dir(&a.pred, "prediction")?;
    let rep = cjepa::eval::segmentation::evaluate_dirs(&a.gt, &a.pred)
        .with_context(|| format!("evaluating {} against {}", a.pred.display(), a.gt.display()))?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&rep.to_json())?)?;
    } else {
        out!("{}", rep.to_table(None))?;
    }
    Ok(0)
}

fn davis(a: DavisArgs) -> anyhow::Result<i32> {
    let nested = a.davis.join("DAVIS");
    let root = if !a.davis.join("Annotations").is_dir() && nested.join("Annotations").is_dir() {
        nested
    } else {
        a.davis.clone()
    };
    require_dir(&root, "DAVIS root")?;
    require_dir(&a.pred, "prediction")?;
    let rep = cjepa::eval::davis::evaluate_davis(&root, &a.pred, &a.set).with_context(|| {
        format!(
            "evaluating {} against {} (set {})",
            a.pred.display(),
            root.display(),
            a.set
        )
    })?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&rep.to_json())?)?;
    } else {
        outln!("{}", rep.global_table())?;
        out!("{}", rep.sequence_table())?;
    }
    Ok(0)
}

//! COCO detection / instance-segmentation evaluation: an exact Rust port of the pycocotools
//! mask API (`maskApi.c`: RLE codec, polygon rasteriser, area, box, merge, IoU) and of
//! `COCOeval` (`evaluate` / `accumulate` / `summarize`) for `iouType` `bbox` and `segm`.
//!
//! * [`crate::data::mask::rle`]: [`Rle`] masks and the compressed-string codec.
//! * [`crate::data::mask::polygon`]: polygon -> RLE exactly as `frPyObjects`.
//! * [`iou`]: box and mask IoU with the crowd rule.
//! * [`dataset`]: loading and validating instances / results JSON, category id maps
//!   (`segm_json` reads segmentations without an intermediate `serde_json::Value`).
//! * [`cocoeval`]: the evaluation itself, giving the 12 `stats` and per-category AP / AR.
//! * [`summary`]: the pycocotools summary text, file-level entry point and JSON report.
//!
//! Results equal pycocotools 2.0.11 bit for bit on the golden cases
//! (`tests/golden/metrics/coco`) when serde_json parses floats exactly (its `float_roundtrip`
//! feature); without it a 17-digit literal may be read one ulp off, which moves the stats by
//! ~1e-17.
//!
//! Typical use: `evaluate_files(gt, dt, &[IouType::Bbox, IouType::Segm])`, then
//! `report.to_text()` (the pycocotools summary) or `report.to_json()`.

pub mod cocoeval;
pub mod dataset;
pub mod iou;
mod segm_json;
pub mod summary;

use std::path::PathBuf;

pub use crate::data::mask::{
    polygons_to_rle, rle_from_bbox, rle_from_polygon, rles_from_polygons, MaskError, Rle,
};
pub use cocoeval::{
    evaluate, iou_thresholds, numpy_mean, recall_thresholds, CocoEvalResult, IouType, AREA_LABELS,
    AREA_RANGES, MAX_DETS,
};
pub use dataset::{
    CategoryMap, CocoAnnotation, CocoCategory, CocoDataset, CocoImage, CocoResults, DetArea,
    Detection, ResultEntry, Segmentation,
};
pub use iou::{bbox_iou, box_iou, mask_iou, rle_pair_iou, IouMatrix};
pub use summary::{
    evaluate_files, evaluate_files_with, format_summary, parse_iou_types, CocoReport,
};

/// Everything that can go wrong while loading or evaluating COCO data.
#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not JSON of the expected shape.
    #[error("{path} is not a valid COCO {what} JSON file: {source}")]
    Json {
        /// The file (or a label for in-memory data).
        path: String,
        /// "instances" or "results".
        what: &'static str,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The content is well-formed JSON but inconsistent (unknown ids, bad shapes, ...).
    #[error("{path}: {msg}")]
    Invalid {
        /// The file (or a label for in-memory data).
        path: String,
        /// What is wrong, naming the annotation / image id and the fix.
        msg: String,
    },
    /// A mask-level error (RLE codec, rasteriser input, size mismatch).
    #[error("invalid mask: {0}")]
    Rle(String),
    /// A bad argument (e.g. an unknown IoU type).
    #[error("{0}")]
    Usage(String),
}

impl From<MaskError> for CocoError {
    fn from(e: MaskError) -> Self {
        CocoError::Rle(e.0)
    }
}

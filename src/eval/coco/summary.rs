//! The pycocotools `summarize()` text, the file-level entry point behind
//! `cjepa eval coco --gt INSTANCES.json --dt RESULTS.json [--iou-type bbox|segm|both] [--json]`,
//! and its JSON report.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::cocoeval::{evaluate, CocoEvalResult, IouType};
use super::dataset::{CocoDataset, CocoResults, DetArea};
use super::CocoError;

/// (ap?, iouThr, area label, maxDets) of the 12 stats, in `COCOeval.stats` order.
const LINES: [(bool, Option<&str>, &str, usize); 12] = [
    (true, None, "all", 100),
    (true, Some("0.50"), "all", 100),
    (true, Some("0.75"), "all", 100),
    (true, None, "small", 100),
    (true, None, "medium", 100),
    (true, None, "large", 100),
    (false, None, "all", 1),
    (false, None, "all", 10),
    (false, None, "all", 100),
    (false, None, "small", 100),
    (false, None, "medium", 100),
    (false, None, "large", 100),
];

/// The 12 lines `COCOeval.summarize()` prints for `bbox` / `segm` (both use the same lines),
/// each ending in a newline, e.g.
/// ` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.363`.
pub fn format_summary(iou_type: IouType, stats: &[f64; 12]) -> String {
    // bbox and segm share the detection summary (keypoints would differ).
    let _ = iou_type;
    let mut s = String::new();
    for (&(ap, iou, area, max_dets), v) in LINES.iter().zip(stats) {
        let (title, kind) = if ap {
            ("Average Precision", "(AP)")
        } else {
            ("Average Recall", "(AR)")
        };
        let iou = iou.unwrap_or("0.50:0.95");
        s.push_str(&format!(
            " {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3} ] = {v:.3}\n"
        ));
    }
    s
}

/// Parses a `--iou-type` value: `bbox`, `segm` or `both`.
pub fn parse_iou_types(s: &str) -> Result<Vec<IouType>, CocoError> {
    match s {
        "bbox" => Ok(vec![IouType::Bbox]),
        "segm" => Ok(vec![IouType::Segm]),
        "both" => Ok(vec![IouType::Bbox, IouType::Segm]),
        other => Err(CocoError::Usage(format!(
            "unknown IoU type {other:?}; use bbox, segm or both"
        ))),
    }
}

/// Results of one `cjepa eval coco` run.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoReport {
    /// Box evaluation, when requested.
    pub bbox: Option<CocoEvalResult>,
    /// Mask evaluation, when requested.
    pub segm: Option<CocoEvalResult>,
    /// `(COCO id, name)` of the categories, sorted by id (parallel to `cat_ids`).
    pub categories: Vec<(i64, String)>,
}

impl CocoReport {
    /// The evaluated results in bbox, segm order.
    pub fn results(&self) -> impl Iterator<Item = &CocoEvalResult> {
        self.bbox.iter().chain(self.segm.iter())
    }

    /// `{"bbox": {"stats": [12], "per_category": {"<id>": {"name", "ap", "ar"}}}, "segm": ...}`
    /// with a key only for the evaluated IoU types.
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        for r in self.results() {
            let mut per = Map::new();
            for (i, &id) in r.cat_ids.iter().enumerate() {
                let name = self
                    .categories
                    .iter()
                    .find(|c| c.0 == id)
                    .map(|c| c.1.clone())
                    .unwrap_or_default();
                per.insert(
                    id.to_string(),
                    json!({"name": name, "ap": r.per_category_ap[i], "ar": r.per_category_ar[i]}),
                );
            }
            top.insert(
                r.iou_type.as_str().to_string(),
                json!({"stats": r.stats.to_vec(), "per_category": Value::Object(per)}),
            );
        }
        Value::Object(top)
    }

    /// Human-readable text: `IoU metric: <type>` then the 12 summary lines, per type.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for r in self.results() {
            s.push_str(&format!("IoU metric: {}\n", r.iou_type.as_str()));
            s.push_str(&format_summary(r.iou_type, &r.stats));
        }
        s
    }
}

/// Loads `gt` (instances) and `dt` (results) and evaluates each requested IoU type with
/// pycocotools defaults.
pub fn evaluate_files(
    gt: &Path,
    dt: &Path,
    iou_types: &[IouType],
) -> Result<CocoReport, CocoError> {
    evaluate_files_with(gt, dt, iou_types, DetArea::LoadRes)
}

/// As [`evaluate_files`], choosing how detection areas are set ([`DetArea::FromMask`] is the
/// detectron2-style "area from mask" variant).
pub fn evaluate_files_with(
    gt: &Path,
    dt: &Path,
    iou_types: &[IouType],
    det_area: DetArea,
) -> Result<CocoReport, CocoError> {
    if iou_types.is_empty() {
        return Err(CocoError::Usage(
            "no IoU type requested; use bbox, segm or both".into(),
        ));
    }
    let gt = CocoDataset::from_file(gt)?;
    let dt = CocoResults::from_file(dt, &gt, det_area)?;
    let categories = gt.categories_by_id();
    let mut report = CocoReport {
        bbox: None,
        segm: None,
        categories,
    };
    for &t in iou_types {
        let slot = match t {
            IouType::Bbox => &mut report.bbox,
            IouType::Segm => &mut report.segm,
        };
        if slot.is_none() {
            *slot = Some(evaluate(&gt, &dt, t)?);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_match_pycocotools() {
        let mut stats = [0.0; 12];
        stats[0] = 0.36251;
        stats[11] = -1.0;
        let s = format_summary(IouType::Bbox, &stats);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 12);
        assert_eq!(
            lines[0],
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.363"
        );
        assert_eq!(
            lines[1],
            " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 0.000"
        );
        assert_eq!(
            lines[6],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.000"
        );
        assert_eq!(
            lines[11],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000"
        );
    }

    #[test]
    fn iou_type_parsing() {
        assert_eq!(
            parse_iou_types("both").unwrap(),
            vec![IouType::Bbox, IouType::Segm]
        );
        assert!(parse_iou_types("keypoints").is_err());
    }
}

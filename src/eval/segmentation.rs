//! Semantic-segmentation metrics: mmsegmentation 1.x `IoUMetric` (aAcc, mIoU, mAcc, per-class
//! IoU/Acc) with `reduce_zero_label=True` and `ignore_index=255`, as used for ADE20K (150 classes).
//!
//! Definition (mmseg `mmseg/evaluation/metrics/iou_metric.py`):
//! 1. label transform (`reduce_zero_label`): `0 -> 255`, then `label - 1` (u8), then `254 -> 255`;
//! 2. per image, over pixels whose label is not 255: histograms (one bin per class, values outside
//!    `0..num_classes` are dropped like `torch.histc` does) of the correctly predicted class
//!    (`intersect`), of the predictions (`pred`) and of the labels (`label`);
//! 3. the histograms are summed over the **whole dataset** (not a mean of per-image scores);
//! 4. `IoU[c] = I/(P + L - I)`, `Acc[c] = I/L` (NaN on 0/0), `aAcc = ΣI/ΣL`,
//!    `mIoU = nanmean(IoU)`, `mAcc = nanmean(Acc)`; everything reported ×100 in f64.
//!
//! [`evaluate_dirs`] reads matching 8-bit single-channel PNGs (annotations with raw ADE labels
//! 0..=150, predictions with reduced classes 0..=149) in parallel with rayon.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use super::davis::{decode_index_png, PngIssue};

/// Number of ADE20K (SceneParsing-150) classes.
pub const ADE20K_NUM_CLASSES: usize = 150;
/// mmseg's ignore index.
pub const IGNORE_INDEX: u8 = 255;

/// Errors of the segmentation metric; messages name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SegError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no *.png annotation found in {dir}; pass the folder holding the ground-truth label PNGs"
    )]
    NoAnnotations { dir: PathBuf },
    #[error("missing prediction {path} for annotation {annotation}; write one PNG per annotation with the same file stem")]
    MissingPrediction { path: PathBuf, annotation: PathBuf },
    #[error("size mismatch: prediction {pred} is {pred_h}x{pred_w} (HxW) but annotation {gt} is {gt_h}x{gt_w}; resize the prediction to the annotation size")]
    SizeMismatch {
        pred: PathBuf,
        pred_h: usize,
        pred_w: usize,
        gt: PathBuf,
        gt_h: usize,
        gt_w: usize,
    },
    #[error("{path} is a {found} PNG; expected an 8-bit single-channel PNG (mode L, or palette indices) holding class ids")]
    WrongPngMode { path: PathBuf, found: String },
    #[error("cannot decode PNG {path}: {message}")]
    Png { path: PathBuf, message: String },
    #[error(
        "prediction has {pred} pixels but the label has {label}; both must be the same HxW image"
    )]
    LengthMismatch { pred: usize, label: usize },
    #[error("cannot merge accumulators with {a} and {b} classes")]
    ClassCountMismatch { a: usize, b: usize },
}

/// mmseg `reduce_zero_label` for one raw label value: `0 -> 255`, `v -> v - 1`, `255 -> 255`.
pub fn reduce_zero_label(v: u8) -> u8 {
    let v = if v == 0 { 255 } else { v };
    let v = v.wrapping_sub(1);
    if v == 254 {
        255
    } else {
        v
    }
}

pub(crate) use crate::util::numpy::numpy_sum;

/// `np.nanmean`: mean over the non-NaN values (NaN when all are NaN or the slice is empty).
pub(crate) fn nanmean(a: &[f64]) -> f64 {
    let cnt = a.iter().filter(|x| !x.is_nan()).count();
    let replaced: Vec<f64> = a
        .iter()
        .map(|&x| if x.is_nan() { 0.0 } else { x })
        .collect();
    numpy_sum(&replaced) / cnt as f64
}

/// Dataset-level histogram accumulator (`intersect`, `union`, `pred`, `label` per class).
#[derive(Debug, Clone, PartialEq)]
pub struct SegAccumulator {
    pub num_classes: usize,
    pub area_intersect: Vec<u64>,
    pub area_pred_label: Vec<u64>,
    pub area_label: Vec<u64>,
}

/// Valid (label != 255) and correct pixel counts of one `add` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PixelCounts {
    pub valid_pixels: u64,
    pub correct_pixels: u64,
}

impl SegAccumulator {
    pub fn new(num_classes: usize) -> Self {
        Self {
            num_classes,
            area_intersect: vec![0; num_classes],
            area_pred_label: vec![0; num_classes],
            area_label: vec![0; num_classes],
        }
    }

    /// ADE20K accumulator (150 classes).
    pub fn ade20k() -> Self {
        Self::new(ADE20K_NUM_CLASSES)
    }

    /// Add one image: `pred` holds reduced class ids, `label_raw` raw ADE labels (0 = other);
    /// `reduce_zero_label` is applied to the labels, then pixels labelled 255 are ignored.
    pub fn add(&mut self, pred: &[u8], label_raw: &[u8]) -> Result<PixelCounts, SegError> {
        self.add_impl(pred, label_raw, true)
    }

    /// Add one image whose labels are already reduced (0..num_classes, 255 = ignore).
    pub fn add_reduced(&mut self, pred: &[u8], label: &[u8]) -> Result<PixelCounts, SegError> {
        self.add_impl(pred, label, false)
    }

    fn add_impl(
        &mut self,
        pred: &[u8],
        label: &[u8],
        reduce: bool,
    ) -> Result<PixelCounts, SegError> {
        if pred.len() != label.len() {
            return Err(SegError::LengthMismatch {
                pred: pred.len(),
                label: label.len(),
            });
        }
        let nc = self.num_classes;
        let mut counts = PixelCounts::default();
        for (&p, &l) in pred.iter().zip(label) {
            let l = if reduce { reduce_zero_label(l) } else { l };
            if l == IGNORE_INDEX {
                continue;
            }
            counts.valid_pixels += 1;
            let (p, l) = (p as usize, l as usize);
            if p < nc {
                self.area_pred_label[p] += 1;
            }
            if l < nc {
                self.area_label[l] += 1;
            }
            if p == l {
                counts.correct_pixels += 1;
                if p < nc {
                    self.area_intersect[p] += 1;
                }
            }
        }
        Ok(counts)
    }

    /// Add another accumulator's histograms (dataset-level sum).
    pub fn merge(&mut self, other: &SegAccumulator) -> Result<(), SegError> {
        if other.num_classes != self.num_classes {
            return Err(SegError::ClassCountMismatch {
                a: self.num_classes,
                b: other.num_classes,
            });
        }
        for c in 0..self.num_classes {
            self.area_intersect[c] += other.area_intersect[c];
            self.area_pred_label[c] += other.area_pred_label[c];
            self.area_label[c] += other.area_label[c];
        }
        Ok(())
    }

    /// `union = pred + label - intersect` per class.
    pub fn area_union(&self) -> Vec<u64> {
        (0..self.num_classes)
            .map(|c| self.area_pred_label[c] + self.area_label[c] - self.area_intersect[c])
            .collect()
    }

    /// aAcc, mIoU, mAcc and per-class IoU/Acc (all ×100; NaN classes become `None`).
    pub fn metrics(&self) -> SegMetrics {
        let union = self.area_union();
        let div = |a: u64, b: u64| a as f64 / b as f64; // 0/0 = NaN as in numpy
        let iou: Vec<f64> = (0..self.num_classes)
            .map(|c| div(self.area_intersect[c], union[c]))
            .collect();
        let acc: Vec<f64> = (0..self.num_classes)
            .map(|c| div(self.area_intersect[c], self.area_label[c]))
            .collect();
        let total_i: u64 = self.area_intersect.iter().sum();
        let total_l: u64 = self.area_label.iter().sum();
        let opt = |x: f64| if x.is_nan() { None } else { Some(x * 100.0) };
        SegMetrics {
            a_acc: div(total_i, total_l) * 100.0,
            m_iou: nanmean(&iou) * 100.0,
            m_acc: nanmean(&acc) * 100.0,
            per_class: (0..self.num_classes)
                .map(|c| ClassMetric {
                    class: c,
                    iou: opt(iou[c]),
                    acc: opt(acc[c]),
                })
                .collect(),
        }
    }
}

/// One class's IoU/Acc (×100), `None` where the reference gives NaN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassMetric {
    pub class: usize,
    #[serde(rename = "IoU")]
    pub iou: Option<f64>,
    #[serde(rename = "Acc")]
    pub acc: Option<f64>,
}

/// Summary metrics (×100, f64, unrounded).
#[derive(Debug, Clone, PartialEq)]
pub struct SegMetrics {
    pub a_acc: f64,
    pub m_iou: f64,
    pub m_acc: f64,
    pub per_class: Vec<ClassMetric>,
}

/// Per-image statistics of [`evaluate_dirs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageStat {
    pub name: String,
    pub height: usize,
    pub width: usize,
    pub valid_pixels: u64,
    pub correct_pixels: u64,
}

/// Result of a dataset evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct SegReport {
    pub metrics: SegMetrics,
    pub totals: SegAccumulator,
    pub per_image: Vec<ImageStat>,
}

impl SegReport {
    /// `{"mIoU", "aAcc", "mAcc", "per_class": [{"class", "IoU", "Acc"}], "totals", "per_image"}`
    /// (metrics ×100, `null` for NaN classes).
    pub fn to_json(&self) -> serde_json::Value {
        let m = &self.metrics;
        serde_json::json!({
            "mIoU": m.m_iou,
            "aAcc": m.a_acc,
            "mAcc": m.m_acc,
            "per_class": m.per_class,
            "totals": {
                "area_intersect": self.totals.area_intersect,
                "area_union": self.totals.area_union(),
                "area_pred_label": self.totals.area_pred_label,
                "area_label": self.totals.area_label,
            },
            "per_image": self.per_image,
        })
    }

    /// Plain-text table: summary line, then one row per class that is not NaN in both IoU and Acc.
    /// `class_names[i]` labels reduced class `i` when given.
    pub fn to_table(&self, class_names: Option<&[&str]>) -> String {
        let m = &self.metrics;
        let name = |c: usize| -> String {
            class_names
                .and_then(|n| n.get(c))
                .map(|s| s.to_string())
                .unwrap_or_else(|| c.to_string())
        };
        let fmt = |x: Option<f64>| x.map_or_else(|| "nan".to_string(), |v| format!("{v:.2}"));
        let rows: Vec<(String, String, String)> = m
            .per_class
            .iter()
            .filter(|c| c.iou.is_some() || c.acc.is_some())
            .map(|c| (name(c.class), fmt(c.iou), fmt(c.acc)))
            .collect();
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(5);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "aAcc {:.2}  mIoU {:.2}  mAcc {:.2}  ({} images, {} of {} classes present)",
            m.a_acc,
            m.m_iou,
            m.m_acc,
            self.per_image.len(),
            rows.len(),
            m.per_class.len()
        );
        let _ = writeln!(s, "{:<w0$} | {:>7} | {:>7}", "Class", "IoU", "Acc");
        let _ = writeln!(
            s,
            "{}-+-{}-+-{}",
            "-".repeat(w0),
            "-".repeat(7),
            "-".repeat(7)
        );
        for (n, i, a) in rows {
            let _ = writeln!(s, "{n:<w0$} | {i:>7} | {a:>7}");
        }
        s
    }
}

fn read_label_png(path: &Path) -> Result<(usize, usize, Vec<u8>), SegError> {
    decode_index_png(path).map_err(|e| match e {
        PngIssue::Io(source) => SegError::Io {
            path: path.to_path_buf(),
            source,
        },
        PngIssue::Decode(message) => SegError::Png {
            path: path.to_path_buf(),
            message,
        },
        PngIssue::Unsupported(found) => SegError::WrongPngMode {
            path: path.to_path_buf(),
            found,
        },
    })
}

fn eval_one(
    gt: &Path,
    pred_dir: &Path,
    num_classes: usize,
) -> Result<(SegAccumulator, ImageStat), SegError> {
    let stem = gt
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pred_path = pred_dir.join(format!("{stem}.png"));
    if !pred_path.is_file() {
        return Err(SegError::MissingPrediction {
            path: pred_path,
            annotation: gt.to_path_buf(),
        });
    }
    let (gh, gw, label) = read_label_png(gt)?;
    let (ph, pw, pred) = read_label_png(&pred_path)?;
    if (gh, gw) != (ph, pw) {
        return Err(SegError::SizeMismatch {
            pred: pred_path,
            pred_h: ph,
            pred_w: pw,
            gt: gt.to_path_buf(),
            gt_h: gh,
            gt_w: gw,
        });
    }
    let mut acc = SegAccumulator::new(num_classes);
    let c = acc.add(&pred, &label)?;
    let stat = ImageStat {
        name: stem,
        height: gh,
        width: gw,
        valid_pixels: c.valid_pixels,
        correct_pixels: c.correct_pixels,
    };
    Ok((acc, stat))
}

/// Sorted `*.png` files of a folder.
fn list_pngs(dir: &Path) -> Result<Vec<PathBuf>, SegError> {
    let rd = fs_err::read_dir(dir).map_err(|source| SegError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|source| SegError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        let is_png = p.extension().is_some_and(|x| x == "png");
        if is_png && p.is_file() {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

/// ADE20K evaluation (150 classes, `reduce_zero_label`) of every `<gt_dir>/*.png` against
/// `<pred_dir>/<same stem>.png`. Extra prediction files are ignored.
pub fn evaluate_dirs(gt_dir: &Path, pred_dir: &Path) -> Result<SegReport, SegError> {
    evaluate_dirs_with_classes(gt_dir, pred_dir, ADE20K_NUM_CLASSES)
}

/// [`evaluate_dirs`] with another class count (labels still go through `reduce_zero_label`).
pub fn evaluate_dirs_with_classes(
    gt_dir: &Path,
    pred_dir: &Path,
    num_classes: usize,
) -> Result<SegReport, SegError> {
    let gts = list_pngs(gt_dir)?;
    if gts.is_empty() {
        return Err(SegError::NoAnnotations {
            dir: gt_dir.to_path_buf(),
        });
    }
    let results: Vec<Result<(SegAccumulator, ImageStat), SegError>> = gts
        .par_iter()
        .map(|gt| eval_one(gt, pred_dir, num_classes))
        .collect();
    let mut totals = SegAccumulator::new(num_classes);
    let mut per_image = Vec::with_capacity(results.len());
    for r in results {
        let (acc, stat) = r?;
        totals.merge(&acc)?;
        per_image.push(stat);
    }
    Ok(SegReport {
        metrics: totals.metrics(),
        totals,
        per_image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_zero_label_transform() {
        assert_eq!(reduce_zero_label(0), 255);
        assert_eq!(reduce_zero_label(1), 0);
        assert_eq!(reduce_zero_label(150), 149);
        assert_eq!(reduce_zero_label(254), 253);
        assert_eq!(reduce_zero_label(255), 255);
    }

    #[test]
    fn histograms_ignore_and_nan_skipping() {
        let mut acc = SegAccumulator::new(4);
        // raw labels: 0 (ignored), 1 -> class 0, 2 -> class 1, 255 (ignored)
        let label = [0u8, 1, 1, 2, 2, 255];
        let pred = [3u8, 0, 1, 1, 2, 0];
        let c = acc.add(&pred, &label).unwrap();
        assert_eq!((c.valid_pixels, c.correct_pixels), (4, 2));
        assert_eq!(acc.area_intersect, vec![1, 1, 0, 0]);
        assert_eq!(acc.area_pred_label, vec![1, 2, 1, 0]);
        assert_eq!(acc.area_label, vec![2, 2, 0, 0]);
        let m = acc.metrics();
        // class 0: I=1, U=2; class 1: I=1, U=3; class 2: only predicted -> IoU 0, Acc NaN;
        // class 3: neither -> NaN, NaN.
        assert_eq!(m.per_class[0].iou, Some(50.0));
        assert_eq!(m.per_class[2].iou, Some(0.0));
        assert_eq!(m.per_class[2].acc, None);
        assert_eq!(m.per_class[3].iou, None);
        assert_eq!(m.per_class[3].acc, None);
        let expect_miou = (0.5 + 1.0 / 3.0 + 0.0) / 3.0 * 100.0;
        assert!((m.m_iou - expect_miou).abs() < 1e-12);
        assert!((m.m_acc - 50.0).abs() < 1e-12);
        assert!((m.a_acc - 50.0).abs() < 1e-12);
    }

    #[test]
    fn out_of_range_predictions_are_dropped_like_histc() {
        let mut acc = SegAccumulator::new(2);
        acc.add_reduced(&[7, 1], &[0, 1]).unwrap();
        assert_eq!(acc.area_pred_label, vec![0, 1]);
        assert_eq!(acc.area_label, vec![1, 1]);
        assert!(acc.add_reduced(&[0], &[0, 1]).is_err());
    }

    #[test]
    fn numpy_pairwise_sum_matches_plain_for_exact_values() {
        let v: Vec<f64> = (0..300).map(|i| i as f64).collect();
        assert_eq!(numpy_sum(&v), 44850.0);
        assert_eq!(nanmean(&[1.0, f64::NAN, 3.0]), 2.0);
        assert!(nanmean(&[f64::NAN]).is_nan());
    }
}

//! ADE20K SceneParsing layout: `ADEChallengeData2016/images/{training,validation}/ADE_*.jpg` and
//! `annotations/{training,validation}/ADE_*.png` (8-bit single-channel, mode `L`, values 0..150,
//! 0 = "other"). `reduce_zero_label` maps 0 -> 255 (ignored) and 1..150 -> 0..149.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::check::{files_with_ext, probe_and_report, stem, CheckOptions, CheckReport};
use super::davis::read_png_raw;
use super::DataError;

/// Split folder names of the layout.
pub const SPLITS: [&str; 2] = ["training", "validation"];

/// Number of classes after `reduce_zero_label`.
pub const NUM_CLASSES: usize = 150;

/// Ignore index after `reduce_zero_label`.
pub const IGNORE_INDEX: u8 = 255;

/// Largest raw label value.
pub const MAX_LABEL: u8 = 150;

/// A single-channel label map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major labels.
    pub data: Vec<u8>,
}

/// Map `train`/`val` to the ADE folder names (`training`/`validation`); others pass through.
pub fn split_dir(split: &str) -> &str {
    match split {
        "train" => "training",
        "val" => "validation",
        s => s,
    }
}

/// Accept the dataset root itself or a parent holding `ADEChallengeData2016/`.
pub fn resolve_root(path: &Path) -> PathBuf {
    super::root_or_inner(path, "ADEChallengeData2016", "images")
}

/// mmseg `reduce_zero_label`, in place: 0 -> 255, v -> v - 1, 254 -> 255.
pub fn reduce_zero_label(labels: &mut [u8]) {
    for v in labels {
        *v = match *v {
            0 => 255,
            x => {
                let y = x - 1;
                if y == 254 {
                    255
                } else {
                    y
                }
            }
        };
    }
}

/// Read an 8-bit grayscale (mode `L`) label PNG. Palette or RGB PNGs are errors: a palette
/// PNG's indices are not ADE labels unless its palette is the identity.
pub fn read_label_png(path: &Path) -> Result<LabelMap, DataError> {
    let raw = read_png_raw(path)?;
    if raw.color != png::ColorType::Grayscale || raw.depth != png::BitDepth::Eight {
        return Err(DataError::image(
            path,
            format!("expected an 8-bit single-channel (mode L) label PNG, found {:?} {}-bit; re-save it as 8-bit grayscale", raw.color, raw.depth as u8),
        ));
    }
    Ok(LabelMap {
        width: raw.width,
        height: raw.height,
        data: raw.data,
    })
}

/// Write an 8-bit grayscale (mode `L`) PNG.
pub fn write_label_png(path: &Path, map: &LabelMap) -> Result<(), DataError> {
    let img =
        image::GrayImage::from_raw(map.width, map.height, map.data.clone()).ok_or_else(|| {
            DataError::image(
                path,
                format!(
                    "{} labels for a {}x{} map",
                    map.data.len(),
                    map.width,
                    map.height
                ),
            )
        })?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| DataError::image(path, format!("PNG encode: {e}")))
}

/// One split: `(image, annotation)` pairs matched by file stem, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ade20k {
    /// Dataset root (the `ADEChallengeData2016` folder).
    pub root: PathBuf,
    /// `training` or `validation`.
    pub split: String,
    /// `(image .jpg, annotation .png)`.
    pub samples: Vec<(PathBuf, PathBuf)>,
}

impl Ade20k {
    /// List one split (`training`/`validation`, or `train`/`val`). Unpaired files are errors.
    pub fn open(path: &Path, split: &str) -> Result<Self, DataError> {
        let root = resolve_root(path);
        let split = split_dir(split);
        let (imgs, anns) = list_split(&root, split)?;
        let mut samples = Vec::new();
        for (s, i) in &imgs {
            let a = anns.get(s).ok_or_else(|| {
                DataError::layout(i, "image has no annotation PNG with the same name")
            })?;
            samples.push((i.clone(), a.clone()));
        }
        if let Some((_, a)) = anns.iter().find(|(s, _)| !imgs.contains_key(*s)) {
            return Err(DataError::layout(
                a,
                "annotation has no image with the same name",
            ));
        }
        Ok(Ade20k {
            root,
            split: split.to_string(),
            samples,
        })
    }
}

type ByStem = BTreeMap<String, PathBuf>;

/// Width, height and the set of values of a label map.
type LabelSummary = (u32, u32, BTreeSet<u8>);

fn list_split(root: &Path, split: &str) -> Result<(ByStem, ByStem), DataError> {
    let idir = root.join("images").join(split);
    let adir = root.join("annotations").join(split);
    let imgs = files_with_ext(&idir, &["jpg", "jpeg", "png"])?
        .into_iter()
        .map(|p| (stem(&p), p))
        .collect();
    let anns = files_with_ext(&adir, &["png"])?
        .into_iter()
        .map(|p| (stem(&p), p))
        .collect();
    Ok((imgs, anns))
}

/// Check both splits: image/annotation pairs match, annotations are mode L, values <= 150,
/// annotation size = image size.
pub(crate) fn check_layout(root: &Path, opts: &CheckOptions, report: &mut CheckReport) {
    for split in SPLITS {
        let (imgs, anns) = match list_split(root, split) {
            Ok(x) => x,
            Err(_) => {
                for d in ["images", "annotations"] {
                    let p = root.join(d).join(split);
                    if !p.is_dir() {
                        report.problem(
                            &p,
                            format!(
                                "missing folder (expected {d}/{split}/ in ADEChallengeData2016)"
                            ),
                        );
                    }
                }
                continue;
            }
        };
        for (s, i) in &imgs {
            if !anns.contains_key(s) {
                report.problem(
                    i,
                    format!("image has no annotation annotations/{split}/{s}.png"),
                );
            }
        }
        for (s, a) in &anns {
            if !imgs.contains_key(s) {
                report.problem(a, format!("annotation has no image images/{split}/{s}.jpg"));
            }
        }
        let ipaths: Vec<PathBuf> = imgs.values().cloned().collect();
        let dims: BTreeMap<String, (u32, u32)> = probe_and_report(&ipaths, opts, report)
            .into_iter()
            .zip(imgs.keys())
            .filter_map(|(d, s)| d.map(|d| (s.clone(), d)))
            .collect();
        let mut present: BTreeMap<String, usize> = BTreeMap::new();
        let apaths: Vec<&PathBuf> = anns.values().collect();
        let read: Vec<Result<LabelSummary, DataError>> = apaths
            .par_iter()
            .map(|a| {
                read_label_png(a).map(|m| (m.width, m.height, m.data.iter().copied().collect()))
            })
            .collect();
        for ((s, a), r) in anns.iter().zip(read) {
            let (mw, mh, values) = match r {
                Ok(m) => m,
                Err(e) => {
                    report.problem(a, e.to_string());
                    continue;
                }
            };
            if let Some(&(w, h)) = dims.get(s) {
                if (mw, mh) != (w, h) {
                    report.problem(
                        a,
                        format!("annotation is {mw}x{mh} but its image is {w}x{h}"),
                    );
                }
            }
            if let Some(&bad) = values.iter().find(|&&v| v > MAX_LABEL) {
                report.problem(a, format!("label value {bad} outside 0..={MAX_LABEL}"));
            }
            for v in values {
                *present.entry(format!("label_{v:03}")).or_default() += 1;
            }
        }
        report.count(split, imgs.len(), anns.len(), present);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_zero_label_matches_mmseg() {
        let mut v = vec![0, 1, 2, 150, 255];
        reduce_zero_label(&mut v);
        assert_eq!(v, vec![255, 0, 1, 149, 255]);
    }
}

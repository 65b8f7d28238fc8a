//! torchvision `ImageFolder` layout (ImageNet-1K as MAE uses it): `<root>/{train,val}/<class>/*.{jpg,jpeg,png,JPEG}`.
//!
//! Class index = position of the class folder name in sorted (byte-wise, = Python `sorted`)
//! order; samples are listed class by class, files sorted within a class, as torchvision does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::check::{files_with_ext, probe_and_report, subdirs, CheckOptions, CheckReport};
use super::DataError;

/// Image file extensions accepted (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The two splits of the layout.
pub const SPLITS: [&str; 2] = ["train", "val"];

/// One split of an ImageFolder dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    /// Dataset root (holds `train/` and `val/`).
    pub root: PathBuf,
    /// `train` or `val`.
    pub split: String,
    /// Class folder names, sorted; the label of a class is its index here.
    pub classes: Vec<String>,
    /// `(image path, label)` in class order, files sorted within a class.
    pub samples: Vec<(PathBuf, usize)>,
}

impl ImageFolder {
    /// List `<root>/<split>/<class>/*`. Errors if the split folder is missing or has no images.
    pub fn open(root: &Path, split: &str) -> Result<Self, DataError> {
        let dir = root.join(split);
        if !dir.is_dir() {
            return Err(DataError::layout(
                &dir,
                format!("missing split folder; an ImageFolder dataset needs {}/<class>/<image> for splits {:?}", split, SPLITS),
            ));
        }
        let mut classes = Vec::new();
        let mut samples = Vec::new();
        for cdir in subdirs(&dir)? {
            let label = classes.len();
            classes.push(
                cdir.file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            for f in files_with_ext(&cdir, &IMAGE_EXTENSIONS)? {
                samples.push((f, label));
            }
        }
        if samples.is_empty() {
            return Err(DataError::layout(
                &dir,
                "no images found (expected <class>/*.jpg|jpeg|png|JPEG)",
            ));
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            split: split.to_string(),
            classes,
            samples,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// Check both splits: folders exist, every class has images, images readable, val classes = train classes.
pub(crate) fn check_layout(root: &Path, opts: &CheckOptions, report: &mut CheckReport) {
    let mut class_lists: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for split in SPLITS {
        let dir = root.join(split);
        if !dir.is_dir() {
            report.problem(
                &dir,
                format!("missing split folder `{split}/` (expected {split}/<class>/<image>)"),
            );
            continue;
        }
        let cdirs = match subdirs(&dir) {
            Ok(c) => c,
            Err(e) => {
                report.problem(&dir, format!("cannot list: {e}"));
                continue;
            }
        };
        if cdirs.is_empty() {
            report.problem(&dir, "no class folders");
        }
        let mut names = Vec::new();
        let mut all = Vec::new();
        for cdir in &cdirs {
            let name = cdir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let files = match files_with_ext(cdir, &IMAGE_EXTENSIONS) {
                Ok(f) => f,
                Err(e) => {
                    report.problem(cdir, format!("cannot list: {e}"));
                    Vec::new()
                }
            };
            if files.is_empty() {
                report.problem(cdir, "class folder has no images (.jpg/.jpeg/.png)");
            }
            report.count(split, files.len(), 0, [(name.clone(), files.len())]);
            names.push(name);
            all.extend(files);
        }
        probe_and_report(&all, opts, report);
        class_lists.insert(split, names);
    }
    if let (Some(t), Some(v)) = (class_lists.get("train"), class_lists.get("val")) {
        if t != v {
            let missing: Vec<&String> = t.iter().filter(|c| !v.contains(c)).collect();
            let extra: Vec<&String> = v.iter().filter(|c| !t.contains(c)).collect();
            report.problem(
                root.join("val"),
                format!("val classes differ from train classes (labels would not line up): missing in val {missing:?}, only in val {extra:?}"),
            );
        }
    }
}

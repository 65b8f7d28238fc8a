//! `check(format, path)`: validate a dataset folder, count its samples and fingerprint it.
//!
//! The report lists every problem found (missing or unreadable files, annotation ids that point
//! nowhere, wrong PNG modes...), each naming the file at fault. Only a missing root is an `Err`;
//! everything inside the root becomes a [`Problem`] so that one run shows all of them.
//!
//! The fingerprint is blake3 over the sorted list of `(path relative to the root, size in bytes)`
//! of every regular file under the root. Absolute paths and mtimes are deliberately left out, so
//! a moved or re-copied dataset keeps its fingerprint (the pipeline uses it in stage keys).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ade20k, clevr, coco, davis, imagefolder, DataError, DataFormat};

/// How thorough [`check_with`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckOptions {
    /// Fully decode every image (slow on ImageNet). By default only the image header is read,
    /// which catches missing, empty, garbage and wrongly-typed files but not a truncated body.
    pub decode_images: bool,
}

/// One thing wrong with a dataset, naming the file at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The file (or directory) at fault.
    pub path: PathBuf,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// Counts for one split (`train`, `val`, `training`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    /// Images (ImageFolder, COCO, ADE20K, CLEVR) or frames (DAVIS).
    pub images: usize,
    /// Annotations: COCO objects, ADE20K label maps, DAVIS annotation PNGs, CLEVR scenes.
    pub annotations: usize,
    /// Per class / group: ImageFolder class -> images, COCO category name -> annotations,
    /// DAVIS sequence -> frames, CLEVR `count=<k>` / `dist=<k>` -> images,
    /// ADE20K `label_<v>` -> images containing that label.
    pub classes: BTreeMap<String, usize>,
}

/// The result of [`check`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    /// The format that was checked.
    pub format: DataFormat,
    /// The dataset root actually used (after resolving e.g. `ADEChallengeData2016/`).
    pub root: PathBuf,
    /// Counts per split.
    pub splits: BTreeMap<String, SplitCounts>,
    /// Everything found wrong, in discovery order (deterministic).
    pub problems: Vec<Problem>,
    /// Number of regular files under the root.
    pub n_files: u64,
    /// Total size in bytes of those files.
    pub total_bytes: u64,
    fingerprint: String,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// blake3 (hex) over the sorted `(relative path, size)` list of every file under the root.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Problems whose path ends with `name` (handy in tests and error messages).
    pub fn problems_for(&self, name: &str) -> Vec<&Problem> {
        self.problems
            .iter()
            .filter(|p| p.path.ends_with(name))
            .collect()
    }

    /// A human-readable multi-line summary (at most 20 problems listed).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let status = if self.is_ok() {
            "OK".to_string()
        } else {
            format!("{} problem(s)", self.problems.len())
        };
        let _ = writeln!(
            s,
            "{} dataset at {}: {}",
            self.format,
            self.root.display(),
            status
        );
        let _ = writeln!(
            s,
            "  fingerprint {} ({} files, {:.1} MB)",
            &self.fingerprint[..16.min(self.fingerprint.len())],
            self.n_files,
            self.total_bytes as f64 / 1e6
        );
        for (name, c) in &self.splits {
            let _ = write!(
                s,
                "  {name}: {} images, {} annotations",
                c.images, c.annotations
            );
            if !c.classes.is_empty() {
                if c.classes.len() <= 12 {
                    let parts: Vec<String> =
                        c.classes.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let _ = write!(s, "; {}", parts.join(", "));
                } else {
                    let min = c.classes.values().min().copied().unwrap_or(0);
                    let max = c.classes.values().max().copied().unwrap_or(0);
                    let _ = write!(s, "; {} classes ({min}..{max} each)", c.classes.len());
                }
            }
            s.push('\n');
        }
        if !self.problems.is_empty() {
            s.push_str("  problems:\n");
            for p in self.problems.iter().take(20) {
                let _ = writeln!(s, "    - {p}");
            }
            if self.problems.len() > 20 {
                let _ = writeln!(s, "    ... and {} more", self.problems.len() - 20);
            }
        }
        s
    }

    pub(crate) fn problem(&mut self, path: impl Into<PathBuf>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// `load(path)`, or `None` with the problem reported: `missing` when there is no such file,
    /// the load error when it does not read.
    pub(crate) fn load_or_report<T>(
        &mut self,
        path: &Path,
        missing: String,
        load: impl FnOnce(&Path) -> Result<T, DataError>,
    ) -> Option<T> {
        if !path.is_file() {
            self.problem(path, missing);
            return None;
        }
        load(path)
            .map_err(|e| self.problem(path, e.to_string()))
            .ok()
    }

    /// Adds `images`, `annotations` and per-class counts to `split`'s counts.
    pub(crate) fn count(
        &mut self,
        split: &str,
        images: usize,
        annotations: usize,
        classes: impl IntoIterator<Item = (String, usize)>,
    ) {
        let c = self.splits.entry(split.to_string()).or_default();
        c.images += images;
        c.annotations += annotations;
        for (k, v) in classes {
            *c.classes.entry(k).or_default() += v;
        }
    }
}

/// [`check_with`] with default options (image headers only).
pub fn check(format: DataFormat, path: &Path) -> Result<CheckReport, DataError> {
    check_with(format, path, &CheckOptions::default())
}

/// Validate the dataset at `path` (the dataset root, or its parent for the formats whose archive
/// has a top folder: `ADEChallengeData2016`, `DAVIS`, `CLEVR_v1.0`).
pub fn check_with(
    format: DataFormat,
    path: &Path,
    opts: &CheckOptions,
) -> Result<CheckReport, DataError> {
    if !path.is_dir() {
        return Err(DataError::layout(
            path,
            format!("{format} dataset root does not exist or is not a directory; point to the downloaded dataset or create one with the synthetic generator"),
        ));
    }
    let root = match format {
        DataFormat::ImageFolder | DataFormat::Coco => path.to_path_buf(),
        DataFormat::Ade20k => ade20k::resolve_root(path),
        DataFormat::Davis => davis::resolve_root(path),
        DataFormat::Clevr => clevr::resolve_root(path),
    };
    let files = walk_files(&root)?;
    let mut report = CheckReport {
        format,
        root: root.clone(),
        splits: BTreeMap::new(),
        problems: Vec::new(),
        n_files: files.len() as u64,
        total_bytes: files.iter().map(|f| f.1).sum(),
        fingerprint: hash_file_list(&files),
    };
    match format {
        DataFormat::ImageFolder => imagefolder::check_layout(&root, opts, &mut report),
        DataFormat::Coco => coco::check_layout(&root, opts, &mut report),
        DataFormat::Ade20k => ade20k::check_layout(&root, opts, &mut report),
        DataFormat::Davis => davis::check_layout(&root, opts, &mut report),
        DataFormat::Clevr => clevr::check_layout(&root, opts, &mut report),
    }
    Ok(report)
}

/// The fingerprint of every file under `root` (see the module doc), without checking anything.
pub fn fingerprint_dir(root: &Path) -> Result<String, DataError> {
    Ok(hash_file_list(&walk_files(root)?))
}

fn hash_file_list(files: &[(String, u64)]) -> String {
    let mut h = blake3::Hasher::new();
    for (rel, size) in files {
        h.update(rel.as_bytes());
        h.update(&[0]);
        h.update(&size.to_le_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Every regular file under `root` as (relative path with `/`, size), sorted by path.
fn walk_files(root: &Path) -> Result<Vec<(String, u64)>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs_err::read_dir(&dir)? {
            let path = entry?.path();
            let meta = fs_err::metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((rel.join("/"), meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Sorted entries of `dir` (files and directories).
pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v = Vec::new();
    for e in fs_err::read_dir(dir)? {
        v.push(e?.path());
    }
    v.sort();
    Ok(v)
}

/// Sorted files of `dir` whose extension is one of `exts` (case-insensitive).
pub(crate) fn files_with_ext(dir: &Path, exts: &[&str]) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_file() && has_ext(p, exts))
        .collect())
}

/// Sorted sub-directories of `dir`.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect())
}

/// Case-insensitive extension test.
pub(crate) fn has_ext(p: &Path, exts: &[&str]) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// File stem as a `String` (empty if none).
pub(crate) fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Read the header (or decode fully) of each image, in parallel; order of results = order of
/// `paths`. `Ok((width, height))` or an error message.
pub(crate) fn probe_images(
    paths: &[PathBuf],
    opts: &CheckOptions,
) -> Vec<Result<(u32, u32), String>> {
    paths
        .par_iter()
        .map(|p| probe_image(p, opts.decode_images))
        .collect()
}

fn probe_image(path: &Path, decode: bool) -> Result<(u32, u32), String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| format!("cannot open image: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read image: {e}"))?;
    if reader.format().is_none() {
        return Err(
            "not a recognised image (expected JPEG or PNG); re-download or regenerate it".into(),
        );
    }
    if decode {
        let img = reader
            .decode()
            .map_err(|e| format!("cannot decode image: {e}; re-download or regenerate it"))?;
        Ok((img.width(), img.height()))
    } else {
        reader
            .into_dimensions()
            .map_err(|e| format!("unreadable image header: {e}; re-download or regenerate it"))
    }
}

/// Record problems for failed probes; return the dimensions of the good ones.
pub(crate) fn probe_and_report(
    paths: &[PathBuf],
    opts: &CheckOptions,
    report: &mut CheckReport,
) -> Vec<Option<(u32, u32)>> {
    probe_images(paths, opts)
        .into_iter()
        .zip(paths)
        .map(|(r, p)| match r {
            Ok(d) => Some(d),
            Err(msg) => {
                report.problem(p, msg);
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_location_but_not_names_or_sizes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs_err::create_dir_all(d.join("x/y")).unwrap();
            fs_err::write(d.join("x/y/f.txt"), b"hello").unwrap();
            fs_err::write(d.join("g.bin"), b"12").unwrap();
        }
        let fa = fingerprint_dir(a.path()).unwrap();
        assert_eq!(fa, fingerprint_dir(b.path()).unwrap());
        fs_err::write(b.path().join("g.bin"), b"123").unwrap();
        assert_ne!(fa, fingerprint_dir(b.path()).unwrap());
        fs_err::write(b.path().join("g.bin"), b"12").unwrap();
        assert_eq!(fa, fingerprint_dir(b.path()).unwrap());
        fs_err::rename(b.path().join("g.bin"), b.path().join("h.bin")).unwrap();
        assert_ne!(fa, fingerprint_dir(b.path()).unwrap());
    }
}

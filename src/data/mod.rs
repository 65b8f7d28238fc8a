//! Dataset layer: readers and validators for the five real dataset layouts the C-JEPA
//! evaluations use, deterministic synthetic generators that write real files in exactly those
//! layouts, image transforms and a deterministic parallel batch loader.
//!
//! | format        | layout (root = the path handed to [`check`])                                   |
//! |---------------|---------------------------------------------------------------------------------|
//! | `imagefolder` | `train/<class>/*.{jpg,jpeg,png,JPEG}`, `val/<class>/...` (classes sorted)      |
//! | `coco`        | `annotations/instances_{train,val}2017.json`, `{train,val}2017/*.jpg`          |
//! | `ade20k`      | `[ADEChallengeData2016/]{images,annotations}/{training,validation}/`           |
//! | `davis`       | `[DAVIS/]JPEGImages/480p/<seq>/%05d.jpg`, `Annotations/480p/<seq>/%05d.png`, `ImageSets/2017/{train,val}.txt` |
//! | `clevr`       | `[CLEVR_v1.0/]images/{train,val}/*.png`, `scenes/CLEVR_{train,val}_scenes.json` |
//!
//! Images leave this module as `f32` CHW buffers ([`transforms::Chw`]); converting them to
//! tensors is the caller's job. Every random choice takes an explicit RNG so that results never
//! depend on thread scheduling.

pub mod ade20k;
pub mod augment;
pub mod check;
pub mod clevr;
pub mod clevr_labels;
pub mod coco;
pub mod davis;
pub mod detection;
pub mod idx;
pub mod imagefolder;
pub mod jpeg;
pub mod label_png;
pub mod loader;
pub mod mask;
pub mod resample;
pub mod seg_transforms;
pub mod synth;
pub mod transforms;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use check::{
    check, check_with, fingerprint_dir, CheckOptions, CheckReport, Problem, SplitCounts,
};
pub use loader::{Batch, ImageSamples, Loader, LoaderConfig, Source};
pub use synth::{synth, SynthParams};
pub use transforms::{Chw, Transform};

/// The dataset layouts this crate can read, check and synthesise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// torchvision `ImageFolder` (ImageNet-1K style).
    ImageFolder,
    /// MS-COCO 2017 instances.
    Coco,
    /// ADE20K SceneParsing (ADEChallengeData2016).
    Ade20k,
    /// DAVIS-2017 semi-supervised video object segmentation.
    Davis,
    /// CLEVR v1.0 (Count / Dist labels).
    Clevr,
}

impl DataFormat {
    /// Every format, in a fixed order.
    pub const ALL: [DataFormat; 5] = [
        DataFormat::ImageFolder,
        DataFormat::Coco,
        DataFormat::Ade20k,
        DataFormat::Davis,
        DataFormat::Clevr,
    ];

    /// The lowercase name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::ImageFolder => "imagefolder",
            DataFormat::Coco => "coco",
            DataFormat::Ade20k => "ade20k",
            DataFormat::Davis => "davis",
            DataFormat::Clevr => "clevr",
        }
    }
}

/// `path`, or its folder `inner` when `path` lacks the dataset's `marker` folder and `inner` has
/// it (a dataset root given as the folder its archive unpacked into).
pub(crate) fn root_or_inner(path: &Path, inner: &str, marker: &str) -> PathBuf {
    let nested = path.join(inner);
    if !path.join(marker).is_dir() && nested.join(marker).is_dir() {
        nested
    } else {
        path.to_path_buf()
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataFormat {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        DataFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == t)
            .ok_or_else(|| DataError::UnknownFormat(s.to_string()))
    }
}

/// Errors of the data layer. Messages name the file and say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// File-system failure (the message from `fs-err` names the path).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A format name that is not one of [`DataFormat::ALL`].
    #[error(
        "unknown data format `{0}`; valid formats are: imagefolder, coco, ade20k, davis, clevr"
    )]
    UnknownFormat(String),
    /// A JSON file that does not parse into the expected structure.
    #[error("cannot parse {path}: {source}; the file must follow the {what} format")]
    Json {
        /// The offending file.
        path: PathBuf,
        /// Which format was expected (e.g. "COCO instances").
        what: &'static str,
        /// The parser error (with line/column).
        source: serde_json::Error,
    },
    /// An image that cannot be decoded or encoded.
    #[error("image {path}: {msg}")]
    Image {
        /// The offending file.
        path: PathBuf,
        /// What went wrong and what to do.
        msg: String,
    },
    /// A directory layout that does not match the format.
    #[error("{path}: {msg}")]
    Layout {
        /// The path that is missing or wrong.
        path: PathBuf,
        /// What was expected.
        msg: String,
    },
    /// Annotation content that is inconsistent (bad ids, labels out of range, ...).
    #[error("{path}: {msg}")]
    Invalid {
        /// The annotation file.
        path: PathBuf,
        /// The field / id at fault and the fix.
        msg: String,
    },
    /// Invalid parameters given to a generator, transform or loader.
    #[error("invalid parameter {what}: {msg}")]
    Param {
        /// The parameter name.
        what: &'static str,
        /// Why it is invalid.
        msg: String,
    },
}

impl DataError {
    pub(crate) fn image(path: impl Into<PathBuf>, msg: impl fmt::Display) -> Self {
        DataError::Image {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
    pub(crate) fn layout(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DataError::Layout {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn param(what: &'static str, msg: impl Into<String>) -> Self {
        DataError::Param {
            what,
            msg: msg.into(),
        }
    }

    /// Reads and parses the JSON file `path`, expected to hold `what` (e.g. "COCO instances").
    pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
        path: &Path,
        what: &'static str,
    ) -> Result<T, Self> {
        let bytes = fs_err::read(path)?;
        serde_json::from_slice(&bytes).map_err(|source| Self::json(path, what, source))
    }

    /// Writes `value` as compact JSON to `path`, which holds `what`.
    pub(crate) fn write_json<T: serde::Serialize>(
        path: &Path,
        what: &'static str,
        value: &T,
    ) -> Result<(), Self> {
        let text = serde_json::to_string(value).map_err(|source| Self::json(path, what, source))?;
        fs_err::write(path, text)?;
        Ok(())
    }

    fn json(path: &Path, what: &'static str, source: serde_json::Error) -> Self {
        DataError::Json {
            path: path.to_path_buf(),
            what,
            source,
        }
    }

    /// `Ok` when param `what` is at least `min`, else the error "must be at least `min`
    /// `unit`" (`unit` may go on with why).
    pub(crate) fn at_least<T>(what: &'static str, value: T, min: T, unit: &str) -> Result<(), Self>
    where
        T: PartialOrd + std::fmt::Display,
    {
        match value >= min {
            true => Ok(()),
            false => Err(Self::param(what, format!("must be at least {min} {unit}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_round_trip() {
        for f in DataFormat::ALL {
            assert_eq!(f.as_str().parse::<DataFormat>().unwrap(), f);
            let j = serde_json::to_string(&f).unwrap();
            assert_eq!(j, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<DataFormat>(&j).unwrap(), f);
        }
        let e = "imagenet".parse::<DataFormat>().unwrap_err().to_string();
        assert!(e.contains("imagenet") && e.contains("imagefolder, coco, ade20k, davis, clevr"));
    }
}

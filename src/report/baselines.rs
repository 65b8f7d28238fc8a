//! Published numbers as data: `registry/baselines/*.yaml` (C-JEPA, arXiv 2410.19560, Tables 1-4;
//! I-JEPA, arXiv 2301.08243), each entry with its source, method, architecture, pretraining
//! epochs, evaluation protocol, benchmark and value. A `registry/` folder on disk (at or above the
//! pipeline file) wins file by file over the copies built into the binary
//! ([`crate::spec::registry::EMBEDDED`]).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::spec::registry;

/// Pretraining method of a published row. The ablation names follow the C-JEPA paper's Table 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// I-JEPA (no VICReg term).
    Ijepa,
    /// I-JEPA + the VICReg variance and covariance terms.
    VarCov,
    /// I-JEPA + the VICReg invariance term.
    Inv,
    /// C-JEPA: I-JEPA + the full VICReg term.
    Cjepa,
}

impl Method {
    /// Label as the paper prints it.
    pub fn label(self) -> &'static str {
        match self {
            Method::Ijepa => "I-JEPA",
            Method::VarCov => "+ var/cov",
            Method::Inv => "+ inv",
            Method::Cjepa => "C-JEPA",
        }
    }
}

/// Evaluation protocol (EVALS.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// Linear probe on the frozen, average-pooled target encoder (ImageNet-1K).
    #[serde(rename = "linear")]
    Linear,
    /// End-to-end fine-tuning (ImageNet-1K, MAE recipe).
    #[serde(rename = "finetune")]
    Finetune,
    /// Mask R-CNN on COCO.
    #[serde(rename = "coco-maskrcnn")]
    CocoMaskrcnn,
    /// UperNet on ADE20K.
    #[serde(rename = "ade20k-upernet")]
    Ade20kUpernet,
    /// DAVIS-2017 label propagation.
    #[serde(rename = "davis")]
    Davis,
    /// Linear probe on frozen features for Clevr/Count and Clevr/Dist.
    #[serde(rename = "clevr-linear")]
    ClevrLinear,
}

impl Protocol {
    /// The name used in the YAML and in report tags.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Linear => "linear",
            Protocol::Finetune => "finetune",
            Protocol::CocoMaskrcnn => "coco-maskrcnn",
            Protocol::Ade20kUpernet => "ade20k-upernet",
            Protocol::Davis => "davis",
            Protocol::ClevrLinear => "clevr-linear",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is measured (dataset + metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Benchmark {
    /// ImageNet-1K top-1 accuracy.
    Imagenet,
    /// COCO box AP.
    CocoApBox,
    /// COCO mask AP.
    CocoApMask,
    /// ADE20K mIoU.
    Ade20kMiou,
    /// DAVIS-2017 J&F mean.
    DavisJf,
    /// Clevr/Count top-1 accuracy.
    ClevrCount,
    /// Clevr/Dist top-1 accuracy.
    ClevrDist,
}

impl Benchmark {
    /// Column label of the published benchmark; ImageNet names its protocol, since the paper has
    /// a column for each.
    pub fn label(self, protocol: &str) -> String {
        self.label_on(protocol, super::runs::IMAGENET_LABEL)
    }

    /// Column label of a measurement on the data set `dataset` (the report's name of it, see
    /// [`super::runs::dataset_label`]): image classification names the data set and the
    /// protocol (`IN-1K linear`, `images (synthetic) knn`); the other benchmarks have their data
    /// set in their name.
    pub fn label_on(self, protocol: &str, dataset: &str) -> String {
        match self {
            Benchmark::Imagenet => match protocol {
                "linear" => format!("{dataset} linear"),
                "finetune" => format!("{dataset} fine-tune"),
                p => format!("{dataset} {p}"),
            },
            Benchmark::CocoApBox => "COCO AP^box".into(),
            Benchmark::CocoApMask => "COCO AP^mask".into(),
            Benchmark::Ade20kMiou => "ADE20K mIoU".into(),
            Benchmark::DavisJf => "DAVIS J&F".into(),
            Benchmark::ClevrCount => "Clevr/Count".into(),
            Benchmark::ClevrDist => "Clevr/Dist".into(),
        }
    }
}

/// Where a number was published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Short citation.
    pub paper: String,
    /// arXiv id.
    pub arxiv: String,
    /// Table of the paper (`Table 3`).
    pub table: String,
    /// What the table shows.
    #[serde(default)]
    pub caption: Option<String>,
}

/// One published number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// Where it was published.
    pub source: Source,
    /// True when the number comes from a transcription rather than the PDF itself.
    pub transcribed: bool,
    /// Pretraining method.
    pub method: Method,
    /// Architecture: a `registry/models/` preset name (`vit_base`, `vit_large`, `vit_huge`).
    pub arch: String,
    /// Pretraining epochs.
    pub epochs: u32,
    /// Evaluation protocol.
    pub protocol: Protocol,
    /// Benchmark.
    pub benchmark: Benchmark,
    /// The number, in percent as printed.
    pub value: f64,
    /// Caveats of this entry.
    #[serde(default)]
    pub note: Option<String>,
}

/// A `registry/baselines/*.yaml` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineFile {
    /// The entries, in table order.
    pub baselines: Vec<Baseline>,
}

/// Parse one baselines file.
pub fn parse(text: &str, what: &str) -> Result<BaselineFile, String> {
    serde_yaml::from_str(text).map_err(|e| format!("{what}: {e}"))
}

/// Every baseline: the files of `registry/baselines/` (disk at or above `start` first, file by
/// file, then the embedded copies), in file-name order.
pub fn load_all(start: &Path) -> Result<Vec<Baseline>, String> {
    let mut out = Vec::new();
    for name in registry::names("baselines", start) {
        let (v, src) = registry::load("baselines", &name, start)?;
        let f: BaselineFile =
            serde_json::from_value(v).map_err(|e| format!("baselines `{name}` ({src:?}): {e}"))?;
        out.extend(f.baselines);
    }
    Ok(out)
}

/// Only the copies built into the binary.
pub fn embedded() -> Result<Vec<Baseline>, String> {
    let mut out = Vec::new();
    for (rel, text) in registry::EMBEDDED {
        if rel.starts_with("baselines/") {
            out.extend(parse(text, &format!("embedded {rel}"))?.baselines);
        }
    }
    Ok(out)
}

/// Display name of an architecture preset (`vit_base` -> `ViT-B/16`).
pub fn arch_label(arch: &str) -> String {
    match arch {
        "vit_tiny" => "ViT-T/16".into(),
        "vit_small" => "ViT-S/16".into(),
        "vit_base" => "ViT-B/16".into(),
        "vit_large" => "ViT-L/16".into(),
        "vit_huge" => "ViT-H/14".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_baselines_hold_method_section_7() {
        let b = embedded().unwrap();
        let find = |table: &str, m: Method, p: Protocol, bench: Benchmark| {
            b.iter()
                .find(|x| {
                    x.source.arxiv == "2410.19560"
                        && x.source.table == table
                        && x.method == m
                        && x.protocol == p
                        && x.benchmark == bench
                })
                .map(|x| x.value)
        };
        assert_eq!(
            find(
                "Table 1",
                Method::Cjepa,
                Protocol::Linear,
                Benchmark::Imagenet
            ),
            Some(73.7)
        );
        assert_eq!(
            find(
                "Table 2",
                Method::Ijepa,
                Protocol::ClevrLinear,
                Benchmark::ClevrDist
            ),
            Some(71.2)
        );
        assert_eq!(
            find("Table 3", Method::Inv, Protocol::Davis, Benchmark::DavisJf),
            Some(53.9)
        );
        assert_eq!(
            find(
                "Table 4",
                Method::Ijepa,
                Protocol::Finetune,
                Benchmark::Imagenet
            ),
            Some(83.9)
        );
        assert!(b.iter().all(|x| x.transcribed));
        // 10 + 10 + 12 + 6 from C-JEPA, 5 from I-JEPA
        assert_eq!(b.len(), 43);
    }
}

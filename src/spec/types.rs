//! serde types of the pipeline YAML file (see `cjepa schema` for the JSON Schema).

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::model::precision::Precision;

/// A whole pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline name (defaults to the file stem).
    #[serde(default)]
    pub name: Option<String>,
    /// Store directory (sled database + artifacts), relative to the file. Default `.cjepa`.
    #[serde(default)]
    pub store: Option<String>,
    /// Defaults applied to every stage.
    #[serde(default)]
    pub defaults: Defaults,
    /// Where stages run: `local` (default) or `slurm`. `cjepa run --executor` overrides it.
    #[serde(default)]
    pub executor: Option<ExecutorKind>,
    /// Site options of the Slurm executor (partition, account, qos, extra flags, array throttle).
    #[serde(default)]
    pub slurm: SlurmSite,
    /// The stages, by id, in file order.
    pub stages: IndexMap<String, StageSpec>,
}

/// Pipeline-wide defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Base seed; every random draw derives from it and the stage key.
    #[serde(default)]
    pub seed: u64,
    /// `auto` (GPU if available), `cpu`, `cuda`, `cuda:N`. Not part of stage keys.
    #[serde(default = "default_device")]
    pub device: String,
    /// Default retries for every stage.
    #[serde(default)]
    pub retries: u32,
    /// Arithmetic of the matrix products: `f32` (default; TF32 tensor cores on CUDA) or `bf16`
    /// (bf16 autocast with f32 master weights, see `model::precision`). `bf16` enters the stage
    /// key (its results differ beyond float reordering); `f32` leaves keys as they were.
    #[serde(default)]
    pub precision: Precision,
}

fn default_device() -> String {
    "auto".into()
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            seed: 0,
            device: default_device(),
            retries: 0,
            precision: Precision::F32,
        }
    }
}

/// Which executor runs the stages (not part of stage keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// Child processes on this machine, within `--jobs` and the resource pool.
    #[default]
    Local,
    /// One sbatch job per stage (job arrays for matrix stages).
    Slurm,
}

/// Site options of the Slurm executor (not part of stage keys).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlurmSite {
    /// `--partition`.
    #[serde(default)]
    pub partition: Option<String>,
    /// `--account`.
    #[serde(default)]
    pub account: Option<String>,
    /// `--qos`.
    #[serde(default)]
    pub qos: Option<String>,
    /// Extra sbatch flags, one per item (e.g. `--constraint=a100`), written as `#SBATCH` lines.
    #[serde(default)]
    pub extra: Vec<String>,
    /// At most this many instances of a matrix job array run at once (`--array=0-N%K`).
    #[serde(default)]
    pub array_throttle: Option<u32>,
}

/// A model given by preset name, or a mapping with `preset:` plus inline overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ModelRef {
    /// `model: vit_tiny`
    Preset(String),
    /// `model: { preset: vit_tiny, depth: 4 }`
    Inline(Map<String, Value>),
}

/// One stage (before matrix expansion).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Stage kind (`dataset`, `command`, `pretrain`, ...).
    pub kind: String,
    /// Upstream stage ids.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Kind-specific parameters.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// Model preset from `registry/models/` plus inline overrides.
    #[serde(default)]
    pub model: Option<ModelRef>,
    /// Matrix: param path -> list of values; one stage instance per combination.
    #[serde(default)]
    pub matrix: IndexMap<String, Vec<Value>>,
    /// Resources the stage needs from the pool.
    #[serde(default)]
    pub resources: Resources,
    /// Retries on failure (default: `defaults.retries`).
    #[serde(default)]
    pub retries: Option<u32>,
    /// `f32` or `bf16` for this stage (default: `defaults.precision`).
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Free text shown by `cjepa dag` and `status`.
    #[serde(default)]
    pub description: Option<String>,
    /// Shorthand for `params.source` (dataset stages: `path` or `synth`).
    #[serde(default)]
    pub source: Option<String>,
    /// Shorthand for `params.format` (dataset stages).
    #[serde(default)]
    pub format: Option<String>,
    /// Shorthand for `params.path` (dataset stages).
    #[serde(default)]
    pub path: Option<String>,
    /// Shorthand for `params.cmd` (command stages).
    #[serde(default)]
    pub cmd: Option<String>,
    /// Shorthand for `params.checkpoint` (evaluation stages: `upstream`, `random` or a path).
    #[serde(default)]
    pub checkpoint: Option<String>,
}

impl StageSpec {
    /// Params with the stage-level shorthands folded in. Errors name the duplicated key.
    pub fn merged_params(&self) -> Result<Map<String, Value>, String> {
        let mut p = self.params.clone();
        let sugar = [
            ("source", &self.source),
            ("format", &self.format),
            ("path", &self.path),
            ("cmd", &self.cmd),
            ("checkpoint", &self.checkpoint),
        ];
        for (k, v) in sugar {
            if let Some(v) = v {
                if p.contains_key(k) {
                    return Err(format!(
                        "`{k}` is given both at stage level and in `params`; keep one"
                    ));
                }
                p.insert(k.to_string(), Value::String(v.clone()));
            }
        }
        Ok(p)
    }
}

/// Resources a stage asks the scheduler for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs (indices handed out by the pool).
    #[serde(default)]
    pub gpus: u32,
    /// CPU threads (0 = share what is free).
    #[serde(default)]
    pub cpus: u32,
    /// Memory in GB (Slurm `--mem`).
    #[serde(default)]
    pub mem_gb: Option<f64>,
    /// Wall time (Slurm `--time`, e.g. `12:00:00`).
    #[serde(default)]
    pub time: Option<String>,
    /// Data-parallel processes (ranks) of a stage that trains (`pretrain`, `finetune`,
    /// `ade20k_segmentation`, `coco_detection`); 0 = one per GPU
    /// granted (one on a CPU machine). Set it to run several CPU processes; with GPUs it must
    /// equal `gpus`. The global batch and the schedules do not depend on it.
    #[serde(default)]
    pub ranks: u32,
}

impl Resources {
    /// Processes of a data-parallel stage that holds `granted_gpus` GPUs.
    pub fn world(&self, granted_gpus: usize) -> usize {
        if self.ranks > 0 {
            self.ranks as usize
        } else {
            granted_gpus.max(1)
        }
    }
}

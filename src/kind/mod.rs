//! The stage contract: what the engine (spec, plan, store, exec) knows about a stage kind and
//! what it hands a running stage. Below every user: it imports nothing from `stages/`, `exec/`,
//! `plan/` or `spec/`; the kinds' implementations (in `stages/`) build on it.
//!
//! - [`StageKind`]: the closed set of kinds, their names and static traits;
//! - [`Kind`] ([`hooks`]): each kind's hooks (key, plan checks, cost, process set-up, run),
//!   implemented in `stages/` and handed to the engine as a [`KindTable`];
//! - [`job`]: the job file a stage process reads (resolved config, upstream artifacts, folders);
//! - [`context`]: the running stage's view of the engine ([`StageContext`]) and its result
//!   ([`StageOutput`]);
//! - [`checkpoint`], [`progress`], [`tensorboard`]: the in-stage checkpointer, the progress file
//!   and the live curves a stage writes;
//! - [`report_facts`]: what `cjepa report` reads from a stored stage's params.

pub mod checkpoint;
pub mod context;
pub mod hooks;
pub mod job;
pub mod progress;
pub mod report_facts;
pub mod tensorboard;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use context::{StageContext, StageOutput};
pub use hooks::{
    Cost, KeyInputs, Kind, KindTable, Pass, PlanCheck, PlanIssue, PlanView, Rename, Schedule,
    UpstreamView,
};

use crate::error::Result;

/// Every stage kind the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageKind {
    /// Records a dataset (path + format), fingerprinted by its file list.
    Dataset,
    /// Runs an external program (DVC-style).
    Command,
    /// I-JEPA / C-JEPA self-supervised pretraining.
    Pretrain,
    /// COCO detection + instance segmentation on the ViT (AP^box / AP^mask).
    CocoDetection,
    /// ADE20K semantic segmentation (linear probe or UperNet fine-tune), mIoU.
    Ade20kSegmentation,
    /// DAVIS-2017 video object segmentation by label propagation, J&F.
    DavisVos,
    /// Test-only: counts steps with checkpoints (resume tests).
    #[cfg(feature = "test-stages")]
    Counter,
    /// Linear-probe sweep on frozen features (VISSL / I-JEPA).
    LinearProbe,
    /// Weighted k-NN on frozen features (DINO).
    Knn,
    /// End-to-end fine-tuning (MAE recipe); produces an encoder.
    Finetune,
    /// CLEVR Count linear probe (VISSL).
    ClevrCount,
    /// CLEVR Dist linear probe (VISSL).
    ClevrDist,
}

/// Fields never hashed into a stage key (device choice, worker counts, logging cadence).
pub const NON_SEMANTIC: &[&str] = &[
    "device",
    "workers",
    "threads",
    "log_every",
    "checkpoint_every",
    "checkpoint_secs",
    "progress",
];

impl StageKind {
    /// All kinds, in documentation order.
    pub fn all() -> &'static [StageKind] {
        &[
            StageKind::Dataset,
            StageKind::Command,
            StageKind::Pretrain,
            StageKind::CocoDetection,
            StageKind::Ade20kSegmentation,
            StageKind::DavisVos,
            #[cfg(feature = "test-stages")]
            StageKind::Counter,
            StageKind::LinearProbe,
            StageKind::Knn,
            StageKind::Finetune,
            StageKind::ClevrCount,
            StageKind::ClevrDist,
        ]
    }
    /// Names accepted in `kind:`.
    pub fn names() -> Vec<&'static str> {
        Self::all().iter().map(|k| k.name()).collect()
    }
    /// The `kind:` name.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Dataset => "dataset",
            StageKind::Command => "command",
            StageKind::Pretrain => "pretrain",
            StageKind::CocoDetection => "coco_detection",
            StageKind::Ade20kSegmentation => "ade20k_segmentation",
            StageKind::DavisVos => "davis_vos",
            #[cfg(feature = "test-stages")]
            StageKind::Counter => "counter",
            StageKind::LinearProbe => "linear_probe",
            StageKind::Knn => "knn",
            StageKind::Finetune => "finetune",
            StageKind::ClevrCount => "clevr_count",
            StageKind::ClevrDist => "clevr_dist",
        }
    }
    /// Whether the kind trains data-parallel over `resources.ranks` / `resources.gpus` processes
    /// (the others run as one process whatever their resources).
    pub fn data_parallel(self) -> bool {
        matches!(
            self,
            StageKind::Pretrain
                | StageKind::Finetune
                | StageKind::Ade20kSegmentation
                | StageKind::CocoDetection
        )
    }
    /// Whether stages of this kind provide the data downstream stages train on.
    pub fn provides_data(self) -> bool {
        self == StageKind::Dataset
    }

    /// Parse a `kind:` name.
    pub fn parse(s: &str) -> Option<StageKind> {
        Self::all().iter().copied().find(|k| k.name() == s)
    }
    /// Whether this kind takes a `model:` preset.
    pub fn takes_model(self) -> bool {
        matches!(
            self,
            StageKind::Pretrain
                | StageKind::CocoDetection
                | StageKind::LinearProbe
                | StageKind::Knn
                | StageKind::Finetune
                | StageKind::ClevrCount
                | StageKind::ClevrDist
                | StageKind::Ade20kSegmentation
                | StageKind::DavisVos
        )
    }
}

/// Deserialize params into `P` (deny_unknown_fields) and back, filling defaults.
pub fn resolve<P: DeserializeOwned + Serialize>(
    params: &Map<String, Value>,
) -> std::result::Result<Value, String> {
    resolve_listing::<P>(params, &[])
}

/// [`resolve`] for params with a `#[serde(flatten)]` block (such as the probes' `FrozenEncoder`
/// or [`checkpoint::Cadence`]): serde then names no valid keys in its
/// unknown-key error, so they are read from `P`'s schema.
pub fn resolve_flattened<P: DeserializeOwned + Serialize + schemars::JsonSchema>(
    params: &Map<String, Value>,
) -> std::result::Result<Value, String> {
    let schema = schemars::schema_for!(P);
    let keys: Vec<String> = schema
        .schema
        .object
        .map(|o| o.properties.keys().cloned().collect())
        .unwrap_or_default();
    resolve_listing::<P>(params, &keys)
}

fn resolve_listing<P: DeserializeOwned + Serialize>(
    params: &Map<String, Value>,
    keys: &[String],
) -> std::result::Result<Value, String> {
    let p: P = serde_json::from_value(Value::Object(params.clone())).map_err(|e| {
        let mut s = e.to_string();
        if !keys.is_empty() && s.contains("unknown field `") && !s.contains("expected") {
            let listed: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
            s = format!("{s}, expected one of {}", listed.join(", "));
        }
        crate::util::suggest::unknown_field(&s)
            .map(|(_, m)| m)
            .unwrap_or(s)
    })?;
    serde_json::to_value(p).map_err(|e| e.to_string())
}

/// Read a stage's typed params from its resolved config.
pub fn params_of<P: DeserializeOwned>(ctx: &StageContext) -> Result<P> {
    Ok(serde_json::from_value(ctx.job.config["params"].clone())?)
}

/// A renamed param of resolved or stored `params`, under its new name or, in configs stored
/// before the rename, its old one.
pub fn param(params: &serde_json::Value, r: Rename) -> Option<&serde_json::Value> {
    params.get(r.new).or_else(|| params.get(r.old))
}

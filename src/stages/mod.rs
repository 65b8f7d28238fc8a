//! Stage kinds. Dispatch is a `match` on the closed [`StageKind`] enum; each kind lives in its
//! own file with its params struct (serde, defaults, `deny_unknown_fields`), its implementation
//! version (bump it when a change alters results) and its `run` function.

pub mod ade20k;
pub mod backbone;
pub mod clevr;
pub mod coco_detection;
pub mod command;
pub mod context;
#[cfg(feature = "test-stages")]
pub mod counter;
pub mod dataset;
pub mod davis;
pub mod features;
pub mod finetune;
pub mod knn;
pub mod linear_probe;
pub mod parallel;
pub mod pretrain;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use context::{StageContext, StageOutput};

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

    /// Parse a `kind:` name.
    pub fn parse(s: &str) -> Option<StageKind> {
        Self::all().iter().copied().find(|k| k.name() == s)
    }

    /// Implementation version, part of every key of this kind.
    pub fn version(self) -> u32 {
        match self {
            StageKind::Dataset => dataset::VERSION,
            StageKind::Command => command::VERSION,
            StageKind::Pretrain => pretrain::VERSION,
            StageKind::CocoDetection => coco_detection::VERSION,
            StageKind::Ade20kSegmentation => ade20k::VERSION,
            StageKind::DavisVos => davis::VERSION,
            #[cfg(feature = "test-stages")]
            StageKind::Counter => counter::VERSION,
            StageKind::LinearProbe => linear_probe::VERSION,
            StageKind::Knn => knn::VERSION,
            StageKind::Finetune => finetune::VERSION,
            StageKind::ClevrCount | StageKind::ClevrDist => clevr::VERSION,
        }
    }

    /// Validate params (unknown keys rejected) and return them with every default filled in.
    pub fn resolve_params(self, params: &Map<String, Value>) -> std::result::Result<Value, String> {
        match self {
            StageKind::Dataset => dataset::resolve(params),
            StageKind::Command => resolve::<command::Params>(params),
            StageKind::Pretrain => pretrain::resolve(params),
            StageKind::CocoDetection => coco_detection::resolve(params),
            StageKind::Ade20kSegmentation => resolve::<ade20k::Params>(params),
            StageKind::DavisVos => resolve::<davis::Params>(params),
            #[cfg(feature = "test-stages")]
            StageKind::Counter => resolve::<counter::Params>(params),
            StageKind::LinearProbe => linear_probe::resolve(params),
            StageKind::Knn => knn::resolve(params),
            StageKind::Finetune => finetune::resolve(params),
            StageKind::ClevrCount | StageKind::ClevrDist => clevr::resolve(params),
        }
    }

    /// The params of an empty stage of this kind (hash only what differs from these).
    pub fn default_params(self) -> Value {
        match self {
            StageKind::Dataset => serde_json::to_value(dataset::Params::default()),
            StageKind::Command => serde_json::to_value(command::Params::default()),
            StageKind::Pretrain => serde_json::to_value(pretrain::Params::default()),
            StageKind::CocoDetection => serde_json::to_value(coco_detection::Params::default()),
            StageKind::Ade20kSegmentation => serde_json::to_value(ade20k::Params::default()),
            StageKind::DavisVos => serde_json::to_value(davis::Params::default()),
            #[cfg(feature = "test-stages")]
            StageKind::Counter => serde_json::to_value(counter::Params::default()),
            StageKind::LinearProbe => serde_json::to_value(linear_probe::Params::default()),
            StageKind::Knn => serde_json::to_value(knn::Params::default()),
            StageKind::Finetune => serde_json::to_value(finetune::Params::default()),
            StageKind::ClevrCount | StageKind::ClevrDist => {
                serde_json::to_value(clevr::Params::default())
            }
        }
        .expect("params serialise")
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

    /// Extra key inputs that depend on files (dataset fingerprints, command input digests).
    pub fn key_inputs(
        self,
        params: &Value,
        pipeline_dir: &Path,
    ) -> std::result::Result<Value, String> {
        match self {
            StageKind::Dataset => dataset::key_inputs(params, pipeline_dir),
            StageKind::Command => command::key_inputs(params, pipeline_dir),
            StageKind::Pretrain => Ok(Value::Null),
            StageKind::CocoDetection => Ok(Value::Null),
            StageKind::Ade20kSegmentation | StageKind::DavisVos => Ok(Value::Null),
            #[cfg(feature = "test-stages")]
            StageKind::Counter => Ok(Value::Null),
            StageKind::LinearProbe
            | StageKind::Knn
            | StageKind::Finetune
            | StageKind::ClevrCount
            | StageKind::ClevrDist => features::checkpoint_key_input(params, pipeline_dir),
        }
    }

    /// Run the stage (inside `cjepa exec-stage`).
    pub fn run(self, ctx: &mut StageContext) -> Result<StageOutput> {
        match self {
            StageKind::Dataset => dataset::run(ctx),
            StageKind::Command => command::run(ctx),
            StageKind::Pretrain => pretrain::run(ctx),
            StageKind::CocoDetection => coco_detection::run(ctx),
            StageKind::Ade20kSegmentation => ade20k::run(ctx),
            StageKind::DavisVos => davis::run(ctx),
            #[cfg(feature = "test-stages")]
            StageKind::Counter => counter::run(ctx),
            StageKind::LinearProbe => linear_probe::run(ctx),
            StageKind::Knn => knn::run(ctx),
            StageKind::Finetune => finetune::run(ctx),
            StageKind::ClevrCount => clevr::run(ctx, crate::data::clevr::ClevrTask::Count),
            StageKind::ClevrDist => clevr::run(ctx, crate::data::clevr::ClevrTask::Dist),
        }
    }
}

/// Deserialize params into `P` (deny_unknown_fields) and back, filling defaults.
pub fn resolve<P: DeserializeOwned + Serialize>(
    params: &Map<String, Value>,
) -> std::result::Result<Value, String> {
    let p: P = serde_json::from_value(Value::Object(params.clone())).map_err(|e| {
        let s = e.to_string();
        crate::spec::suggest::unknown_field(&s)
            .map(|(_, m)| m)
            .unwrap_or(s)
    })?;
    serde_json::to_value(p).map_err(|e| e.to_string())
}

/// Read a stage's typed params from its resolved config.
pub fn params_of<P: DeserializeOwned>(ctx: &StageContext) -> Result<P> {
    Ok(serde_json::from_value(ctx.job.config["params"].clone())?)
}

//! The [`Kind`] trait: each stage kind's hooks into the engine (key, plan checks, cost model,
//! process set-up, run). The implementations live in `stages/`, one per kind file; the engine
//! reaches them through a [`KindTable`] it is handed, never by importing `stages/`.

use std::path::Path;

use serde_json::{Map, Value};

use super::job::Job;
use super::{StageContext, StageKind, StageOutput};
use crate::error::Result;
use crate::model::VitConfig;

/// Finds a kind's implementation (`cjepa::stages::table` in the shipped binary).
pub type KindTable = fn(StageKind) -> &'static dyn Kind;

/// A problem found when planning: the field under the stage (`["params", "size"]`) and a
/// message that says what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanIssue {
    /// Path of the offending field below `stages.<id>` (e.g. `["params", "batch"]`).
    pub field: Vec<String>,
    /// What is wrong, and the fix.
    pub msg: String,
}

impl PlanIssue {
    /// An issue with `params.<field>` (`field` may be empty for the whole `params:` block).
    pub fn params(field: &str, msg: impl Into<String>) -> Self {
        let mut path = vec!["params".to_string()];
        if !field.is_empty() {
            path.push(field.to_string());
        }
        Self {
            field: path,
            msg: msg.into(),
        }
    }

    /// An issue with another top-level field of the stage (`resources`, `model`, ...).
    pub fn at(field: &str, msg: impl Into<String>) -> Self {
        Self {
            field: vec![field.to_string()],
            msg: msg.into(),
        }
    }
}

/// An upstream stage as the plan holds it.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamView<'a> {
    /// Its instance id.
    pub id: &'a str,
    /// Its kind.
    pub kind: StageKind,
    /// Its resolved config (`params`, `model`, `seed`, ...).
    pub config: &'a Value,
}

/// A stage being planned, as its kind's [`Kind::check_plan`] sees it.
pub struct PlanView<'a> {
    /// Instance id.
    pub id: &'a str,
    /// Resolved params (every default filled in).
    pub params: &'a Value,
    /// The stage's resolved `model:` mapping, when it has one.
    pub model: Option<&'a Map<String, Value>>,
    /// Data-parallel processes the stage will run as (1 = one process).
    pub world: usize,
    /// The resources field that sets `world` (`resources.ranks` or `resources.gpus`).
    pub world_field: &'a str,
    /// Direct upstream stages, in `needs:` order.
    pub upstream: Vec<UpstreamView<'a>>,
    /// The pipeline file's folder (relative paths are read from it).
    pub pipeline_dir: &'a Path,
    /// The other kinds' hooks (to ask an upstream stage what it produces).
    pub kinds: KindTable,
}

/// What one image costs a stage per epoch, relative to one forward pass of its encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// No network work (datasets, commands).
    None,
    /// One forward pass (frozen-feature probes, k-NN, label propagation).
    Forward,
    /// Forward + backward through the encoder (fine-tuning, detection, segmentation).
    Train,
    /// A JEPA step: target encoder, context encoder and predictor, forward + backward.
    Jepa,
}

/// How long a stage trains, as far as its params say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `epochs` passes over the upstream dataset.
    Epochs(f64),
    /// `iters` steps of `batch` images.
    Iters {
        /// Steps.
        iters: u64,
        /// Images per step.
        batch: u64,
    },
    /// One pass over the dataset (k-NN, label propagation).
    OnePass,
}

/// A stage's inputs to the plan's cost model (`cjepa run --dry-run`'s GPU-hours).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// Work per image.
    pub pass: Pass,
    /// Image side the stage runs at, when its params set one (else the encoder's own).
    pub img_size: Option<usize>,
    /// Its schedule (`None`: the params do not say).
    pub schedule: Option<Schedule>,
}

impl Cost {
    /// No network work at all.
    pub const NONE: Cost = Cost {
        pass: Pass::None,
        img_size: None,
        schedule: None,
    };

    /// `pass` over images of side `img_size` (`None`: the encoder's own) on `schedule`.
    pub fn of(pass: Pass, img_size: Option<usize>, schedule: Schedule) -> Cost {
        Cost {
            pass,
            img_size,
            schedule: Some(schedule),
        }
    }

    /// The cost `f` gives a stage whose params read as `P`; [`Cost::NONE`] when they do not.
    pub fn from_params<P: serde::de::DeserializeOwned>(
        params: &Value,
        f: impl FnOnce(P) -> Cost,
    ) -> Cost {
        serde_json::from_value(params.clone()).map_or(Cost::NONE, f)
    }
}

impl Schedule {
    /// `iters` steps of `batch` images.
    pub fn iters(iters: u64, batch: usize) -> Schedule {
        Schedule::Iters {
            iters,
            batch: batch as u64,
        }
    }
}

/// What a plan check returns: nothing, or the issue that stops the plan.
pub type PlanCheck = std::result::Result<(), PlanIssue>;

/// A kind's extra key inputs (file fingerprints, digests), or why they cannot be read.
pub type KeyInputs = std::result::Result<Value, String>;

/// One stage kind's implementation.
pub trait Kind: Sync {
    /// Implementation version, part of every key of this kind: bump it when a change alters
    /// results.
    fn version(&self) -> u32;

    /// Validate params (unknown keys rejected with a suggestion) and return them with every
    /// default filled in.
    fn resolve_params(&self, params: &Map<String, Value>) -> std::result::Result<Value, String>;

    /// The params of an empty stage of this kind (keys hash only what differs from these).
    fn default_params(&self) -> Value;

    /// Resolved params left out of the key besides [`super::NON_SEMANTIC`] (a dataset's `path`:
    /// its file list's fingerprint is hashed instead).
    fn unkeyed_params(&self) -> &'static [&'static str] {
        &[]
    }

    /// Params renamed to the shared vocabulary (`batch_size`, `img_size`, `patch_size`): the old
    /// spelling is still read, with a deprecation warning, and keys keep hashing the old name so
    /// that no cached result is lost.
    fn renamed_params(&self) -> &'static [Rename] {
        &[]
    }

    /// Extra key inputs that depend on files (dataset fingerprints, input digests).
    fn key_inputs(&self, _params: &Value, _pipeline_dir: &Path) -> KeyInputs {
        Ok(Value::Null)
    }

    /// The encoder this stage builds, as planned, when the plan can tell: its `model:` with the
    /// params that change it applied (pretraining's `img_size` / `patch_size`); `None` when the mapping is
    /// not a complete ViT config (it may come with a checkpoint's `model.json`).
    fn planned_model(&self, model: &Map<String, Value>, _params: &Value) -> Option<VitConfig> {
        serde_json::from_value(Value::Object(model.clone())).ok()
    }

    /// Checks of the params against the model, the upstream stages and the resources, run when
    /// the plan is built (so that a stage that cannot run fails before anything starts).
    fn check_plan(&self, _stage: &PlanView) -> PlanCheck {
        Ok(())
    }

    /// Checks of this process's environment for a planned stage when a run starts (a dataset
    /// folder that must exist, a thread-shard setting that must divide the batch): planning
    /// itself works without the data (dry runs, reports), a run does not start without it.
    fn check_environment(&self, _stage: &PlanView) -> PlanCheck {
        Ok(())
    }

    /// Training images a data-providing stage holds (the cost model's dataset size), when its
    /// params tell.
    fn train_images(&self, _params: &Value, _pipeline_dir: &Path) -> Option<u64> {
        None
    }

    /// The stage's inputs to the plan's cost model.
    fn cost(&self, _params: &Value) -> Cost {
        Cost::NONE
    }

    /// Process-wide set-up of the stage's worker process before its first tensor op (thread
    /// pools, environment). `rank` is the data-parallel rank, `None` for a lone process.
    fn prepare_process(&self, _job: &Job, _rank: Option<usize>) {}

    /// What `cjepa report` reads from a stored stage's params (protocol, schedule, method,
    /// data source); lenient, since records of older versions must still report.
    fn report_facts(&self, params: &Value) -> super::report_facts::ReportFacts {
        super::report_facts::ReportFacts::common(params)
    }

    /// Runs the stage (inside `cjepa exec-stage`).
    fn run(&self, ctx: &mut StageContext) -> Result<StageOutput>;
}

/// A param renamed to the shared vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rename {
    /// The deprecated spelling, still accepted; the key hashes this name.
    pub old: &'static str,
    /// The spelling to write.
    pub new: &'static str,
}

/// `batch` -> `batch_size`.
pub const BATCH: Rename = Rename {
    old: "batch",
    new: "batch_size",
};
/// `img` -> `img_size`.
pub const IMG: Rename = Rename {
    old: "img",
    new: "img_size",
};
/// `patch` -> `patch_size`.
pub const PATCH: Rename = Rename {
    old: "patch",
    new: "patch_size",
};

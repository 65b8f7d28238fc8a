//! The stage kinds' implementations, one file (or folder) per kind: its params struct (serde,
//! defaults, `deny_unknown_fields`), its implementation version (bump it when a change alters
//! results), its [`Kind`] hooks (plan checks, cost, process set-up, report facts) and its `run`
//! recipe. A training kind's step (model, optimiser groups, one update) sits beside it in
//! `<kind>/step.rs` and its unit tests in `<kind>/tests.rs`; [`probe_sweep`] is the head sweep
//! the linear and CLEVR probes share. [`table`] is the one `match` from the closed
//! [`StageKind`] enum to them; the engine is handed it.

/// The hooks every kind writes the same way: its `VERSION`, its params resolved by `$resolve`
/// and defaulted by `Params::default()`, and (with `run`) its `run` function.
macro_rules! kind_basics {
    ($resolve:expr) => {
        fn version(&self) -> u32 {
            VERSION
        }

        fn resolve_params(
            &self,
            params: &serde_json::Map<String, serde_json::Value>,
        ) -> std::result::Result<serde_json::Value, String> {
            $resolve(params)
        }

        fn default_params(&self) -> serde_json::Value {
            crate::stages::to_json(&Params::default())
        }
    };
    ($resolve:expr, run) => {
        kind_basics!($resolve);

        fn run(
            &self,
            ctx: &mut crate::kind::StageContext,
        ) -> crate::error::Result<crate::kind::StageOutput> {
            run(ctx)
        }
    };
}

/// A kind's `key_inputs` hook that hands the stage's params and the pipeline folder to `$f`.
macro_rules! key_inputs_by {
    ($f:path) => {
        fn key_inputs(
            &self,
            params: &serde_json::Value,
            pipeline_dir: &std::path::Path,
        ) -> crate::kind::KeyInputs {
            $f(params, pipeline_dir)
        }
    };
}

/// The hooks of a kind that reads a frozen or fine-tuned encoder (`checkpoint:`) and a dataset
/// upstream: a checkpoint file's hash in the key (`key_inputs`) and `img` read as `img_size`
/// (`renamed_params`); given the dataset format (`None`: any image dataset), also the plan
/// checks of the encoder and the dataset (`check_plan`), which `own_check_plan` leaves to the
/// kind.
macro_rules! encoder_hooks {
    (own_check_plan) => {
        key_inputs_by!(super::features::checkpoint_key_input);

        fn renamed_params(&self) -> &'static [crate::kind::Rename] {
            &[crate::kind::hooks::IMG]
        }
    };
    ($format:expr) => {
        encoder_hooks!(own_check_plan);

        fn check_plan(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
            super::backbone::check_plan(stage)?;
            super::dataset::check_plan_upstream(stage, $format, true)
        }
    };
}

pub mod ade20k;
pub mod backbone;
pub mod clevr;
pub mod coco_detection;
pub mod command;
#[cfg(feature = "test-stages")]
pub mod counter;
pub mod dataset;
pub mod davis;
pub mod features;
pub mod finetune;
pub mod knn;
pub mod linear_probe;
pub mod pretrain;
pub mod probe_sweep;

use serde::Serialize;
use serde_json::Value;

pub use crate::kind::{
    params_of, resolve, resolve_flattened, StageContext, StageKind, StageOutput, NON_SEMANTIC,
};

use crate::kind::Kind;

/// The implementation of `kind` (the [`crate::kind::KindTable`] the engine is handed).
pub fn table(kind: StageKind) -> &'static dyn Kind {
    match kind {
        StageKind::Dataset => &dataset::Dataset,
        StageKind::Command => &command::CommandStage,
        StageKind::Pretrain => &pretrain::Pretrain,
        StageKind::CocoDetection => &coco_detection::CocoDetection,
        StageKind::Ade20kSegmentation => &ade20k::Ade20kSegmentation,
        StageKind::DavisVos => &davis::DavisVos,
        #[cfg(feature = "test-stages")]
        StageKind::Counter => &counter::Counter,
        StageKind::LinearProbe => &linear_probe::LinearProbe,
        StageKind::Knn => &knn::Knn,
        StageKind::Finetune => &finetune::Finetune,
        StageKind::ClevrCount => &clevr::CLEVR_COUNT,
        StageKind::ClevrDist => &clevr::CLEVR_DIST,
    }
}

/// Params as JSON (the params structs always serialise).
pub(crate) fn to_json<P: Serialize>(p: &P) -> Value {
    serde_json::to_value(p).expect("params serialise")
}

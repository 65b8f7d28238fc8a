//! The pipeline file: serde types, registry presets, `--set` overrides, matrix expansion and
//! validation with file / line / column errors.

pub mod datasets;
pub mod load;
pub mod locate;
pub mod matrix;
pub mod overrides;
pub mod registry;
pub mod types;

pub use load::{load_pipeline, LoadOptions, Pipeline};
pub use matrix::{expand, Instance};
pub use types::{Defaults, ExecutorKind, PipelineFile, Resources, SlurmSite, StageSpec};

//! cjepa: reproduce and extend C-JEPA (I-JEPA + VICReg) as cached, resumable pipelines.
//!
//! The data's way through the crate: [`spec`] (YAML -> validated pipeline) -> [`plan`] (matrix
//! instances, resolved configs, semantic keys, DAG) -> [`store`] (sled records + artifact files)
//! -> [`exec`] (local scheduler, `exec-stage` worker, checkpoints) -> [`stages`] (one file per
//! kind) -> [`report`] (tables).
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod data;
pub mod error;
pub mod eval;
pub mod exec;
pub mod kind;
pub mod model;
pub mod plan;
pub mod report;
pub mod spec;
pub mod stages;
pub mod store;
pub mod train;
pub mod util;

pub use error::{Error, Result};

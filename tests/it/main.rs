//! One integration test binary: golden reference tests and tests driving the real `cjepa`.

mod checkpoint;
mod classify;
mod closed_stdout;
mod convergence;
mod data_formats;
mod data_parallel;
mod detect;
mod engine;
mod errors;
mod examples;
mod golden;
mod golden_clevr;
mod golden_coco;
mod golden_davis;
mod golden_masks;
mod golden_model;
mod golden_schedules;
mod golden_segmentation;
mod golden_trajectory;
#[cfg(feature = "nccl")]
mod nccl;
mod paper_values;
mod pretrain;
mod report;
#[cfg(feature = "test-stages")]
mod resume;
mod segstages;
mod slurm;
mod util;

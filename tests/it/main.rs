//! One integration test binary: golden reference tests and tests driving the real `cjepa`.

mod data_formats;
mod golden;
mod golden_clevr;
mod golden_coco;
mod golden_davis;
mod golden_masks;
mod golden_model;
mod golden_schedules;
mod golden_segmentation;
mod report;

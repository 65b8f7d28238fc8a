//! The programs under `examples/`, their cores called as functions on tiny inputs (the files are
//! included as modules, so the code tested is the code shown): the pipeline runs, then is
//! cached; a folder embeds; a synthetic COCO results file evaluates.

use std::path::PathBuf;

use cjepa::exec::core::{Event, Reporter};

#[path = "../../examples/two_stage_pipeline.rs"]
#[allow(dead_code)]
mod two_stage_pipeline;

#[path = "../../examples/embed_folder.rs"]
#[allow(dead_code)]
mod embed_folder;

#[path = "../../examples/eval_coco_results.rs"]
#[allow(dead_code)]
mod eval_coco_results;

struct Quiet;

impl Reporter for Quiet {
    fn event(&mut self, _: Event) {}
}

#[test]
fn two_stage_pipeline_runs_then_is_cached() {
    let d = tempfile::tempdir().unwrap();
    // This test binary is no worker; the `cjepa` binary is.
    let worker = Some(PathBuf::from(env!("CARGO_BIN_EXE_cjepa")));
    let first = two_stage_pipeline::run_once(d.path(), worker.clone(), &mut Quiet).unwrap();
    let ids: Vec<&str> = first.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["data", "pretrain"]);
    assert!(first.iter().all(|r| !r.cached));
    assert!(first[1].metrics.values().all(|v| v.is_finite()));
    assert!(!first[1].metrics.is_empty());
    let second = two_stage_pipeline::run_once(d.path(), worker, &mut Quiet).unwrap();
    for (a, b) in first.iter().zip(&second) {
        assert!(b.cached, "{} ran again", b.id);
        assert_eq!(a.key, b.key);
        assert_eq!(a.metrics, b.metrics);
    }
}

#[test]
fn embed_folder_embeds_a_synthetic_folder() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("shapes");
    let params = cjepa::data::SynthParams::tiny();
    cjepa::data::synth(cjepa::data::DataFormat::ImageFolder, &root, 0, &params).unwrap();
    let dev = candle_core::Device::Cpu;
    let (files, emb) = embed_folder::embed(&root.join("val"), None, None, &dev).unwrap();
    let n = params.imagefolder.classes * params.imagefolder.val_per_class;
    assert_eq!(files.len(), n);
    let d_model = embed_folder::tiny_vit().embed_dim;
    assert_eq!(emb.last.dims(), [n, d_model]);
    assert_eq!(emb.last4.dims(), [n, 2 * d_model], "two blocks in last4");
}

#[test]
fn eval_coco_results_scores_its_synthetic_results() {
    let d = tempfile::tempdir().unwrap();
    let (gt, dt) = eval_coco_results::synthetic_inputs(d.path()).unwrap();
    let report = eval_coco_results::evaluate(&gt, &dt, "both").unwrap();
    for r in report.results() {
        let ap = r.stats[0];
        // Most objects found, boxes a little off: well above zero, below perfect.
        assert!(
            ap > 0.2 && ap < 1.0,
            "{}: {:?}",
            r.iou_type.as_str(),
            r.stats
        );
    }
    assert!(report.bbox.is_some() && report.segm.is_some());
}

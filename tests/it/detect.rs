//! COCO detection: `cjepa eval coco` on the golden cases, the `coco_detection` stage end to end
//! on a tiny synthetic dataset (valid stats, second run cached, results file reproduces the
//! metrics) and its bit-identical resume from an in-stage checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use assert_cmd::Command;
use cjepa::kind::checkpoint::Checkpointer;
use cjepa::kind::job::{Job, UpstreamRef};
use cjepa::kind::progress::ProgressFile;
use cjepa::stages::{StageContext, StageKind};
use serde_json::{json, Value};

use super::golden;

fn cjepa() -> Command {
    Command::cargo_bin("cjepa").expect("binary")
}

fn eval_json(gt: &Path, dt: &Path, iou: &str) -> Value {
    let out = cjepa()
        .args(["eval", "coco", "--gt"])
        .arg(gt)
        .arg("--dt")
        .arg(dt)
        .args(["--iou-type", iou, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn eval_coco_cli_matches_golden_stats() {
    let mut n = 0;
    for case in golden::cases("metrics/coco") {
        let gt = case.join("instances_gt.json");
        if !gt.exists() {
            continue;
        }
        n += 1;
        let exp: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        let got = eval_json(&gt, &case.join("detections.json"), "both");
        for t in ["bbox", "segm"] {
            let g = got[t]["stats"].as_array().unwrap();
            let e = exp[t].as_array().unwrap();
            assert_eq!(g.len(), 12);
            for (i, (a, b)) in g.iter().zip(e).enumerate() {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-9,
                    "{} {t} stat {i}: {a} vs {b}",
                    case.display()
                );
            }
        }
        let only = eval_json(&gt, &case.join("detections.json"), "segm");
        assert!(only.get("bbox").is_none() && only.get("segm").is_some());
        // text mode: the pycocotools summary
        let out = cjepa()
            .args(["eval", "coco", "--iou-type", "bbox", "--gt"])
            .arg(&gt)
            .arg("--dt")
            .arg(case.join("detections.json"))
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("] = ")).collect();
        assert_eq!(lines.len(), 12, "{text}");
        let ap = exp["bbox"][0].as_f64().unwrap();
        assert!(lines[0].ends_with(&format!("= {ap:.3}")), "{}", lines[0]);
    }
    assert!(n >= 2, "golden COCO cases present");
}

#[test]
fn eval_coco_cli_bad_files_exit_2_naming_the_id() {
    let case = golden::cases("metrics/coco")
        .into_iter()
        .find(|c| c.join("instances_gt.json").exists())
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    let dt = d.path().join("dt.json");
    std::fs::write(
        &dt,
        r#"[{"image_id": 987654321, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]"#,
    )
    .unwrap();
    let out = cjepa()
        .args(["eval", "coco", "--gt"])
        .arg(case.join("instances_gt.json"))
        .arg("--dt")
        .arg(&dt)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("987654321") && err.contains("dt.json"),
        "{err}"
    );
    // ground truth with an annotation pointing at a missing image
    let mut gt: Value =
        serde_json::from_slice(&std::fs::read(case.join("instances_gt.json")).unwrap()).unwrap();
    let ann_id = gt["annotations"][0]["id"].clone();
    gt["annotations"][0]["image_id"] = json!(55555555);
    let gtp = d.path().join("gt.json");
    std::fs::write(&gtp, serde_json::to_vec(&gt).unwrap()).unwrap();
    let out = cjepa()
        .args(["eval", "coco", "--gt"])
        .arg(&gtp)
        .arg("--dt")
        .arg(case.join("detections.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("annotation {ann_id}")) && err.contains("55555555"),
        "{err}"
    );
    let out = cjepa()
        .args(["eval", "coco", "--iou-type", "keypoints", "--gt"])
        .arg(&gtp)
        .arg("--dt")
        .arg(&dt)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // a missing file, malformed JSON and a bad mask each name the file (and the detection)
    let missing = d.path().join("no_such_gt.json");
    let bad_json = d.path().join("truncated.json");
    std::fs::write(&bad_json, r#"[{"image_id": 1, "category_id""#).unwrap();
    let img = gt["images"][0]["id"].clone();
    let cat = gt["categories"][0]["id"].clone();
    let bad_rle = d.path().join("bad_rle.json");
    std::fs::write(
        &bad_rle,
        json!([{"image_id": img, "category_id": cat, "score": 0.5,
                "segmentation": {"size": [1, 1], "counts": "5 "}}])
        .to_string(),
    )
    .unwrap();
    let gt_ok = case.join("instances_gt.json");
    for (g, t, want) in [
        (&missing, &dt, vec!["no_such_gt.json"]),
        (&gt_ok, &bad_json, vec!["truncated.json", "line 1"]),
        (&gt_ok, &bad_rle, vec!["bad_rle.json", "detection 0"]),
    ] {
        let out = cjepa()
            .args(["eval", "coco", "--gt"])
            .arg(g)
            .arg("--dt")
            .arg(t)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(want.iter().all(|w| err.contains(w)), "{want:?}: {err}");
    }
    // the old top-level name is gone
    let out = cjepa().arg("eval-coco").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

const TINY_MODEL: &str = "{preset: vit_tiny, img_size: 64, depth: 2, embed_dim: 32, num_heads: 2, pred_embed_dim: 32, pred_depth: 1, pred_num_heads: 2}";

fn tiny_params() -> Value {
    json!({
        "checkpoint": "random",
        "img_size": 64,
        "scale_range": [0.5, 1.5],
        "steps": 3,
        "batch_size": 2,
        "warmup_steps": 1,
        "lr": 1e-3,
        "eval_batch_size": 2,
        "head": {"fpn_dim": 16, "head_convs": 1, "mask_convs": 1, "roi_size": 7,
                 "score_thresh": 0.001, "mask_rois_per_image": 8}
    })
}

#[test]
fn tiny_pipeline_runs_end_to_end_and_caches() {
    let d = tempfile::tempdir().unwrap();
    let params = serde_yaml::to_string(&tiny_params()).unwrap();
    let params: String = params.lines().map(|l| format!("      {l}\n")).collect();
    let yaml = format!(
        "name: detect_test\ndefaults:\n  device: cpu\nstages:\n  coco:\n    kind: dataset\n    source: synth\n    format: coco\n    params: {{train_images: 4, val_images: 3, width: 96, height: 96, max_objects: 3}}\n  detect:\n    kind: coco_detection\n    needs: [coco]\n    model: {TINY_MODEL}\n    params:\n{params}  frozen:\n    kind: coco_detection\n    needs: [coco]\n    model: {TINY_MODEL}\n    params:\n      backbone: frozen\n{params}"
    );
    let file = d.path().join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = cjepa()
        .arg("run")
        .arg(&file)
        .arg("--plain")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    assert!(err.contains("3 ran, 0 cached"), "{err}");
    let out = cjepa()
        .arg("run")
        .arg(&file)
        .arg("--plain")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() && err.contains("0 ran, 3 cached"),
        "{err}"
    );

    let store = cjepa::store::Store::open(&d.path().join(".cjepa"), false, "test").unwrap();
    let recs = store.records().unwrap();
    let rec = |id: &str| recs.iter().find(|r| r.stage_id == id).unwrap().clone();
    let det = rec("detect");
    let data_root = store.artifact_dir(&rec("coco").key).join("data");
    for t in ["box", "mask"] {
        let ap = det.metrics[&format!("ap_{t}")];
        assert!((0.0..=100.0).contains(&ap), "ap_{t} = {ap}");
        assert!(det.metrics.contains_key(&format!("ar100_{t}")));
    }
    assert_eq!(det.metrics["steps"], 3.0);
    assert_eq!(det.series["loss"].len(), 3);
    assert!(det.info["detections"].as_u64().unwrap() > 0, "{}", det.info);
    // one device read per step, the predicted boxes for the mask RoIs; the losses are read by
    // the shared loop, not by the step
    assert_eq!(det.info["host_reads_in_steps"], 3, "{}", det.info);
    let arts = store.artifact_dir(&det.key);
    for f in [
        "results.json",
        "eval.json",
        "eval.txt",
        "detector.safetensors",
        "config.json",
    ] {
        assert!(arts.join(f).is_file(), "{f}");
    }
    // fine-tuning saves the encoder with the heads, the frozen variant only the heads
    let keys = |r: &cjepa::store::Record| -> Vec<String> {
        let f = store.artifact_dir(&r.key).join("detector.safetensors");
        candle_core::safetensors::load(f, &candle_core::Device::Cpu)
            .unwrap()
            .into_keys()
            .collect()
    };
    let (ft, fz) = (keys(&det), keys(&rec("frozen")));
    assert!(ft.iter().any(|k| k.starts_with("backbone.blocks.1.")));
    assert!(fz.iter().all(|k| k.starts_with("det.")) && !fz.is_empty());
    assert_eq!(rec("frozen").info["protocol"], "frozen");
    drop(store);
    // The results file reproduces the stored metrics through the CLI.
    let gt = data_root.join("annotations/instances_val2017.json");
    let got = eval_json(&gt, &arts.join("results.json"), "both");
    let names = [
        "ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10", "ar100", "ars", "arm", "arl",
    ];
    for (t, suffix) in [("bbox", "box"), ("segm", "mask")] {
        for (i, n) in names.iter().enumerate() {
            let s = got[t]["stats"][i].as_f64().unwrap();
            match det.metrics.get(&format!("{n}_{suffix}")) {
                Some(m) => assert!((m - 100.0 * s).abs() < 1e-9, "{n}_{suffix}: {m} vs {s}"),
                None => assert_eq!(s, -1.0, "{n}_{suffix} missing but defined"),
            }
        }
    }
    let results: Value =
        serde_json::from_slice(&std::fs::read(arts.join("results.json")).unwrap()).unwrap();
    let first = &results[0];
    assert!(
        first["segmentation"]["counts"].is_string(),
        "compressed RLE: {first}"
    );
}

/// A job for the stage outside the engine (same key, own work folder).
fn job(data: &Path, work: &Path, params: &Value) -> Job {
    let model: Value = json!({
        "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "pred_embed_dim": 32, "pred_depth": 1, "pred_num_heads": 2
    });
    let resolved = cjepa::stages::table(StageKind::CocoDetection)
        .resolve_params(params.as_object().unwrap())
        .unwrap();
    let mut upstream = BTreeMap::new();
    upstream.insert(
        "coco".to_string(),
        UpstreamRef {
            id: "coco".into(),
            kind: "dataset".into(),
            key: "0".repeat(64),
            artifacts: data.to_path_buf(),
            config: Value::Null,
            metrics: Default::default(),
            info: json!({"path": data, "format": "coco"}),
        },
    );
    let out = work.join("out");
    std::fs::create_dir_all(&out).unwrap();
    Job {
        id: "detect".into(),
        kind: "coco_detection".into(),
        key: "ab".repeat(32),
        config: json!({"params": resolved, "model": model, "seed": 0}),
        seed: 0,
        upstream,
        out_dir: out,
        work_dir: work.to_path_buf(),
        pipeline_dir: work.to_path_buf(),
        device: "cpu".into(),
        threads: 0,
        gpus: vec![],
        ranks: 1,
        dist: None,
    }
}

fn run_stage(job: Job, every: u64) -> cjepa::stages::StageOutput {
    let mut ctx = StageContext {
        ckpt: Checkpointer::new(job.ckpt_dir(), every, 0),
        progress: ProgressFile::new(job.progress_file()),
        interrupted: Arc::new(AtomicBool::new(false)),
        job,
        curves: Default::default(),
    };
    cjepa::stages::table(StageKind::CocoDetection)
        .run(&mut ctx)
        .unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p: PathBuf = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn resume_from_checkpoint_is_bit_identical() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let mut sp = cjepa::data::SynthParams::tiny();
    sp.coco.train_images = 4;
    sp.coco.val_images = 2;
    sp.coco.width = 96;
    sp.coco.height = 96;
    sp.coco.max_objects = 3;
    cjepa::data::synth(cjepa::data::DataFormat::Coco, &data, 7, &sp).unwrap();
    let mut params = tiny_params();
    params["steps"] = json!(4);
    params["clip_grad_norm"] = json!(1.0);
    // straight run, checkpointing at step 2
    let a = d.path().join("a");
    let out_a = run_stage(job(&data, &a, &params), 2);
    let ck = a.join("ckpt");
    assert!(ck.join("step-000000000002").is_dir());
    // a second run that finds only that checkpoint
    let b = d.path().join("b");
    copy_dir(&ck, &b.join("ckpt"));
    let out_b = run_stage(job(&data, &b, &params), 0);
    assert_eq!(out_a.metrics, out_b.metrics);
    assert_eq!(out_a.series, out_b.series);
    for f in ["results.json", "detector.safetensors"] {
        let fa = std::fs::read(a.join("out").join(f)).unwrap();
        let fb = std::fs::read(b.join("out").join(f)).unwrap();
        assert!(fa == fb, "{f} differs after resume");
    }
    assert_eq!(out_a.info["resumed_from"], 0);
    assert_eq!(out_b.info["resumed_from"], 2);
}

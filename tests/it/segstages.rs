//! `cjepa eval seg|davis` on the golden metric cases, and the `ade20k_segmentation` /
//! `davis_vos` stages on tiny synthetic pipelines (run, metrics in range, cached on a rerun).

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

use crate::golden;

const TOL: f64 = 1e-6;

fn cjepa() -> Command {
    Command::cargo_bin("cjepa").expect("binary built")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn close(what: &str, got: &Value, want: &Value) {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() <= TOL, "{what}: got {g}, want {w}"),
        (None, None) => assert!(got.is_null() && want.is_null(), "{what}: {got} vs {want}"),
        _ => panic!("{what}: got {got}, want {want}"),
    }
}

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn eval_seg_json_matches_golden() {
    let cases = golden::cases("metrics/ade20k");
    assert!(!cases.is_empty());
    for case in cases {
        let exp = read_json(&case.join("expected.json"));
        let out = cjepa()
            .args(["eval", "seg", "--json", "--gt"])
            .arg(case.join("annotations"))
            .arg("--pred")
            .arg(case.join("predictions"))
            .output()
            .unwrap();
        let got = stdout_json(&out);
        for k in ["mIoU", "aAcc", "mAcc"] {
            close(k, &got[k], &exp[k]);
        }
        let per_class = got["per_class"].as_array().expect("per_class list");
        assert_eq!(Some(per_class.len() as u64), exp["num_classes"].as_u64());
        for (c, row) in per_class.iter().enumerate() {
            assert_eq!(row["class"].as_u64(), Some(c as u64));
            for k in ["IoU", "Acc"] {
                close(&format!("{k}[{c}]"), &row[k], &exp["per_class"][k][c]);
            }
        }
        assert_eq!(got["totals"], exp["totals"]);
    }
}

#[test]
fn eval_seg_table_and_bad_input() {
    let case = golden::cases("metrics/ade20k").remove(0);
    let exp = read_json(&case.join("expected.json"));
    let out = cjepa()
        .args(["eval", "seg", "--gt"])
        .arg(case.join("annotations"))
        .arg("--pred")
        .arg(case.join("predictions"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let miou = format!("mIoU {:.2}", exp["mIoU"].as_f64().unwrap());
    assert!(text.contains(&miou), "{text}");
    assert!(text.contains("Class") && text.contains("IoU"), "{text}");

    // A prediction folder missing one file: exit 2, the message names the missing file.
    let tmp = tempfile::tempdir().unwrap();
    let pred = tmp.path().join("pred");
    std::fs::create_dir(&pred).unwrap();
    let mut names: Vec<PathBuf> = std::fs::read_dir(case.join("predictions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let missing = names.pop().unwrap();
    for n in &names {
        std::fs::copy(n, pred.join(n.file_name().unwrap())).unwrap();
    }
    let out = cjepa()
        .args(["eval", "seg", "--gt"])
        .arg(case.join("annotations"))
        .arg("--pred")
        .arg(&pred)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let stem = missing.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&stem), "stderr does not name {stem}: {err}");

    // A corrupt PNG: exit 2 naming it.
    std::fs::copy(&missing, pred.join(missing.file_name().unwrap())).unwrap();
    std::fs::write(pred.join(&names[0].file_name().unwrap()), b"not a png").unwrap();
    let out = cjepa()
        .args(["eval", "seg", "--gt"])
        .arg(case.join("annotations"))
        .arg("--pred")
        .arg(&pred)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let bad = names[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&bad), "stderr does not name {bad}: {err}");
}

#[test]
fn eval_davis_json_matches_golden() {
    let cases = golden::cases("metrics/davis");
    assert!(!cases.is_empty());
    for case in cases {
        let exp = read_json(&case.join("expected.json"));
        let out = cjepa()
            .args(["eval", "davis", "--json", "--set"])
            .arg(golden::davis_set(&case))
            .arg("--davis")
            .arg(&case)
            .arg("--pred")
            .arg(case.join("predictions"))
            .output()
            .unwrap();
        let got = stdout_json(&out);
        for k in [
            "J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay",
        ] {
            close(k, &got["global"][k], &exp["global"][k]);
        }
        assert_eq!(got["per_object_order"], exp["per_object_order"]);
        let seqs = exp["sequences"].as_object().unwrap();
        for (name, s) in seqs {
            for (id, o) in s["objects"].as_object().unwrap() {
                let g = &got["sequences"][name]["objects"][id];
                for m in ["J", "F"] {
                    for st in ["mean", "recall", "decay"] {
                        close(&format!("{name}_{id} {m} {st}"), &g[m][st], &o[m][st]);
                    }
                    let key = format!("{m}_per_frame");
                    let (gv, wv) = (g[&key].as_array().unwrap(), o[&key].as_array().unwrap());
                    assert_eq!(gv.len(), wv.len());
                    for (i, (a, b)) in gv.iter().zip(wv).enumerate() {
                        close(&format!("{name}_{id} {key}[{i}]"), a, b);
                    }
                }
            }
        }
    }
}

#[test]
fn eval_davis_table_and_bad_input() {
    let case = golden::cases("metrics/davis").remove(0);
    let exp = read_json(&case.join("expected.json"));
    let out = cjepa()
        .args(["eval", "davis", "--davis"])
        .arg(&case)
        .arg("--pred")
        .arg(case.join("predictions"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for h in ["J&F-Mean", "J-Recall", "F-Decay", "Sequence", "bear-walk_1"] {
        assert!(text.contains(h), "missing {h}: {text}");
    }
    let jf = format!("{:.3}", exp["global"]["J&F-Mean"].as_f64().unwrap());
    assert!(text.contains(&jf), "{text}");

    // Predictions of one sequence missing a frame: exit 2 naming the frame file.
    let tmp = tempfile::tempdir().unwrap();
    let pred = tmp.path().join("pred");
    for e in std::fs::read_dir(case.join("predictions")).unwrap() {
        let seq = e.unwrap().path();
        let dst = pred.join(seq.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        for f in std::fs::read_dir(&seq).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    let gone = pred.join("kite-fly").join("00002.png");
    std::fs::remove_file(&gone).unwrap();
    let out = cjepa()
        .args(["eval", "davis", "--davis"])
        .arg(&case)
        .arg("--pred")
        .arg(&pred)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kite-fly") && err.contains("00002.png"),
        "{err}"
    );

    // An unknown image set: exit 2 naming the list file.
    let out = cjepa()
        .args(["eval", "davis", "--set", "test-dev", "--davis"])
        .arg(&case)
        .arg("--pred")
        .arg(case.join("predictions"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("test-dev.txt"), "{err}");
}

/// Run `cjepa run` on `pipeline` with its store in `store` (one CPU thread: tiny models run
/// fastest without thread synchronisation); returns stderr.
fn run_pipeline(pipeline: &Path, store: &Path) -> String {
    let out = cjepa()
        .args([
            "run",
            "--plain",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--store",
        ])
        .arg(store)
        .arg(pipeline)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "cjepa run failed: {err}\n{}",
        logs(store)
    );
    err
}

/// Every stage log under the store (shown when a run fails).
fn logs(store: &Path) -> String {
    let mut s = String::new();
    for f in files_named(store, "stage.log") {
        s.push_str(&format!("--- {}\n", f.display()));
        s.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
    }
    s
}

fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_named(&p, name));
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
    out
}

/// Metric rows of `cjepa report --format json`, by stage id.
fn report(pipeline: &Path, store: &Path) -> std::collections::BTreeMap<String, Value> {
    let out = cjepa()
        .args([
            "report", "--tables", "metrics", "--format", "json", "--store",
        ])
        .arg(store)
        .arg(pipeline)
        .output()
        .unwrap();
    let v = stdout_json(&out);
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["stage"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

fn in_range(row: &Value, k: &str, lo: f64, hi: f64) -> f64 {
    let v = row[k]
        .as_f64()
        .unwrap_or_else(|| panic!("metric {k} missing in {row}"));
    assert!((lo..=hi).contains(&v), "{k} = {v} outside [{lo}, {hi}]");
    v
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/examples/seg_tiny.yaml")
}

#[test]
fn seg_tiny_pipeline_runs_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let pipeline = example();
    let err = run_pipeline(&pipeline, &store);
    assert!(err.contains("5 ran, 0 cached, 0 failed"), "{err}");
    let rows = report(&pipeline, &store);
    for stage in ["ade_linear", "ade_upernet"] {
        let r = &rows[stage];
        assert_eq!(r["kind"], "ade20k_segmentation");
        for k in ["miou", "aacc", "macc"] {
            in_range(r, k, 0.0, 100.0);
        }
        // ln(150) = 5.01 at chance; a diverged run would be far above
        in_range(r, "train_loss", 0.0, 20.0);
    }
    let d = &rows["davis_vos"];
    for k in ["jf_mean", "j_mean", "j_recall", "f_mean", "f_recall"] {
        in_range(d, k, 0.0, 100.0);
    }
    for k in ["j_decay", "f_decay"] {
        in_range(d, k, -100.0, 100.0);
    }
    assert!(d["frames_per_s"].as_f64().unwrap() > 0.0);
    let jf = (d["j_mean"].as_f64().unwrap() + d["f_mean"].as_f64().unwrap()) / 2.0;
    assert!((d["jf_mean"].as_f64().unwrap() - jf).abs() < 1e-3);
    // Predictions are artifacts: one PNG per val image (3) for each ADE protocol, one per frame
    // (2 sequences x 5 frames) for DAVIS.
    let art = store.join("artifacts");
    let ade_dirs = files_named(&art, "per_class.txt");
    assert_eq!(ade_dirs.len(), 2, "{ade_dirs:?}");
    for f in ade_dirs {
        let n = std::fs::read_dir(f.parent().unwrap().join("predictions"))
            .unwrap()
            .count();
        assert_eq!(n, 3);
    }
    let davis_dir = files_named(&art, "global_results-val.csv");
    assert_eq!(davis_dir.len(), 1);
    let preds = davis_dir[0].parent().unwrap().join("predictions");
    assert_eq!(files_named(&preds, "00004.png").len(), 2);
    let n: usize = std::fs::read_dir(&preds)
        .unwrap()
        .map(|e| std::fs::read_dir(e.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(n, 10);
    let err = run_pipeline(&pipeline, &store);
    assert!(err.contains("0 ran, 5 cached"), "{err}");
}

const RESUME_PIPELINE: &str = r#"
name: seg_resume
defaults: { seed: 3, device: cpu }
stages:
  ade:
    kind: dataset
    source: synth
    format: ade20k
    params: { train_images: 6, val_images: 2, size: 32 }
  lin:
    kind: ade20k_segmentation
    needs: [ade]
    checkpoint: random
    model: { preset: vit_tiny, img_size: 32, patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2, pred_embed_dim: 16, pred_depth: 1, pred_num_heads: 2 }
    params: { protocol: linear, iters: 150, batch_size: 2, warmup_iters: 5, lr: 0.01, crop: 32, scale: [64, 32], checkpoint_every: 5, log_every: 7 }
"#;

/// The newest in-stage checkpoint step under a store's work folders, if any.
fn latest_ckpt_step(store: &Path) -> Option<u64> {
    files_named(&store.join("work"), "LATEST")
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|s| s.trim().strip_prefix("step-").and_then(|n| n.parse().ok()))
        .max()
}

/// The artifact folder of the `ade20k_segmentation` stage of a store.
fn seg_artifacts(store: &Path) -> PathBuf {
    let f = files_named(&store.join("artifacts"), "per_class.txt");
    assert_eq!(f.len(), 1, "{f:?}");
    f[0].parent().unwrap().to_path_buf()
}

#[test]
fn ade20k_stage_resumes_bit_identical_after_interrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = tmp.path().join("resume.yaml");
    std::fs::write(&pipeline, RESUME_PIPELINE).unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    run_pipeline(&pipeline, &full);

    // Interrupt a second run once a checkpoint past iteration 10 exists, then resume it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cjepa"))
        .args([
            "run",
            "--plain",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--store",
        ])
        .arg(&cut)
        .arg(&pipeline)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut interrupted = false;
    while t0.elapsed() < std::time::Duration::from_secs(120) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("run finished ({status}) before it could be interrupted; raise `iters`");
        }
        if latest_ckpt_step(&cut).is_some_and(|s| s >= 10) {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            interrupted = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(interrupted, "no checkpoint appeared");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted run exits 130");
    let at = latest_ckpt_step(&cut).expect("checkpoint kept after the interrupt");
    assert!(at < 150, "stopped at {at}");
    run_pipeline(&pipeline, &cut);
    let log = logs(&cut);
    assert!(log.contains("resumed from iteration"), "{log}");

    let (a, b) = (seg_artifacts(&full), seg_artifacts(&cut));
    assert_eq!(
        std::fs::read(a.join("metrics.json")).unwrap(),
        std::fs::read(b.join("metrics.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(a.join("head.safetensors")).unwrap(),
        std::fs::read(b.join("head.safetensors")).unwrap(),
        "trained head differs after resume"
    );
    let (ra, rb) = (report(&pipeline, &full), report(&pipeline, &cut));
    assert_eq!(ra["lin"]["train_loss"], rb["lin"]["train_loss"]);
}

//! `pretrain` stage through the real binary: the tiny example pipeline runs and is cached on the
//! second run; a run killed mid-stage (SIGKILL of the driver, or SIGTERM) and rerun ends with the
//! same weights, metrics and series as an uninterrupted one; bad params and divergence fail clearly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::Value;

const TINY: &str = include_str!("../../pipelines/examples/pretrain_tiny.yaml");

/// A temporary folder holding `p.yaml` (shared with the data-parallel tests).
pub(crate) fn pipeline(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), yaml).unwrap();
    dir
}

/// The binary, run in `dir`.
pub(crate) fn cjepa(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("cjepa").unwrap();
    c.current_dir(dir);
    c
}

fn run(dir: &Path) -> (i32, String) {
    run_on(dir, 1)
}

/// The arguments of `cjepa run` on `threads` threads (with two or more, `pretrain` trains shards
/// on threads).
fn run_args(threads: usize) -> [String; 5] {
    [
        "run",
        "p.yaml",
        "--plain",
        "--threads",
        &threads.to_string(),
    ]
    .map(String::from)
}

fn run_on(dir: &Path, threads: usize) -> (i32, String) {
    let out = cjepa(dir)
        .args(run_args(threads))
        .env_remove("CJEPA_SHARDS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), err)
}

/// A single pretrain stage with enough steps to interrupt (60 steps, checkpoint every 5).
fn resumable(store: &str) -> String {
    format!(
        "name: resume\nstore: {store}\nstages:\n  data:\n    kind: dataset\n    source: synth\n    \
         format: imagefolder\n    params: {{ classes: 4, train_per_class: 8, val_per_class: 2, size: 32 }}\n  \
         pretrain:\n    kind: pretrain\n    needs: [data]\n    \
         model: {{ preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }}\n    \
         params: {{ epochs: 15, batch_size: 8, warmup_epochs: 2, mask: {{ min_keep: 0 }}, log_every: 3, checkpoint_every: 5 }}\n"
    )
}

/// The stored record of the (only) pretrain stage in `store`, and its artifact folder.
fn pretrain_record(dir: &Path, store: &str) -> (Value, PathBuf) {
    let out = cjepa(dir).args(["ls", "--store", store]).output().unwrap();
    let ls = String::from_utf8_lossy(&out.stdout).to_string();
    let line = ls
        .lines()
        .find(|l| l.contains(" pretrain "))
        .unwrap_or_else(|| panic!("no pretrain record in:\n{ls}"));
    let key = line.split_whitespace().next().unwrap();
    let out = cjepa(dir)
        .args(["show", key, "--store", store])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, art) = text.rsplit_once("\nartifacts: ").expect("show output");
    (serde_json::from_str(json).unwrap(), dir.join(art.trim()))
}

/// Everything that must be bit-identical: weights, metrics except the timing, series, and the
/// live curves (TensorBoard event files, kept with the artifacts) but for the throughput.
fn fingerprint(dir: &Path, store: &str) -> Fingerprint {
    let (rec, art) = pretrain_record(dir, store);
    let mut metrics: BTreeMap<String, Value> =
        serde_json::from_value(rec["metrics"].clone()).unwrap();
    metrics.remove("images_per_sec"); // timing: the only metric allowed to differ
    let curves: Curves = cjepa::kind::tensorboard::read_curves(&art.join("tb").join("pretrain"))
        .unwrap()
        .into_iter()
        .filter(|(tag, _)| tag != "images_per_sec")
        .collect();
    (
        std::fs::read(art.join("encoder.safetensors")).unwrap(),
        std::fs::read(art.join("full.safetensors")).unwrap(),
        metrics,
        rec["series"].clone(),
        curves,
    )
}

type Curves = Vec<cjepa::kind::tensorboard::Curve>;

fn wait_for_checkpoint(store: &Path, child: &mut Child) {
    let t0 = Instant::now();
    loop {
        let found = std::fs::read_dir(store.join("work"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("ckpt").join("LATEST").is_file());
        if found {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
}

type Fingerprint = (Vec<u8>, Vec<u8>, BTreeMap<String, Value>, Value, Curves);

fn interrupted_then_resumed(signal: i32) -> Fingerprint {
    interrupted_then_resumed_on(signal, 1)
}

fn interrupted_then_resumed_on(signal: i32, threads: usize) -> Fingerprint {
    let dir = pipeline(&resumable(".store"));
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cjepa"))
        .current_dir(dir.path())
        .args(run_args(threads))
        .env_remove("CJEPA_SHARDS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&dir.path().join(".store"), &mut child);
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was not interrupted");
    // SIGKILL'd driver: its worker dies with it (PDEATHSIG); give the OS a moment.
    std::thread::sleep(Duration::from_millis(200));
    let (code, err) = run_on(dir.path(), threads);
    assert_eq!(code, 0, "{err}");
    let (rec, _) = pretrain_record(dir.path(), ".store");
    let from = rec["info"]["resumed_from"].as_u64().unwrap();
    assert!(from > 0 && from < 60, "resumed from step {from}: {rec}");
    fingerprint(dir.path(), ".store")
}

#[test]
fn tiny_pipeline_runs_then_is_cached() {
    let dir = pipeline(TINY);
    let (code, err) = run(dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3 ran, 0 cached, 0 failed"), "{err}");
    let (code, err) = run(dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 ran, 3 cached, 0 failed"), "{err}");

    let ls = cjepa(dir.path())
        .args(["ls", "--store", ".cjepa"])
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    let keys: Vec<&str> = ls
        .lines()
        .filter(|l| l.contains(" pretrain "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(keys.len(), 2, "{ls}");
    let mut sims = Vec::new();
    for key in keys {
        let out = cjepa(dir.path())
            .args(["show", key, "--store", ".cjepa"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (json, art) = text.rsplit_once("\nartifacts: ").unwrap();
        let rec: Value = serde_json::from_str(json).unwrap();
        let art = dir.path().join(art.trim());
        let m = &rec["metrics"];
        assert_eq!(m["steps"], 16.0, "{m}");
        assert_eq!(m["epochs"], 2.0, "{m}");
        for k in ["loss", "loss_jepa", "target_std", "images_per_sec"] {
            assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k}: {m}");
        }
        let loss = rec["series"]["loss"].as_array().unwrap();
        assert_eq!(loss.len(), 9, "steps 1, 2, 4, ..., 16");
        assert_eq!(loss.last().unwrap()[0], 16);
        for f in [
            "encoder.safetensors",
            "model.json",
            "full.safetensors",
            "config.json",
        ] {
            assert!(art.join(f).is_file(), "{f} missing in {}", art.display());
        }
        // The artifact contract: the target encoder with official names, no prefix.
        let enc = candle_core::safetensors::load(
            art.join("encoder.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(enc.contains_key("patch_embed.proj.weight"));
        assert!(enc.contains_key("blocks.1.mlp.fc2.bias"));
        assert!(!enc
            .keys()
            .any(|k| k.contains("encoder.") || k.starts_with("blocks.2")));
        let full =
            candle_core::safetensors::load(art.join("full.safetensors"), &candle_core::Device::Cpu)
                .unwrap();
        let t = full["target_encoder.norm.weight"].to_vec1::<f32>().unwrap();
        assert_eq!(t, enc["norm.weight"].to_vec1::<f32>().unwrap());
        assert!(full.contains_key("predictor.mask_token"));
        let model: Value =
            serde_json::from_slice(&std::fs::read(art.join("model.json")).unwrap()).unwrap();
        // What evaluation stages do with it (`backbone::load` of an upstream pretrain stage).
        let cfg: cjepa::model::VitConfig = serde_json::from_value(model.clone()).unwrap();
        cjepa::stages::backbone::build("probe", cfg, &enc, &candle_core::Device::Cpu, "t".into())
            .unwrap();
        assert_eq!(
            (model["img_size"].as_u64(), model["depth"].as_u64()),
            (Some(32), Some(2))
        );
        sims.push((
            rec["config"]["params"]["method"].clone(),
            m["loss_sim"].clone(),
            m["loss"].clone(),
            m["loss_jepa"].clone(),
        ));
    }
    sims.sort_by_key(|s| s.0.to_string());
    // C-JEPA's total includes the VICReg block, I-JEPA's is the JEPA term alone.
    let (cj, ij) = (&sims[0], &sims[1]);
    assert_eq!(cj.0, "cjepa");
    assert_eq!(ij.2, ij.3, "ijepa: loss == loss_jepa");
    assert_ne!(cj.2, cj.3, "cjepa: loss != loss_jepa");
}

#[test]
fn interrupted_runs_resume_bit_identical() {
    let base = pipeline(&resumable(".store"));
    let (code, err) = run(base.path());
    assert_eq!(code, 0, "{err}");
    let want = fingerprint(base.path(), ".store");
    let (rec, _) = pretrain_record(base.path(), ".store");
    assert_eq!(rec["info"]["resumed_from"], 0);
    assert_eq!(rec["metrics"]["steps"], 60.0);
    for (name, sig) in [("SIGKILL", libc::SIGKILL), ("SIGTERM", libc::SIGTERM)] {
        let got = interrupted_then_resumed(sig);
        assert!(got.0 == want.0, "{name}: encoder.safetensors differs");
        assert!(got.1 == want.1, "{name}: full.safetensors differs");
        assert_eq!(got.2, want.2, "{name}: metrics differ");
        assert_eq!(got.3, want.3, "{name}: series differ");
        // the resumed run's live curves continue the interrupted ones: the same points, no step
        // twice (TensorBoard's purge at the first step logged after the resume)
        assert_eq!(got.4, want.4, "{name}: live curves differ");
    }
    let loss = &want
        .4
        .iter()
        .find(|(t, _)| t == "loss")
        .expect("a loss curve")
        .1;
    let series: Vec<(u64, f64)> = serde_json::from_value(rec["series"]["loss"].clone()).unwrap();
    // the live curve has every step (read together at the logged steps); the series keeps the
    // logged steps' own values
    assert_eq!(loss.len(), 60, "one live point per step");
    for (s2, v2) in &series {
        let (_, v1) = loss.iter().find(|(s1, _)| s1 == s2).expect("a logged step");
        assert!(
            (v1 - v2).abs() <= 1e-6 * v2.abs().max(1.0),
            "{v1} vs {v2} at step {s2}"
        );
    }
}

/// On two threads each batch trains as two shards on separate threads (`train::parallel::shards`): a
/// killed run still resumes bit-identical, and the weights are the one-thread run's up to float
/// rounding (the final loss agrees to 1e-3).
#[test]
fn sharded_runs_resume_bit_identical_and_match_one_thread() {
    let base = pipeline(&resumable(".store"));
    let (code, err) = run_on(base.path(), 2);
    assert_eq!(code, 0, "{err}");
    let (rec, _) = pretrain_record(base.path(), ".store");
    assert_eq!(rec["info"]["thread_shards"], 2, "{rec}");
    let want = fingerprint(base.path(), ".store");
    let got = interrupted_then_resumed_on(libc::SIGKILL, 2);
    assert!(got.0 == want.0, "encoder.safetensors differs");
    assert!(got.1 == want.1, "full.safetensors differs");
    assert_eq!(got.2, want.2, "metrics differ");
    assert_eq!(got.3, want.3, "series differ");

    let one = pipeline(&resumable(".store"));
    let (code, err) = run_on(one.path(), 1);
    assert_eq!(code, 0, "{err}");
    let (rec1, _) = pretrain_record(one.path(), ".store");
    assert_eq!(rec1["info"]["thread_shards"], 1, "{rec1}");
    let (l1, l2) = (
        rec1["metrics"]["loss"].as_f64().unwrap(),
        rec["metrics"]["loss"].as_f64().unwrap(),
    );
    assert!(
        (l1 - l2).abs() <= 1e-3 * l1.abs(),
        "loss {l1} on one thread, {l2} as shards"
    );
}

#[test]
fn unknown_param_is_a_config_error() {
    let yaml = TINY.replace("log_every: 2", "log_evry: 2");
    let dir = pipeline(&yaml);
    let (code, err) = run(dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("log_evry") && err.contains("pretrain"),
        "{err}"
    );
    assert!(err.contains("log_every"), "suggests the valid key: {err}");
}

#[test]
fn unsatisfiable_mask_is_refused_when_planning() {
    let yaml = TINY.replace("log_every: 2", "log_every: 2\n      mask: { min_keep: 10 }");
    let dir = pipeline(&yaml);
    let (code, err) = run(dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mask.min_keep"), "{err}");
}

#[test]
fn divergence_fails_with_the_step() {
    let yaml = TINY.replace(
        "log_every: 2",
        "log_every: 2\n      lr: 1.0e+30\n      start_lr: 1.0e+30\n      warmup_epochs: 0",
    );
    let dir = pipeline(&yaml);
    let (code, err) = run(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("loss is non-finite") && err.contains("training diverged"),
        "{err}"
    );
    assert!(err.contains("lower `lr` or set `clip_grad`"), "{err}");
}

#[test]
fn a_shard_count_that_does_not_split_the_batch_is_a_usage_error() {
    let dir = pipeline(&resumable(".store"));
    let out = cjepa(dir.path())
        .args(run_args(2))
        .env("CJEPA_SHARDS", "3")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("stage `pretrain`")
            && err.contains("CJEPA_SHARDS=3")
            && err.contains("divisor"),
        "{err}"
    );
    assert!(!dir.path().join(".store").exists(), "nothing is written");
}

/// `cjepa status --watch` redraws from the readers' copy while a run holds the store, shows the
/// running stage's step, and ends by itself when the run ends, with every stage fresh.
#[test]
fn status_watch_follows_a_run_until_it_ends() {
    // long enough (600 steps) to be seen running on a fast, quiet machine
    let dir = pipeline(&resumable(".store").replace("epochs: 15,", "epochs: 150,"));
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cjepa"))
        .current_dir(dir.path())
        .args(run_args(1))
        .env_remove("CJEPA_SHARDS")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&dir.path().join(".store"), &mut child);
    let out = cjepa(dir.path())
        .args(["status", "p.yaml", "--watch", "0.1"])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(child.wait().unwrap().success(), "the run failed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("holds the store"),
        "never saw the run:\n{text}"
    );
    assert!(text.contains("step "), "no running step shown:\n{text}");
    let last = text.rsplit("no run holds the store").next().unwrap();
    assert!(
        last.lines().filter(|l| l.starts_with("fresh")).count() == 2,
        "the last redraw shows both stages fresh:\n{last}"
    );
}

/// `decode: exact`, written or not, plans to the same key; `decode: scaled` to another; a
/// misspelt mode names the field and the choices.
#[test]
fn decode_exact_keeps_the_key_and_scaled_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let plan = |extra: &str| {
        let yaml = format!(
            "name: p\ndefaults: {{ seed: 0 }}\nstages:\n  data:\n    kind: dataset\n    \
             source: synth\n    format: imagefolder\n    params: {{ classes: 2, train_per_class: 4, \
             val_per_class: 2, size: 32 }}\n  pre:\n    kind: pretrain\n    needs: [data]\n    \
             model: {{ preset: vit_tiny, depth: 1, img_size: 32, patch_size: 8 }}\n    params: {{ epochs: 1, batch_size: 4, mask: {{ min_keep: 0 }}{extra} }}\n"
        );
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, yaml).unwrap();
        let p = cjepa::spec::load_pipeline(&f, &Default::default()).unwrap();
        cjepa::plan::build(&p, cjepa::stages::table).map(|plan| {
            let s = plan.stages.iter().find(|s| s.inst.id == "pre").unwrap();
            s.key.clone()
        })
    };
    let plain = plan("").unwrap();
    assert_eq!(plan(", decode: exact").unwrap(), plain);
    assert_ne!(plan(", decode: scaled").unwrap(), plain);
    let e = plan(", decode: fast").unwrap_err().to_string();
    assert!(e.contains("fast") && e.contains("scaled"), "{e}");
}

/// With several dataset stages in `needs`, pretraining learns from the union of their training
/// images (imagefolder + ADE20K scenes + DAVIS frames); a dataset it cannot read is refused
/// when the plan is built, naming the stage and the fix.
#[test]
fn pretraining_reads_the_union_of_its_datasets() {
    let store = "st";
    let yaml = format!(
        "name: union\nstore: {store}\ndefaults: {{ seed: 0, device: cpu }}\nstages:\n  \
         data:\n    kind: dataset\n    source: synth\n    format: imagefolder\n    \
         params: {{ classes: 4, train_per_class: 8, val_per_class: 2, size: 32 }}\n  \
         scenes:\n    kind: dataset\n    source: synth\n    format: ade20k\n    \
         params: {{ train_images: 16, val_images: 2, size: 32 }}\n  \
         clips:\n    kind: dataset\n    source: synth\n    format: davis\n    \
         params: {{ train_sequences: 2, val_sequences: 1, frames: 4, height: 32, width: 48, max_objects: 1 }}\n  \
         pretrain:\n    kind: pretrain\n    needs: [data, scenes, clips]\n    \
         model: {{ preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }}\n    \
         params: {{ epochs: 1, batch_size: 8, warmup_epochs: 1, mask: {{ min_keep: 0 }} }}\n"
    );
    let dir = pipeline(&yaml);
    let (code, err) = run(dir.path());
    assert_eq!(code, 0, "{err}");
    // 32 + 16 + 2 x 4 images = 56: 7 steps of 8
    let (rec, _) = pretrain_record(dir.path(), store);
    assert_eq!(rec["metrics"]["steps"], 7.0, "{}", rec["metrics"]);

    let coco = yaml.replace("format: davis", "format: coco").replace(
        "params: { train_sequences: 2, val_sequences: 1, frames: 4, height: 32, width: 48, max_objects: 1 }",
        "params: { train_images: 4, val_images: 2 }",
    );
    let dir = pipeline(&coco.replace(&format!("store: {store}"), "store: st2"));
    let (code, err) = run(dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("clips") && err.contains("`coco`") && err.contains("drop it from `needs`"),
        "{err}"
    );
    assert!(!dir.path().join("st2").exists(), "nothing written: {err}");
}

//! Classification evaluation stages driven through the real `cjepa` binary on tiny synthetic
//! data: `linear_probe`, `knn`, `finetune`, `clevr_count`, `clevr_dist` run, report metrics in
//! range, are cached on the second run, extract features once per encoder and dataset, and a
//! fine-tune killed with SIGKILL resumes to exactly the result of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use cjepa::store::Store;
use serde_json::Value;

/// 32 px images, patch 8 (16 tokens), width 32, 2 blocks.
const TINY: &str = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, pred_embed_dim: 32, pred_depth: 1, pred_num_heads: 2}";

const DATA: &str = r#"
  data:
    kind: dataset
    source: synth
    format: imagefolder
    params: {classes: 4, train_per_class: 16, val_per_class: 8, size: 32}
"#;

fn write(dir: &Path, name: &str, stages: &str) -> PathBuf {
    let p = dir.join(name);
    let text = format!(
        "name: classify_test\nstore: store\ndefaults:\n  device: cpu\nstages:{DATA}{stages}"
    )
    .replace("TINY", TINY);
    fs_err::write(&p, text).unwrap();
    p
}

fn run(p: &Path) -> String {
    let out = Command::cargo_bin("cjepa")
        .unwrap()
        .args(["run", "--plain", "--threads", "2"])
        .arg(p)
        .timeout(Duration::from_secs(300))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "cjepa run failed:\n{err}");
    err
}

/// Succeeded records by stage id.
fn records(dir: &Path) -> std::collections::BTreeMap<String, cjepa::store::record::Record> {
    let store = Store::open(&dir.join("store"), true, "test").unwrap();
    store
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.status == cjepa::store::record::Status::Succeeded)
        .map(|r| (r.stage_id.clone(), r))
        .collect()
}

fn cache_entries(dir: &Path) -> usize {
    let c = dir.join("store/cache/features");
    if !c.is_dir() {
        return 0;
    }
    std::fs::read_dir(c)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count()
}

fn pct(v: f64) -> bool {
    (0.0..=100.0).contains(&v)
}

#[test]
fn probes_run_report_and_cache() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "p.yaml",
        r#"
  probe:
    kind: linear_probe
    needs: [data]
    checkpoint: random
    model: TINY
    params: {epochs: 4, batch_size: 16}
  knn:
    kind: knn
    needs: [data]
    checkpoint: random
    model: TINY
    params: {k: 5}
  probe_aug:
    kind: linear_probe
    needs: [data]
    checkpoint: random
    model: TINY
    params: {epochs: 2, batch_size: 16, augment: true, feature_sets: [last], lr_mults: [1.0], weight_decays: [0.0]}
"#,
    );
    let err = run(&p);
    assert!(err.contains("4 ran, 0 cached"), "{err}");
    let r = records(d.path());
    let probe = &r["probe"];
    let m = &probe.metrics;
    assert!(
        pct(m["top1"]) && pct(m["top5"]) && m["top5"] >= m["top1"],
        "{m:?}"
    );
    let heads: Vec<&String> = m.keys().filter(|k| k.starts_with("head/")).collect();
    assert_eq!(heads.len(), 16, "{heads:?}");
    let best = probe.info["best_head"].as_str().unwrap();
    assert_eq!(m[&format!("head/{best}/top1")], m["top1"]);
    assert!(heads.iter().all(|h| pct(m[*h])));
    assert!(m["extract_images_per_sec"] > 0.0);
    assert_eq!(m["features_cached"], 0.0);
    assert_eq!(probe.series["loss"].len(), 4);
    assert!(probe.series["loss"].iter().all(|(_, l)| l.is_finite()));
    let knn = &r["knn"].metrics;
    assert!(pct(knn["top1"]) && knn["top5"] >= knn["top1"], "{knn:?}");
    // The artifacts keep the features they were computed from.
    let store = Store::open(&d.path().join("store"), true, "test").unwrap();
    let art = store.artifact_dir(&probe.key);
    assert!(art.join("features.safetensors").is_file());
    assert!(art.join("heads.safetensors").is_file());
    drop(store);
    // Train-time augmentation: features recomputed each epoch, the sweep still reports.
    let aug = &r["probe_aug"].metrics;
    assert_eq!(aug.keys().filter(|k| k.starts_with("head/")).count(), 2);
    assert!(pct(aug["top1"]));
    assert_eq!(r["probe_aug"].series["loss"].len(), 2);
    // Three random encoders (seeded from their stage keys): three cache entries.
    assert_eq!(cache_entries(d.path()), 3);
    // Second run: everything cached, nothing recomputed.
    let err = run(&p);
    assert!(err.contains("0 ran, 4 cached"), "{err}");
    assert_eq!(cache_entries(d.path()), 3);
}

#[test]
fn finetune_produces_an_encoder_whose_features_are_extracted_once() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "p.yaml",
        r#"
  ft:
    kind: finetune
    needs: [data]
    checkpoint: random
    model: TINY
    params: {epochs: 2, batch_size: 16, warmup_epochs: 1, blr: 0.01}
  probe:
    kind: linear_probe
    needs: [data, ft]
    params: {epochs: 2, batch_size: 16, lr_mults: [1.0], weight_decays: [0.0]}
  knn:
    kind: knn
    needs: [data, ft]
"#,
    );
    run(&p);
    let r = records(d.path());
    let ft = &r["ft"].metrics;
    assert!(pct(ft["top1"]) && ft["top5"] >= ft["top1"], "{ft:?}");
    assert!(ft["train_loss"].is_finite());
    assert_eq!(
        r["probe"].info["backbone"]
            .as_str()
            .unwrap()
            .split(' ')
            .next(),
        Some("ft")
    );
    assert_eq!(
        r["probe"]
            .metrics
            .keys()
            .filter(|k| k.starts_with("head/"))
            .count(),
        4
    );
    // Probe and k-NN read the same upstream encoder: one extraction, one cache entry.
    assert_eq!(cache_entries(d.path()), 1);
    let cached = r["probe"].metrics["features_cached"] + r["knn"].metrics["features_cached"];
    assert_eq!(cached, 1.0, "exactly one of the two stages extracted");
    assert_eq!(
        r["probe"].info["features"]["digest"],
        r["knn"].info["features"]["digest"]
    );
}

#[test]
fn clevr_count_and_dist_share_features_of_a_checkpoint_file() {
    let d = tempfile::tempdir().unwrap();
    // An encoder artifact written with the producer contract, read back as a path.
    let cfg: cjepa::model::VitConfig = serde_yaml::from_str(TINY).expect("tiny config parses");
    let nets = cjepa::model::JepaNetworks::new_random(&cfg, 7, &candle_core::Device::Cpu).unwrap();
    let enc: std::collections::HashMap<String, candle_core::Tensor> = nets.target_encoder_tensors();
    cjepa::stages::backbone::save(&d.path().join("enc"), &cfg, &enc).unwrap();
    let p = write(
        d.path(),
        "p.yaml",
        r#"
  cdata:
    kind: dataset
    source: synth
    format: clevr
    params: {train_images: 40, val_images: 16, width: 48, height: 32}
  count:
    kind: clevr_count
    needs: [cdata]
    checkpoint: enc/encoder.safetensors
    model: TINY
    params: {epochs: 3, batch_size: 16}
  dist:
    kind: clevr_dist
    needs: [cdata]
    checkpoint: enc/encoder.safetensors
    model: TINY
    params: {epochs: 3, batch_size: 16}
"#,
    );
    run(&p);
    let r = records(d.path());
    for s in ["count", "dist"] {
        let m = &r[s].metrics;
        assert!(pct(m["top1"]), "{s}: {m:?}");
        assert_eq!(m.keys().filter(|k| k.starts_with("head/")).count(), 4);
        assert_eq!(r[s].info["protocol"], "frozen-linear");
    }
    assert_eq!(r["count"].info["task"], "count");
    assert_eq!(r["dist"].info["task"], "dist");
    assert_eq!(cache_entries(d.path()), 1);
    let cached = r["count"].metrics["features_cached"] + r["dist"].metrics["features_cached"];
    assert_eq!(cached, 1.0);
    // Replacing the checkpoint file changes the keys: both probes rerun.
    let nets = cjepa::model::JepaNetworks::new_random(&cfg, 8, &candle_core::Device::Cpu).unwrap();
    let enc: std::collections::HashMap<String, candle_core::Tensor> = nets.target_encoder_tensors();
    cjepa::stages::backbone::save(&d.path().join("enc"), &cfg, &enc).unwrap();
    let err = run(&p);
    assert!(err.contains("2 ran, 2 cached"), "{err}");
    assert_eq!(cache_entries(d.path()), 2);
}

fn ft_pipeline(dir: &Path) -> PathBuf {
    write(
        dir,
        "ft.yaml",
        r#"
  ft:
    kind: finetune
    needs: [data]
    checkpoint: random
    model: TINY
    params: {epochs: 16, batch_size: 16, warmup_epochs: 1, blr: 0.01, checkpoint_every: 1}
"#,
    )
}

fn ft_result(dir: &Path) -> (Value, String, String) {
    let r = records(dir);
    let ft = &r["ft"];
    let store = Store::open(&dir.join("store"), true, "test").unwrap();
    let art = store.artifact_dir(&ft.key);
    let enc = blake3::hash(&fs_err::read(art.join("encoder.safetensors")).unwrap());
    let head = blake3::hash(&fs_err::read(art.join("head.safetensors")).unwrap());
    let mut m = serde_json::to_value(&ft.metrics).unwrap();
    m.as_object_mut().unwrap().remove("train_images_per_sec");
    let m = serde_json::json!({ "metrics": m, "loss": ft.series["loss"], "resumed_from": ft.info["resumed_from"] });
    (m, enc.to_hex().to_string(), head.to_hex().to_string())
}

fn latest_step(store: &Path) -> Option<u64> {
    for e in std::fs::read_dir(store.join("work")).ok()? {
        let latest = e.ok()?.path().join("ckpt/LATEST");
        if let Ok(s) = std::fs::read_to_string(latest) {
            return s.trim().strip_prefix("step-")?.parse().ok();
        }
    }
    None
}

#[test]
fn finetune_resume_after_kill_equals_uninterrupted() {
    // Uninterrupted reference.
    let a = tempfile::tempdir().unwrap();
    let pa = ft_pipeline(a.path());
    run(&pa);
    let (ma, enc_a, head_a) = ft_result(a.path());
    assert_eq!(ma["resumed_from"], 0);
    // The training steps read nothing back from the device: the losses are read once per
    // epoch by the shared loop.
    assert_eq!(records(a.path())["ft"].info["host_reads_in_steps"], 0);

    // Same pipeline, SIGKILLed once a checkpoint past step 3 exists (64 steps in all: the run
    // lasts a few seconds, so a test thread starved by a busy machine still finds it running).
    let b = tempfile::tempdir().unwrap();
    let pb = ft_pipeline(b.path());
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cjepa"))
        .args(["run", "--plain", "--threads", "2"])
        .arg(&pb)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut killed_at = None;
    while t0.elapsed() < Duration::from_secs(240) {
        if let Some(s) = latest_step(&b.path().join("store")) {
            if s >= 3 {
                child.kill().unwrap(); // SIGKILL; the worker dies with it (PDEATHSIG)
                killed_at = Some(s);
                break;
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    let killed_at = killed_at.expect("the fine-tune finished before it could be killed");
    assert!(killed_at < 64, "killed at step {killed_at}");
    // Give the worker a moment to be reaped by the kernel.
    std::thread::sleep(Duration::from_millis(300));
    let err = run(&pb);
    assert!(err.contains("1 ran"), "{err}");
    let (mb, enc_b, head_b) = ft_result(b.path());
    assert!(
        mb["resumed_from"].as_u64().unwrap() >= 3,
        "resumed from {}",
        mb["resumed_from"]
    );
    assert_eq!(ma["metrics"], mb["metrics"]);
    assert_eq!(ma["loss"], mb["loss"]);
    assert_eq!(enc_a, enc_b, "encoder differs after resume");
    assert_eq!(head_a, head_b, "head differs after resume");
}

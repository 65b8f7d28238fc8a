//! Linear probe against pretraining epoch from one pretraining run (`tests/it/convergence_tiny.yaml`):
//! the run saves snapshots (`snapshot_epochs`), probes read them (`at_epoch`, a matrix) and the
//! final weights, the report plots them as one line and keeps them in rows of their own; an
//! `at_epoch` the run does not save is a planning error; a run killed after a snapshot and rerun
//! ends with the same weights and snapshot files as an uninterrupted one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cjepa::store::record::{Record, Status};
use cjepa::store::Store;

use crate::pretrain::{cjepa, pipeline};

const TINY: &str = include_str!("convergence_tiny.yaml");

fn run(dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = cjepa(dir)
        .args(["run", "p.yaml", "--plain", "--threads", "1"])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), err)
}

/// Succeeded records by stage instance id, with their artifact folders.
fn records(dir: &Path) -> BTreeMap<String, (Record, PathBuf)> {
    let store = Store::open(&dir.join(".cjepa"), true, "test").unwrap();
    store
        .records()
        .unwrap()
        .into_iter()
        .filter(|r| r.status == Status::Succeeded)
        .map(|r| {
            let art = store.artifact_dir(&r.key);
            (r.stage_id.clone(), (r, art))
        })
        .collect()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn snapshots_are_probed_reported_and_plotted() {
    let dir = pipeline(TINY);
    let (code, err) = run(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("5 ran, 0 cached, 0 failed"), "{err}");
    // the snapshot folders are artifacts like the others: the rerun is all hits
    let (code, err) = run(dir.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 ran, 5 cached, 0 failed"), "{err}");
    let recs = records(dir.path());
    let (pt, pt_art) = &recs["pretrain"];
    assert_eq!(pt.info["snapshot_epochs"], serde_json::json!([2, 10]));
    for k in [2, 10] {
        let snap = pt_art.join(format!("snapshots/epoch-{k}"));
        for f in ["encoder.safetensors", "model.json"] {
            assert!(snap.join(f).is_file(), "{}/{f}", snap.display());
        }
        // a snapshot is an earlier state, not the final encoder
        assert_ne!(
            read(&snap.join("encoder.safetensors")),
            read(&pt_art.join("encoder.safetensors"))
        );
    }
    let probes = ["probe_at[at_epoch=2]", "probe_at[at_epoch=10]", "probe"];
    let mut digests = Vec::new();
    let mut losses = Vec::new();
    for (id, want) in probes.iter().zip(["at epoch 2", "at epoch 10", ""]) {
        let (r, _) = recs
            .get(*id)
            .unwrap_or_else(|| panic!("no {id}: {:?}", recs.keys()));
        let top1 = r.metrics["top1"];
        assert!((0.0..=100.0).contains(&top1), "{id}: {top1}");
        let backbone = r.info["backbone"].as_str().unwrap();
        assert!(backbone.starts_with("pretrain "), "{id}: {backbone}");
        if want.is_empty() {
            assert!(!backbone.contains("at epoch"), "{id}: {backbone}");
        } else {
            assert!(backbone.ends_with(want), "{id}: {backbone}");
        }
        digests.push(r.info["features"]["digest"].as_str().unwrap().to_string());
        losses.push(r.series["loss"].clone());
    }
    // each epoch source has its own features and so its own head training
    for i in 0..3 {
        for j in i + 1..3 {
            assert_ne!(digests[i], digests[j], "{} vs {}", probes[i], probes[j]);
            assert_ne!(losses[i], losses[j], "{} vs {}", probes[i], probes[j]);
        }
    }

    // Report: each probe is a row at its own epoch ("2 of 12": the snapshot of a 12-epoch run),
    // and the three points make one line of the convergence plot.
    let out = cjepa(dir.path())
        .args(["report", "p.yaml", "--tables", "paper", "--out", "r"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = String::from_utf8_lossy(&out.stdout).to_string();
    let row = |label: &str, key: &str| {
        md.lines()
            .any(|l| l.contains(&format!("| {label} ")) && l.contains(&key[..8]))
    };
    for (id, label) in probes.iter().zip(["2 of 12", "10 of 12", "12"]) {
        assert!(
            row(label, &recs[*id].0.key),
            "{id} not in row {label}:\n{md}"
        );
    }
    let plots = dir.path().join("r").join("plots");
    let svgs: Vec<PathBuf> = std::fs::read_dir(&plots)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("probe_vs_epochs_")
                && p.extension().is_some_and(|e| e == "svg")
        })
        .collect();
    assert_eq!(svgs.len(), 1, "{svgs:?}");
    let svg = std::fs::read_to_string(&svgs[0]).unwrap();
    assert!(
        svg.contains(">C-JEPA, probe 3 ep, one 12-ep run, synth<"),
        "{svg}"
    );
    // one line in the first colour, and its stroke in the legend
    assert_eq!(
        svg.matches(r##"<polyline fill="none" opacity="1" stroke="#1F77B4""##)
            .count(),
        2,
        "{svg}"
    );
    assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
    // x axis from epoch 2 to 12: the first point on the left edge, the last on the right one
    let xs: Vec<f64> = svg
        .match_indices("<circle cx=\"")
        .map(|(i, m)| {
            let rest = &svg[i + m.len()..];
            rest[..rest.find('"').unwrap()].parse().unwrap()
        })
        .collect();
    let (x2, x10, x12) = (xs[0], xs[1], xs[2]);
    assert!(x2 < x10 && x10 < x12, "{xs:?}");
    assert!(((x10 - x2) / (x12 - x2) - 0.8).abs() < 0.01, "{xs:?}");

    // An epoch the run does not save is refused when planning, with the fix.
    std::fs::write(
        dir.path().join("p.yaml"),
        TINY.replace("at_epoch: [2, 10]", "at_epoch: [2, 6]"),
    )
    .unwrap();
    let (code, err) = run(dir.path(), &["--dry-run"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("at_epoch: 6") && err.contains("add 6 to that stage's `snapshot_epochs`"),
        "{err}"
    );
}

/// Bytes of the final weights and of every snapshot of the pretrain record.
fn weights(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let recs = records(dir);
    let (_, art) = &recs["pretrain"];
    let mut out = BTreeMap::new();
    for f in [
        "encoder.safetensors",
        "full.safetensors",
        "snapshots/epoch-2/encoder.safetensors",
        "snapshots/epoch-2/model.json",
        "snapshots/epoch-10/encoder.safetensors",
        "snapshots/epoch-10/model.json",
    ] {
        out.insert(f.to_string(), read(&art.join(f)));
    }
    out
}

/// The snapshot of epoch `k` in the work folder of the (only) running pretrain stage.
fn work_snapshot(store: &Path, k: u64) -> Option<PathBuf> {
    std::fs::read_dir(store.join("work"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            e.path()
                .join(format!("snapshots/epoch-{k}/encoder.safetensors"))
        })
        .find(|p| p.is_file())
}

#[test]
fn pretrain_killed_after_a_snapshot_resumes_to_the_same_files() {
    let base = pipeline(TINY);
    let (code, err) = run(base.path(), &["--only", "pretrain"]);
    assert_eq!(code, 0, "{err}");
    let want = weights(base.path());

    let dir = pipeline(TINY);
    let store = dir.path().join(".cjepa");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cjepa"))
        .current_dir(dir.path())
        .args([
            "run",
            "p.yaml",
            "--plain",
            "--threads",
            "1",
            "--only",
            "pretrain",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let first = loop {
        if let Some(p) = work_snapshot(&store, 2) {
            break p;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first snapshot"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no snapshot");
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    assert!(
        !child.wait().unwrap().success(),
        "the run was not interrupted"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        work_snapshot(&store, 10).is_none(),
        "killed too late: the run already wrote the snapshot of epoch 10"
    );
    // the snapshot written before the kill stays
    assert!(first.is_file(), "{}", first.display());

    let (code, err) = run(dir.path(), &["--only", "pretrain"]);
    assert_eq!(code, 0, "{err}");
    let (rec, _) = &records(dir.path())["pretrain"];
    let from = rec.info["resumed_from"].as_u64().unwrap();
    assert!((6..40).contains(&from), "resumed from step {from}");
    let got = weights(dir.path());
    for (f, bytes) in &want {
        assert!(got[f] == *bytes, "{f} differs from the uninterrupted run");
    }
}

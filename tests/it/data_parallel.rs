//! Data-parallel training (issue #10, item 4) on CPU: `resources: { ranks: 2 }` runs two
//! processes joined by the TCP all-reduce. For `pretrain` (C-JEPA: VICReg terms over the gathered
//! global batch), `finetune` (Mixup / CutMix, drop path, gradient accumulation) and
//! `ade20k_segmentation` (linear protocol), two ranks at the same global batch end with the
//! weights and metrics of one rank (equal within float-summation tolerance: each rank's backward
//! sums over its half of the batch, then the halves are added), under the same stage key; a
//! two-rank run killed mid-stage and rerun resumes from rank 0's checkpoint and ends
//! bit-identical to an uninterrupted two-rank run. `coco_detection` trains the weights of one
//! rank too (FCOS and mask normalisers summed over the ranks), and a global batch that does not
//! split over the ranks is refused when the pipeline is planned (exit code 2), before any stage.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::pretrain::{cjepa, pipeline as setup};

/// A tiny pretrain stage: 32 images, global batch 8, 4 steps per epoch.
fn pipeline_yaml(method: &str, epochs: u32, resources: &str) -> String {
    format!(
        "name: dp\nstore: .store\ndefaults: {{ seed: 0, device: cpu }}\nstages:\n  data:\n    kind: dataset\n    \
         source: synth\n    format: imagefolder\n    \
         params: {{ classes: 4, train_per_class: 8, val_per_class: 2, size: 32 }}\n  \
         pretrain:\n    kind: pretrain\n    needs: [data]\n    \
         model: {{ preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }}\n    \
         params: {{ method: {method}, epochs: {epochs}, batch_size: 8, warmup_epochs: 1, mask: {{ min_keep: 0 }}, log_every: 2, checkpoint_every: 3 }}\n{resources}"
    )
}

fn run(dir: &Path) -> (i32, String) {
    let out = cjepa(dir)
        .args(["run", "p.yaml", "--plain", "--threads", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), err)
}

/// The pretrain record's key, record JSON and artifact folder.
fn record(dir: &Path) -> (String, Value, PathBuf) {
    record_of(dir, "pretrain")
}

/// The key, record JSON and artifact folder of the record of stage kind `kind`.
fn record_of(dir: &Path, kind: &str) -> (String, Value, PathBuf) {
    let out = cjepa(dir)
        .args(["ls", "--store", ".store"])
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&out.stdout).to_string();
    let line = ls
        .lines()
        .find(|l| l.contains(&format!(" {kind} ")))
        .unwrap_or_else(|| panic!("no {kind} record in:\n{ls}"));
    let key = line.split_whitespace().next().unwrap().to_string();
    let out = cjepa(dir)
        .args(["show", &key, "--store", ".store"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, art) = text.rsplit_once("\nartifacts: ").expect("show output");
    (
        key,
        serde_json::from_str(json).unwrap(),
        dir.join(art.trim()),
    )
}

fn weights(art: &Path) -> HashMap<String, Tensor> {
    load(art, "full.safetensors")
}

fn load(art: &Path, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(art.join(file), &Device::Cpu).unwrap()
}

/// Largest absolute difference over all tensors (same names required).
fn max_abs_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut m = 0f32;
    for (k, x) in a {
        let y = &b[k];
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        m = m.max(d);
    }
    m
}

#[test]
fn two_ranks_train_the_weights_of_one_at_the_same_global_batch() {
    // C-JEPA: the VICReg terms over the global batch (gathered from both ranks)
    let one = setup(&pipeline_yaml("cjepa", 2, ""));
    let two = setup(&pipeline_yaml("cjepa", 2, "    resources: { ranks: 2 }\n"));
    let (code, err) = run(one.path());
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(two.path());
    assert_eq!(code, 0, "{err}");
    let (k1, r1, a1) = record(one.path());
    let (k2, r2, a2) = record(two.path());
    assert_eq!(k1, k2, "the number of ranks is not part of the stage key");
    assert_eq!(r2["info"]["ranks"], 2, "{r2}");
    assert_eq!(r1["info"]["ranks"], 1, "{r1}");
    assert_eq!(r1["metrics"]["steps"], r2["metrics"]["steps"]);
    assert_eq!(r2["metrics"]["steps"].as_f64(), Some(8.0));
    let (w1, w2) = (weights(&a1), weights(&a2));
    let d = max_abs_diff(&w1, &w2);
    eprintln!("max |w(1 rank) - w(2 ranks)| = {d:e}");
    // the same 8 steps, summed in another order: float rounding only (measured: 1.2e-7)
    assert!(d < 1e-5, "max |w1 - w2| = {d}");
    // the global loss is the mean of the ranks' losses
    let (l1, l2) = (
        r1["metrics"]["loss"].as_f64().unwrap(),
        r2["metrics"]["loss"].as_f64().unwrap(),
    );
    assert!((l1 - l2).abs() < 1e-4 * l1.abs().max(1.0), "{l1} vs {l2}");
}

/// A plan-time refusal: exit code 2 before any stage ran (no store was even created).
fn refused_at_plan(dir: &Path) -> String {
    let (code, err) = run(dir);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("p.yaml:"), "names the file: {err}");
    assert!(!dir.join(".store").exists(), "a stage ran: {err}");
    err
}

#[test]
fn global_batch_must_split_over_the_ranks() {
    let dir = setup(&pipeline_yaml("ijepa", 1, "    resources: { ranks: 3 }\n"));
    let err = refused_at_plan(dir.path());
    assert!(
        err.contains("stage `pretrain`")
            && err.contains(
                "`params.batch_size` (8) is the global batch and must be divisible by the number \
                 of ranks (`resources.ranks`: 3); set `params.batch_size` to a multiple of 3"
            ),
        "{err}"
    );
}

fn wait_for_checkpoint(store: &Path, child: &mut std::process::Child) {
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

/// Run `p.yaml` in `dir`, SIGKILL the driver once a checkpoint exists, then run it again to the
/// end (the driver's worker, the launcher, dies with it, and the ranks with the launcher).
fn kill_at_first_checkpoint_then_rerun(dir: &Path) {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cjepa"))
        .current_dir(dir)
        .args(["run", "p.yaml", "--plain", "--threads", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_checkpoint(&dir.join(".store"), &mut child);
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    assert!(!child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(300));
    let (code, err) = run(dir);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn two_ranks_killed_then_rerun_resume_bit_identical() {
    // C-JEPA over 5 epochs = 20 steps, a checkpoint every 3
    let yaml = pipeline_yaml("cjepa", 5, "    resources: { ranks: 2 }\n");
    let straight = setup(&yaml);
    let (code, err) = run(straight.path());
    assert_eq!(code, 0, "{err}");

    let dir = setup(&yaml);
    kill_at_first_checkpoint_then_rerun(dir.path());
    let (_, rec, art) = record(dir.path());
    let from = rec["info"]["resumed_from"].as_u64().unwrap();
    assert!(from > 0 && from < 20, "resumed from step {from}: {rec}");
    let (_, rec0, art0) = record(straight.path());
    assert_eq!(
        std::fs::read(art.join("full.safetensors")).unwrap(),
        std::fs::read(art0.join("full.safetensors")).unwrap(),
        "resumed two-rank weights differ from the uninterrupted two-rank run"
    );
    let strip = |r: &Value| {
        let mut m = r["metrics"].clone();
        m.as_object_mut().unwrap().remove("images_per_sec");
        m
    };
    assert_eq!(strip(&rec), strip(&rec0));
    assert_eq!(rec["series"], rec0["series"]);
}

/// One stage of kind `kind` after a synthetic dataset, with `resources`.
fn stage_yaml(data: &str, stage: &str, resources: &str) -> String {
    format!(
        "name: dp\nstore: .store\ndefaults: {{ seed: 0, device: cpu }}\nstages:\n  data:\n    \
         kind: dataset\n    source: synth\n{data}  train:\n    needs: [data]\n    \
         checkpoint: random\n    \
         model: {{ preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }}\n\
         {stage}{resources}"
    )
}

const IMAGES: &str =
    "    format: imagefolder\n    params: { classes: 4, train_per_class: 8, val_per_class: 2, size: 32 }\n";

/// Fine-tuning with the full MAE recipe (RandAugment, Mixup / CutMix, drop path, random
/// erasing) and two micro-batches per step: 32 images, global batch 8, 8 steps.
const FINETUNE: &str = "    kind: finetune\n    \
    params: { epochs: 2, batch_size: 8, accum_iter: 2, warmup_epochs: 1, blr: 0.05, drop_path: 0.2, checkpoint_every: 3 }\n";

/// Runs `stage` with one and with two ranks; returns both records and artifact folders.
fn one_and_two(data: &str, stage: &str, kind: &str) -> [(Value, PathBuf, tempfile::TempDir); 2] {
    ["", "    resources: { ranks: 2 }\n"].map(|res| {
        let dir = setup(&stage_yaml(data, stage, res));
        let (code, err) = run(dir.path());
        assert_eq!(code, 0, "{err}");
        let (_, rec, art) = record_of(dir.path(), kind);
        (rec, art, dir)
    })
}

fn close(a: &Value, b: &Value, rel: f64) {
    let (x, y) = (a.as_f64().unwrap(), b.as_f64().unwrap());
    assert!((x - y).abs() <= rel * x.abs().max(1.0), "{x} vs {y}");
}

#[test]
fn finetune_two_ranks_train_the_weights_of_one() {
    let [(r1, a1, _d1), (r2, a2, _d2)] = one_and_two(IMAGES, FINETUNE, "finetune");
    assert_eq!(r1["info"]["ranks"], 1, "{r1}");
    assert_eq!(r2["info"]["ranks"], 2, "{r2}");
    let mut d = 0f32;
    for file in ["encoder.safetensors", "head.safetensors"] {
        d = d.max(max_abs_diff(&load(&a1, file), &load(&a2, file)));
    }
    eprintln!("finetune: max |w(1 rank) - w(2 ranks)| = {d:e}");
    // 8 AdamW steps on gradients summed in another order: float rounding only; a wrong mixing
    // partner, drop-path row or normalisation changes weights by ~lr = 1e-3 at the first step
    assert!(d < 1e-5, "max |w1 - w2| = {d}");
    close(
        &r1["metrics"]["train_loss"],
        &r2["metrics"]["train_loss"],
        1e-5,
    );
    // the same classifier up to rounding: the same argmax on the 8 val images
    assert_eq!(r1["metrics"]["top1"], r2["metrics"]["top1"]);
    assert_eq!(r1["metrics"]["top5"], r2["metrics"]["top5"]);
}

#[test]
fn finetune_micro_batch_must_hold_whole_mixup_pairs_per_rank() {
    // micro-batch 4 over 3 ranks: not a multiple of 2 x 3
    let dir = setup(&stage_yaml(
        IMAGES,
        FINETUNE,
        "    resources: { ranks: 3 }\n",
    ));
    let err = refused_at_plan(dir.path());
    assert!(
        err.contains(
            "`params.batch_size` (8) / `params.accum_iter` (2) = 4 images per micro-batch"
        ) && err.contains("2 x the number of ranks (`resources.ranks`: 3) = 6"),
        "{err}"
    );
}

/// The linear protocol: 8 training images, global batch 4, 12 iterations.
const SEG_DATA: &str =
    "    format: ade20k\n    params: { train_images: 8, val_images: 2, size: 32 }\n";
const SEG_LINEAR: &str = "    kind: ade20k_segmentation\n    \
    params: { protocol: linear, iters: 12, batch_size: 4, warmup_iters: 2, lr: 0.01, crop: 32, scale: [64, 32], checkpoint_every: 5, log_every: 4 }\n";

#[test]
fn segmentation_two_ranks_train_the_weights_of_one() {
    let [(r1, a1, _d1), (r2, a2, _d2)] = one_and_two(SEG_DATA, SEG_LINEAR, "ade20k_segmentation");
    assert_eq!(r2["info"]["ranks"], 2, "{r2}");
    let d = max_abs_diff(
        &load(&a1, "head.safetensors"),
        &load(&a2, "head.safetensors"),
    );
    eprintln!("ade20k linear: max |w(1 rank) - w(2 ranks)| = {d:e}");
    assert!(d < 1e-5, "max |w1 - w2| = {d}");
    close(
        &r1["metrics"]["train_loss"],
        &r2["metrics"]["train_loss"],
        1e-5,
    );
    for k in ["miou", "aacc", "macc"] {
        close(&r1["metrics"][k], &r2["metrics"][k], 1e-6);
    }
}

/// UperNet normalises with each rank's BatchNorm statistics (documented in the stage), so two
/// ranks run a different, equally valid run: it trains, predicts and scores on rank 0, and a
/// shard of one image (no batch statistics) is refused up front.
#[test]
fn upernet_runs_on_two_ranks_with_at_least_two_images_each() {
    let upernet = |batch: u32| {
        format!(
            "    kind: ade20k_segmentation\n    \
             params: {{ protocol: upernet, iters: 3, batch_size: {batch}, warmup_iters: 1, crop: 32, scale: [64, 32], channels: 16, aux_channels: 8 }}\n"
        )
    };
    let two = "    resources: { ranks: 2 }\n";
    let dir = setup(&stage_yaml(SEG_DATA, &upernet(2), two));
    let err = refused_at_plan(dir.path());
    assert!(
        err.contains(
            "`params.batch_size` (2) must be at least 2 x the number of ranks (`resources.ranks`: 2)"
        ),
        "{err}"
    );
    let dir = setup(&stage_yaml(SEG_DATA, &upernet(4), two));
    let (code, err) = run(dir.path());
    assert_eq!(code, 0, "{err}");
    let (_, rec, art) = record_of(dir.path(), "ade20k_segmentation");
    assert_eq!(rec["info"]["ranks"], 2, "{rec}");
    for k in ["miou", "aacc", "macc"] {
        let v = rec["metrics"][k].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    assert!(rec["metrics"]["train_loss"].as_f64().unwrap().is_finite());
    assert_eq!(
        std::fs::read_dir(art.join("predictions")).unwrap().count(),
        2
    );
}

/// A tiny COCO set: 8 training images (global batch 4, 2 per rank), 3 val images.
const COCO_DATA: &str = "    format: coco\n    \
    params: { train_images: 8, val_images: 3, width: 96, height: 96, max_objects: 3 }\n";

/// Detection with the encoder fine-tuned, LSJ jitter and flips, and at most 2 mask RoIs per
/// image (the synthetic images hold up to 3 objects plus matching predictions, so RoIs are
/// sampled); the model is the pretrain tests' (patch 8) at 32 px.
const DETECT: &str = "    kind: coco_detection\n    \
    params: { img_size: 32, scale_range: [0.5, 1.5], steps: 4, batch_size: 4, warmup_steps: 1, lr: 0.001, eval_batch_size: 2, clip_grad_norm: 1.0, \
    head: { fpn_dim: 16, head_convs: 1, mask_convs: 1, roi_size: 7, score_thresh: 0.001, mask_rois_per_image: 2 } }\n";

#[test]
fn detection_two_ranks_train_the_weights_of_one() {
    let [(r1, a1, _d1), (r2, a2, _d2)] = one_and_two(COCO_DATA, DETECT, "coco_detection");
    assert_eq!(r1["info"]["ranks"], 1, "{r1}");
    assert_eq!(r2["info"]["ranks"], 2, "{r2}");
    let d = max_abs_diff(
        &load(&a1, "detector.safetensors"),
        &load(&a2, "detector.safetensors"),
    );
    eprintln!("coco_detection: max |w(1 rank) - w(2 ranks)| = {d:e}");
    // measured 3.5e-8 (float rounding of the summed halves); each rank normalising by its own
    // positives and RoIs instead of the global counts gives 2.3e-3
    assert!(d < 1e-5, "max |w1 - w2| = {d}");
    for k in ["final_loss", "steps"] {
        close(&r1["metrics"][k], &r2["metrics"][k], 1e-5);
    }
    let (s1, s2) = (&r1["series"], &r2["series"]);
    for k in ["loss", "loss_cls", "loss_mask"] {
        for (x, y) in s1[k]
            .as_array()
            .unwrap()
            .iter()
            .zip(s2[k].as_array().unwrap())
        {
            close(&x[1], &y[1], 1e-5);
        }
    }
    // the same detector up to rounding: the same COCOeval stats on the val images
    let m1 = r1["metrics"].as_object().unwrap();
    assert!(
        m1.contains_key("ap_box") && m1.contains_key("ap_mask"),
        "{r1}"
    );
    for (k, v) in m1 {
        close(v, &r2["metrics"][k], 1e-4);
    }
}

#[test]
fn detection_batch_must_split_over_the_gpus_at_plan_time() {
    let stage = DETECT.replace("batch_size: 4", "batch_size: 3");
    let dir = setup(&stage_yaml(
        COCO_DATA,
        &stage,
        "    resources: { gpus: 2 }\n",
    ));
    let err = refused_at_plan(dir.path());
    assert!(
        err.contains("stage `train`")
            && err.contains("`params.batch_size` (3) is the global batch")
            && err.contains("(`resources.gpus`: 2)")
            && err.contains("change `resources.gpus`"),
        "{err}"
    );
}

#[test]
fn finetune_two_ranks_killed_then_rerun_resume_bit_identical() {
    // 4 epochs = 16 steps, a checkpoint every 3
    let stage = FINETUNE.replace("epochs: 2", "epochs: 4");
    let yaml = stage_yaml(IMAGES, &stage, "    resources: { ranks: 2 }\n");
    let straight = setup(&yaml);
    let (code, err) = run(straight.path());
    assert_eq!(code, 0, "{err}");

    let dir = setup(&yaml);
    kill_at_first_checkpoint_then_rerun(dir.path());
    let (_, rec, art) = record_of(dir.path(), "finetune");
    let from = rec["info"]["resumed_from"].as_u64().unwrap();
    assert!(from > 0 && from < 16, "resumed from step {from}: {rec}");
    assert_eq!(rec["info"]["ranks"], 2, "{rec}");
    let (_, rec0, art0) = record_of(straight.path(), "finetune");
    for f in ["encoder.safetensors", "head.safetensors"] {
        assert_eq!(
            std::fs::read(art.join(f)).unwrap(),
            std::fs::read(art0.join(f)).unwrap(),
            "{f}: resumed two-rank weights differ from the uninterrupted two-rank run"
        );
    }
    let strip = |r: &Value| {
        let mut m = r["metrics"].clone();
        m.as_object_mut().unwrap().remove("train_images_per_sec");
        m
    };
    assert_eq!(strip(&rec), strip(&rec0));
    assert_eq!(rec["series"], rec0["series"]);
}

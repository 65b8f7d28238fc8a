//! What pretraining keeps and writes: its checkpoint files (networks, optimiser; the state of the
//! format before the shared loop), the epoch snapshots, the final artifacts and metrics.

use super::super::{backbone, StageContext, StageOutput};
use super::step::{JepaStep, NAMES};
use super::{Params, CONFIG_FILE, FULL_FILE};
use crate::error::{Error, Result};
use crate::model::masks::MaskConfig;
use crate::model::{JepaNetworks, VitConfig};
use crate::train::parallel::shards::ThreadShards;
use crate::train::run_loop::{LoopState, Trained};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub(super) const NETS_FILE: &str = "nets.safetensors";
pub(super) const OPTIM_FILE: &str = "optim.safetensors";
pub(super) const STATE_FILE: &str = "state.json";

/// What a checkpoint of the format before the shared training loop held besides its tensors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct LegacyState {
    /// Completed steps.
    step: u64,
    /// Logged series up to `step`.
    series: BTreeMap<String, Vec<(u64, f64)>>,
}

/// The loop state of a checkpoint written before the shared loop (`state.json`), if it is one.
pub(super) fn legacy_state(dir: &Path) -> Result<Option<LoopState>> {
    let file = dir.join(STATE_FILE);
    if !file.is_file() {
        return Ok(None);
    }
    let st: LegacyState = serde_json::from_slice(&fs_err::read(&file)?)?;
    Ok(Some(LoopState::at(st.step, st.series)))
}

/// The snapshots `(epoch, step)` a run of `total` steps reaches (those it does not are logged).
pub(super) fn snapshots_reached(
    ctx: &mut StageContext,
    p: &Params,
    ipe: u64,
    total: u64,
) -> Vec<(u64, u64)> {
    for &k in &p.snapshot_epochs {
        if k * ipe > total {
            ctx.log(format!(
                "no snapshot of epoch {k}: training stops at step {total} (`max_steps`), before \
                 step {}",
                k * ipe
            ));
        }
    }
    p.snapshot_epochs
        .iter()
        .map(|&k| (k, k * ipe))
        .filter(|&(_, s)| s <= total)
        .collect()
}

/// Resuming from the checkpoint `ckpt` after `resumed` steps: the snapshots of the steps before
/// it were written before it was taken, and missing ones are an error that says what to delete.
pub(super) fn check_snapshots(
    id: &str,
    work_dir: &Path,
    ckpt: &Path,
    snapshots: &[(u64, u64)],
    resumed: u64,
) -> Result<()> {
    for &(k, s) in snapshots.iter().filter(|(_, s)| *s <= resumed) {
        let d = backbone::snapshot_dir(work_dir, k);
        if !d.join(backbone::ENCODER_FILE).is_file() {
            return Err(Error::stage(
                id,
                format!(
                    "resuming at step {resumed}: the snapshot of epoch {k} (step {s}) is missing \
                     from {}; delete {} to train from the start",
                    d.display(),
                    ckpt.parent().unwrap_or(ckpt).display()
                ),
            ));
        }
    }
    Ok(())
}

/// Link (or copy) the epoch snapshots from the work folder into the outputs.
fn link_snapshots(ctx: &StageContext, snapshots: &[(u64, u64)]) -> Result<()> {
    for &(k, _) in snapshots {
        let (src, dst) = (
            backbone::snapshot_dir(&ctx.job.work_dir, k),
            backbone::snapshot_dir(&ctx.job.out_dir, k),
        );
        fs_err::create_dir_all(&dst)?;
        for f in [backbone::ENCODER_FILE, backbone::MODEL_FILE] {
            if std::fs::hard_link(src.join(f), dst.join(f)).is_err() {
                fs_err::copy(src.join(f), dst.join(f))?;
            }
        }
    }
    Ok(())
}

/// The finished run's artifacts (weights, config, snapshots) and its output (`n_images`
/// training images, `world` ranks).
pub(super) fn finish(
    ctx: &mut StageContext,
    step: &JepaStep,
    mask: &MaskConfig,
    done: Trained,
    (batch_size, n_images, world): (usize, usize, usize),
) -> Result<StageOutput> {
    let out_dir = ctx.job.out_dir.clone();
    let total = done.state.step;
    let info = json!({
        "resumed_from": done.resumed_from,
        "iterations_per_epoch": step.ipe,
        "total_steps": total,
        "train_images": n_images,
        "mask_min_keep": mask.min_keep,
        "ranks": world,
        "thread_shards": step.shards.as_ref().map_or(1, ThreadShards::count),
        "snapshot_epochs": step.snapshots.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
    });
    write_artifacts(ctx, &out_dir, &step.nets, &step.cfg, mask, step.ipe, total)?;
    link_snapshots(ctx, &step.snapshots)?;
    let trained = (total - done.resumed_from) as usize * batch_size;
    let images_per_sec = trained as f64 / done.secs.max(1e-9);
    Ok(output(done, step.ipe, images_per_sec, info))
}

/// The stage's metrics (the last step's values), series and info.
fn output(done: Trained, ipe: u64, images_per_sec: f64, info: Value) -> StageOutput {
    let mut out = StageOutput::default();
    let m = &mut out.metrics;
    let step = done.state.step;
    for name in NAMES.iter().chain(&["lr"]) {
        if let Some(&v) = done.last.get(*name) {
            m.insert(name.to_string(), v);
        }
    }
    m.insert("steps".into(), step as f64);
    m.insert("epochs".into(), step as f64 / ipe as f64);
    if images_per_sec > 0.0 {
        m.insert("images_per_sec".into(), images_per_sec);
    }
    // JSON has no NaN: a non-finite value is left out rather than breaking the record
    m.retain(|_, v| v.is_finite());
    out.series = done.state.curves;
    out.info = info;
    out
}

/// The target encoder's tensors with official names (no prefix).
pub(super) fn target_tensors(nets: &JepaNetworks) -> HashMap<String, Tensor> {
    let prefix = format!("{}.", crate::model::jepa::TARGET_ENCODER);
    nets.state_tensors()
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v)))
        .collect()
}

/// Write the snapshot of epoch `k` into `<root>/epoch-<k>/` (complete or absent: written into a
/// temporary folder, then renamed; a copy left by an earlier attempt is replaced).
pub(super) fn write_snapshot(
    root: &std::path::Path,
    k: u64,
    nets: &JepaNetworks,
    cfg: &VitConfig,
) -> Result<()> {
    let name = format!("epoch-{k}");
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    backbone::save(&tmp, cfg, &target_tensors(nets))?;
    let dst = root.join(name);
    if dst.exists() {
        fs_err::remove_dir_all(&dst)?;
    }
    fs_err::rename(&tmp, &dst)?;
    Ok(())
}

fn write_artifacts(
    ctx: &StageContext,
    dir: &std::path::Path,
    nets: &JepaNetworks,
    cfg: &VitConfig,
    mask: &MaskConfig,
    ipe: u64,
    total: u64,
) -> Result<()> {
    let all = nets.state_tensors();
    backbone::save(dir, cfg, &target_tensors(nets))?;
    candle_core::safetensors::save(&all, dir.join(FULL_FILE))?;
    let mut config = ctx.job.config.clone();
    config["effective"] = json!({
        "model": cfg,
        "mask": mask,
        "iterations_per_epoch": ipe,
        "total_steps": total,
    });
    crate::util::atomic::write_json(&dir.join(CONFIG_FILE), &config)?;
    Ok(())
}

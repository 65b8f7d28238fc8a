//! What pretraining keeps and writes: its checkpoints (networks, optimiser, state), the reading and
//! logging of a step's values, the epoch snapshots, the final artifacts and metrics.

use super::super::{backbone, StageContext, StageOutput};
use super::{Params, CONFIG_FILE, FULL_FILE};
use crate::error::{Error, Result};
use crate::model::masks::MaskConfig;
use crate::model::{JepaNetworks, VitConfig};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::step::{PendingLosses, StepError, StepLosses};
use crate::util::rng::derive_seed;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

pub(super) const NETS_FILE: &str = "nets.safetensors";
pub(super) const OPTIM_FILE: &str = "optim.safetensors";
pub(super) const STATE_FILE: &str = "state.json";

/// The last step's values (the final metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Last {
    pub(super) loss: f64,
    pub(super) loss_jepa: f64,
    pub(super) loss_sim: f64,
    pub(super) loss_std: f64,
    pub(super) loss_cov: f64,
    pub(super) target_std: f64,
    pub(super) lr: f64,
}

/// Everything besides the tensors that a checkpoint holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct TrainState {
    /// Completed steps.
    pub(super) step: u64,
    /// Logged series up to `step`.
    pub(super) series: BTreeMap<String, Vec<(u64, f64)>>,
    /// Values of step `step`.
    pub(super) last: Last,
}

impl TrainState {
    pub(super) fn push(&mut self, name: &str, value: f64) {
        if value.is_finite() {
            let s = self.step;
            self.series.entry(name.into()).or_default().push((s, value));
        }
    }
}

/// The networks, optimiser and state of the newest checkpoint, or fresh ones drawn from the
/// stage's seed.
pub(super) fn resume_or_init(
    ctx: &mut StageContext,
    cfg: &VitConfig,
    adam: AdamWConfig,
    total: u64,
    dev: &candle_core::Device,
) -> Result<(JepaNetworks, AdamW, TrainState)> {
    let id = ctx.job.id.clone();
    let fail = |m: String| Error::stage(&id, m);
    let Some(c) = ctx.ckpt.load()? else {
        let seed = derive_seed(&ctx.job.key, ctx.job.seed, "init");
        let nets = JepaNetworks::new_random(cfg, seed, dev).map_err(|e| fail(e.to_string()))?;
        let opt = AdamW::new(nets.online_vars(), adam).map_err(|e| fail(e.to_string()))?;
        return Ok((nets, opt, TrainState::default()));
    };
    let bad = |e: String| fail(format!("checkpoint {}: {e}", c.path.display()));
    let nets = JepaNetworks::from_safetensors(cfg, &c.path.join(NETS_FILE), dev)
        .map_err(|e| bad(e.to_string()))?;
    let mut opt = AdamW::new(nets.online_vars(), adam).map_err(|e| bad(e.to_string()))?;
    let ost = candle_core::safetensors::load(c.path.join(OPTIM_FILE), dev)?;
    opt.load_state(&ost).map_err(|e| bad(e.to_string()))?;
    let st: TrainState = serde_json::from_slice(&fs_err::read(c.path.join(STATE_FILE))?)?;
    if st.step != c.step || st.step > total {
        return Err(bad(format!("holds step {}, expected {}", st.step, c.step)));
    }
    ctx.log(format!("resumed from step {} of {total}", st.step));
    Ok((nets, opt, st))
}

/// The snapshots `(epoch, step)` this run reaches. Those at or before the resumed step were
/// written before the checkpoint was taken: missing ones are an error that says what to delete.
pub(super) fn snapshots_reached(
    ctx: &mut StageContext,
    p: &Params,
    ipe: u64,
    total: u64,
    resumed: u64,
    rank: usize,
) -> Result<Vec<(u64, u64)>> {
    let snapshots: Vec<(u64, u64)> = p
        .snapshot_epochs
        .iter()
        .map(|&k| (k, k * ipe))
        .filter(|&(_, s)| s <= total)
        .collect();
    if rank == 0 {
        for &(k, s) in snapshots.iter().filter(|(_, s)| *s <= resumed) {
            let d = backbone::snapshot_dir(&ctx.job.work_dir, k);
            if !d.join(backbone::ENCODER_FILE).is_file() {
                return Err(Error::stage(
                    &ctx.job.id,
                    format!(
                        "resuming at step {resumed}: the snapshot of epoch {k} (step {s}) is \
                         missing from {}; delete {} to train from the start",
                        d.display(),
                        ctx.ckpt.dir().display()
                    ),
                ));
            }
        }
    }
    for &k in &p.snapshot_epochs {
        if k * ipe > total {
            ctx.log(format!(
                "no snapshot of epoch {k}: training stops at step {total} (`max_steps`), before \
                 step {}",
                k * ipe
            ));
        }
    }
    Ok(snapshots)
}

/// Link (or copy) the epoch snapshots from the work folder into the outputs.
pub(super) fn link_snapshots(ctx: &StageContext, snapshots: &[(u64, u64)]) -> Result<()> {
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

/// The stage's metrics (the last step's values), series and info.
pub(super) fn output(st: TrainState, ipe: u64, images_per_sec: f64, info: Value) -> StageOutput {
    let mut out = StageOutput::default();
    let m = &mut out.metrics;
    let last = st.last;
    for (k, v) in [
        ("loss", last.loss),
        ("loss_jepa", last.loss_jepa),
        ("loss_sim", last.loss_sim),
        ("loss_std", last.loss_std),
        ("loss_cov", last.loss_cov),
        ("target_std", last.target_std),
        ("lr", last.lr),
        ("steps", st.step as f64),
        ("epochs", st.step as f64 / ipe as f64),
        // no images were trained in a run that resumed at the end
        (
            "images_per_sec",
            if images_per_sec > 0.0 {
                images_per_sec
            } else {
                f64::NAN
            },
        ),
    ] {
        // JSON has no NaN: a non-finite value is left out rather than breaking the record.
        if v.is_finite() {
            m.insert(k.into(), v);
        }
    }
    out.series = st.series;
    out.info = info;
    out
}

/// Reads the values of the last step taken, if still unread. A divergence stops the stage; the
/// weights of the diverged steps are never written, so the last checkpoint is the last good one.
pub(super) fn settle(
    id: &str,
    ctx: &StageContext,
    unread: &mut Option<(u64, PendingLosses, f64)>,
    total: u64,
) -> Result<Option<(StepLosses, f64)>> {
    let Some((step, pending, lr)) = unread.take() else {
        return Ok(None);
    };
    match pending.read() {
        Ok(l) => Ok(Some((l, lr))),
        Err(e @ StepError::NonFinite { .. }) => Err(Error::stage(
            id,
            format!(
                "diverged by step {step} of {total}: {e}; the last good checkpoint ({}) is \
                 kept; lower `lr` or set `clip_grad`",
                match ctx.ckpt.load() {
                    Ok(Some(c)) => format!("step {}", c.step),
                    _ => "none yet".into(),
                }
            ),
        )),
        Err(e) => Err(Error::stage(id, format!("step {step}: {e}"))),
    }
}

pub(super) fn last_values(l: &StepLosses, lr: f64) -> Last {
    Last {
        loss: l.total as f64,
        loss_jepa: l.jepa as f64,
        loss_sim: l.sim as f64,
        loss_std: l.std as f64,
        loss_cov: l.cov as f64,
        target_std: l.target_std as f64,
        lr,
    }
}

/// Records a logged step in the stage's series and its live curves (which also get the
/// throughput since the run started).
pub(super) fn log_step(
    ctx: &mut StageContext,
    st: &mut TrainState,
    l: &StepLosses,
    (lr, wd): (f64, f64),
    images_per_sec: f64,
    eff_rank: f64,
) {
    let values = [
        ("loss", l.total as f64),
        ("loss_jepa", l.jepa as f64),
        ("loss_sim", l.sim as f64),
        ("loss_std", l.std as f64),
        ("loss_cov", l.cov as f64),
        ("target_std", l.target_std as f64),
        ("target_eff_rank", eff_rank),
        ("lr", lr),
        ("wd", wd),
        ("grad_norm", l.optim.grad_norm.unwrap_or(f64::NAN)),
    ];
    for (name, v) in values {
        st.push(name, v);
    }
    let mut curves = values.to_vec();
    curves.push(("images_per_sec", images_per_sec));
    ctx.scalars(st.step, &curves);
}

/// Save the training state after `st.step` completed steps.
pub(super) fn save(
    ctx: &mut StageContext,
    nets: &JepaNetworks,
    opt: &AdamW,
    st: &TrainState,
) -> Result<()> {
    let weights = nets.state_tensors();
    let optim = opt
        .state_tensors()
        .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?;
    let state = serde_json::to_vec(st)?;
    ctx.ckpt.save(st.step, |dir| {
        candle_core::safetensors::save(&weights, dir.join(NETS_FILE))?;
        candle_core::safetensors::save(&optim, dir.join(OPTIM_FILE))?;
        fs_err::write(dir.join(STATE_FILE), &state)?;
        Ok(())
    })?;
    ctx.log(format!("checkpoint at step {}", st.step));
    Ok(())
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

pub(super) fn write_artifacts(
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

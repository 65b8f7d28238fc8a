//! The backbone an evaluation stage probes or fine-tunes, and the artifact contract of stages that
//! produce one (`pretrain`, `finetune`): `encoder.safetensors` holds the **target encoder** with the
//! official I-JEPA key names (`patch_embed.proj.weight`, `blocks.{i}.*`, `norm.*`, no prefix) and
//! `model.json` its [`VitConfig`].
//!
//! `checkpoint:` of an evaluation stage selects the weights: `upstream` (default: the encoder of
//! the upstream `pretrain`/`finetune` stage), `random` (seeded random init, the baseline row of the
//! tables) or a path (see [`open`]): an artifact folder holding `encoder.safetensors` +
//! `model.json` (of a `pretrain` / `finetune` stage or of `cjepa checkpoint import`), a
//! safetensors file (keys may carry `module.` and `target_encoder.` / `encoder.` prefixes, the
//! target encoder is preferred; the architecture comes from the stage's `model:`, else a
//! `model.json` next to the file), or an official I-JEPA `.pth.tar` (read through
//! [`crate::model::import`]; needs `model:`).
//!
//! Snapshots: a `pretrain` stage with `snapshot_epochs: [k, ...]` also writes the same pair for
//! the target encoder at the end of epoch k, into `snapshots/epoch-<k>/` of its artifacts
//! ([`snapshot_dir`]). `at_epoch: k` of an evaluation stage (with `checkpoint: upstream`) reads
//! that snapshot instead of the final weights; planning checks that the upstream lists k
//! ([`check_upstream_snapshot`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{StageContext, StageKind};
use crate::error::{Error, Result};
use crate::kind::{PlanIssue, PlanView};
use crate::model::{JepaNetworks, VisionTransformer, VitConfig};

/// Encoder weights file in a producing stage's artifacts.
pub const ENCODER_FILE: &str = "encoder.safetensors";
/// Architecture file next to it.
pub const MODEL_FILE: &str = "model.json";
/// Kinds whose artifacts hold an encoder.
pub const PRODUCERS: &[&str] = &["pretrain", "finetune"];
/// Folder of a pretrain stage's artifacts holding its snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// The snapshot of epoch `epoch` in a producing stage's artifact folder:
/// `<artifacts>/snapshots/epoch-<epoch>/` (an `encoder.safetensors` + `model.json` pair).
pub fn snapshot_dir(artifacts: &Path, epoch: u64) -> PathBuf {
    artifacts.join(SNAPSHOTS_DIR).join(format!("epoch-{epoch}"))
}

/// Plan-time checks of a stage that reads a backbone (`checkpoint:` and `at_epoch:` params): a
/// `checkpoint:` path must exist unless an upstream `command` stage may write it (relative paths
/// are read from the pipeline file's folder, as the stage reads them), and `at_epoch: k` needs an
/// upstream pretrain stage that saves the snapshot of epoch k.
pub fn check_plan(stage: &PlanView) -> crate::kind::PlanCheck {
    if let Some(c) = stage
        .params
        .get("checkpoint")
        .and_then(serde_json::Value::as_str)
    {
        if CheckpointRef::parse(c, stage.pipeline_dir) == CheckpointRef::Upstream
            && !stage
                .upstream
                .iter()
                .any(|u| PRODUCERS.contains(&u.kind.name()))
        {
            return Err(PlanIssue::params(
                "checkpoint",
                "`checkpoint: upstream` (the default) reads the encoder of a `pretrain` or \
                 `finetune` stage in `needs`, and there is none; add one to `needs`, or use \
                 `checkpoint: random` or a path",
            ));
        }
        let produced_upstream = stage.upstream.iter().any(|u| u.kind == StageKind::Command);
        if !produced_upstream {
            check_checkpoint_path(c, stage.pipeline_dir)
                .map_err(|m| PlanIssue::params("checkpoint", m))?;
        }
    }
    if let Some(k) = stage
        .params
        .get("at_epoch")
        .and_then(serde_json::Value::as_u64)
    {
        let ups: Vec<(&str, &str, &serde_json::Value)> = stage
            .upstream
            .iter()
            .map(|u| (u.id, u.kind.name(), &u.config["params"]))
            .collect();
        check_upstream_snapshot(k, &ups).map_err(|m| PlanIssue::params("", m))?;
    }
    Ok(())
}

/// A `checkpoint:` path (not `upstream` / `random`) must exist.
fn check_checkpoint_path(c: &str, dir: &Path) -> std::result::Result<(), String> {
    match CheckpointRef::parse(c, dir) {
        CheckpointRef::Path(path) if !path.exists() => Err(format!(
            "`checkpoint` {} does not exist (relative paths are read from the pipeline \
             file's folder); fix the path, import official weights with `cjepa checkpoint import`, \
             or use `checkpoint: upstream` (with a pretrain / finetune stage in `needs`) or \
             `checkpoint: random`",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Check the `at_epoch` of an evaluation stage against its own `checkpoint` (the message names
/// the field).
pub fn check_at_epoch(checkpoint: &str, at_epoch: Option<u64>) -> std::result::Result<(), String> {
    match at_epoch {
        None => Ok(()),
        Some(0) => Err("`at_epoch` must be at least 1 (a pretraining epoch)".into()),
        Some(k) => match checkpoint {
            "" | "upstream" => Ok(()),
            c => Err(format!(
                "`at_epoch: {k}` reads a snapshot of the upstream pretrain stage; it needs \
                 `checkpoint: upstream` (got `{c}`)"
            )),
        },
    }
}

/// Check `at_epoch: k` of a stage against its upstream stages `(id, kind, resolved params)`: one
/// of them is a `pretrain` stage that saves the snapshot of epoch k. The message says what to
/// add where.
pub fn check_upstream_snapshot(
    k: u64,
    upstream: &[(&str, &str, &serde_json::Value)],
) -> std::result::Result<(), String> {
    let Some((id, kind, params)) = upstream
        .iter()
        .find(|(_, kind, _)| PRODUCERS.contains(kind))
    else {
        return Err(format!(
            "`at_epoch: {k}` needs a `pretrain` stage in `needs` (the run whose snapshot to read)"
        ));
    };
    if *kind != "pretrain" {
        return Err(format!(
            "`at_epoch: {k}`: upstream `{id}` is a `{kind}` stage; only `pretrain` stages save \
             snapshots (drop `at_epoch`)"
        ));
    }
    let epochs = params["epochs"].as_u64().unwrap_or(0);
    let saved: Vec<u64> = params["snapshot_epochs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    if saved.contains(&k) {
        return Ok(());
    }
    if k == epochs {
        return Err(format!(
            "`at_epoch: {k}`: epoch {k} is the end of `{id}`'s training, whose final weights \
             are read without `at_epoch`; drop it"
        ));
    }
    if k > epochs {
        return Err(format!(
            "`at_epoch: {k}`: upstream pretrain stage `{id}` trains only {epochs} epochs"
        ));
    }
    Err(format!(
        "`at_epoch: {k}`: upstream pretrain stage `{id}` saves no snapshot of epoch {k} (its \
         `snapshot_epochs`: {saved:?}); add {k} to that stage's `snapshot_epochs`"
    ))
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointRef {
    /// The upstream pretrain / finetune stage.
    Upstream,
    /// Seeded random init.
    Random,
    /// A safetensors file.
    Path(PathBuf),
}

impl CheckpointRef {
    /// Parse `upstream` / `random` / a path (relative to `base`).
    pub fn parse(s: &str, base: &Path) -> Self {
        match s {
            "" | "upstream" => CheckpointRef::Upstream,
            "random" => CheckpointRef::Random,
            p => {
                let p = PathBuf::from(super::dataset::expand_env(p));
                CheckpointRef::Path(if p.is_absolute() { p } else { base.join(p) })
            }
        }
    }
}

/// The device a job runs on.
pub fn device(ctx: &StageContext) -> Result<Device> {
    parse_device(&ctx.job.device).map_err(|e| match e {
        Error::Usage(m) => Error::stage(&ctx.job.id, m),
        e => e,
    })
}

/// A device from its name: `cpu`, `cuda` (= `cuda:0`), `cuda:N`, or `auto` (`cuda:0` when this
/// build has CUDA and a GPU is visible, else the CPU).
pub fn parse_device(d: &str) -> Result<Device> {
    if !cfg!(feature = "cuda") && d.starts_with("cuda") {
        return Err(Error::Usage(format!(
            "device `{d}`: this cjepa was built without CUDA; build it with `--features cuda` (scripts/build-cuda.sh)"
        )));
    }
    match d {
        "cpu" | "" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        "auto" => Ok(Device::cuda_if_available(0)?),
        _ => {
            let i = d
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok());
            match i {
                Some(i) => Ok(Device::new_cuda(i)?),
                None => Err(Error::Usage(format!(
                    "bad device `{d}`: use cpu, cuda, cuda:N or auto"
                ))),
            }
        }
    }
}

/// A loaded encoder whose variables live in `varmap` (trainable for fine-tuning, or just read).
pub struct Backbone {
    /// Architecture.
    pub cfg: VitConfig,
    /// The encoder.
    pub encoder: VisionTransformer,
    /// Its variables (official names, no prefix).
    pub varmap: VarMap,
    /// Human description of where the weights came from.
    pub source: String,
    /// The pretraining epoch of an upstream snapshot (`at_epoch`); `None` for final weights.
    pub at_epoch: Option<u64>,
}

/// Upstream stage that produced an encoder, if any.
pub fn producer(ctx: &StageContext) -> Option<&crate::kind::job::UpstreamRef> {
    ctx.job
        .upstream
        .values()
        .find(|u| PRODUCERS.contains(&u.kind.as_str()))
}

/// Load the backbone selected by `checkpoint` (see the module doc). `model` (the stage's own
/// `model:` config, if any) gives the architecture for `random` and imported checkpoints.
pub fn load(
    ctx: &StageContext,
    checkpoint: &str,
    model: Option<&serde_json::Value>,
    dev: &Device,
) -> Result<Backbone> {
    load_at(ctx, checkpoint, None, model, dev)
}

/// [`load`], reading the upstream pretrain stage's snapshot of epoch `at_epoch` when given.
pub fn load_at(
    ctx: &StageContext,
    checkpoint: &str,
    at_epoch: Option<u64>,
    model: Option<&serde_json::Value>,
    dev: &Device,
) -> Result<Backbone> {
    let id = ctx.job.id.clone();
    check_at_epoch(checkpoint, at_epoch).map_err(|m| Error::stage(&id, m))?;
    if let Some(k) = at_epoch {
        let ups: Vec<(&str, &str, &serde_json::Value)> = ctx
            .job
            .upstream
            .values()
            .map(|u| (u.id.as_str(), u.kind.as_str(), &u.config["params"]))
            .collect();
        check_upstream_snapshot(k, &ups).map_err(|m| Error::stage(&id, m))?;
        let u = producer(ctx).expect("checked");
        let dir = snapshot_dir(&u.artifacts, k);
        if !dir.join(ENCODER_FILE).is_file() {
            return Err(Error::stage(
                &id,
                format!(
                    "`at_epoch: {k}`: upstream `{}` has no snapshot of epoch {k} in {} (it \
                     trained {} steps, {} epochs; `max_steps` may have stopped it earlier)",
                    u.id,
                    dir.display(),
                    u.metrics.get("steps").copied().unwrap_or(0.0),
                    u.metrics.get("epochs").copied().unwrap_or(0.0),
                ),
            ));
        }
        let cfg = read_config(&dir.join(MODEL_FILE))?;
        let t = candle_core::safetensors::load(dir.join(ENCODER_FILE), dev)?;
        let source = format!("{} ({}) at epoch {k}", u.id, &u.key[..12.min(u.key.len())]);
        let mut bb = build(&id, cfg, &t, dev, source)?;
        bb.at_epoch = Some(k);
        return Ok(bb);
    }
    let which = CheckpointRef::parse(checkpoint, &ctx.job.pipeline_dir);
    let upstream_cfg = || -> Result<Option<VitConfig>> {
        match producer(ctx) {
            Some(u) => Ok(Some(read_config(&u.artifacts.join(MODEL_FILE))?)),
            None => Ok(None),
        }
    };
    let own_cfg = || -> Result<Option<VitConfig>> {
        match model {
            Some(m) if !m.is_null() => {
                Ok(Some(serde_json::from_value(m.clone()).map_err(|e| {
                    Error::stage(&id, format!("`model:` is not a valid ViT config: {e}"))
                })?))
            }
            _ => Ok(None),
        }
    };
    let (cfg, tensors, source) = match &which {
        CheckpointRef::Upstream => {
            let u = producer(ctx).ok_or_else(|| {
                Error::stage(&id, "checkpoint `upstream` needs a `pretrain` or `finetune` stage in `needs` (or use `checkpoint: random` / a path)")
            })?;
            let cfg = read_config(&u.artifacts.join(MODEL_FILE))?;
            let t = candle_core::safetensors::load(u.artifacts.join(ENCODER_FILE), dev)?;
            (cfg, t, format!("{} ({})", u.id, &u.key[..12]))
        }
        CheckpointRef::Random => {
            let cfg = own_cfg()?.or(upstream_cfg()?).ok_or_else(|| {
                Error::stage(&id, "checkpoint `random` needs the architecture: give the stage a `model:` or an upstream pretrain stage")
            })?;
            let seed = crate::util::rng::derive_seed(&ctx.job.key, ctx.job.seed, "random-init");
            let nets = JepaNetworks::new_random(&cfg, seed, dev)
                .map_err(|e| Error::stage(&id, e.to_string()))?;
            let t: HashMap<String, Tensor> = nets.target_encoder_tensors();
            (cfg, t, "random init".to_string())
        }
        CheckpointRef::Path(p) => {
            // The stage's `model:`, else the checkpoint's own model.json, else the upstream's.
            let cfg = match own_cfg()? {
                Some(c) => Some(c),
                None => stored_config(p)?.map_or_else(upstream_cfg, |c| Ok(Some(c)))?,
            };
            let cfg = cfg.ok_or_else(|| {
                Error::stage(&id, format!("checkpoint {} needs the architecture: give the stage a `model:` (e.g. `model: vit_base`)", p.display()))
            })?;
            let t = read_encoder(p, &cfg, dev).map_err(|e| Error::stage(&id, e.to_string()))?;
            (cfg, t, p.display().to_string())
        }
    };
    build(&id, cfg, &tensors, dev, source)
}

/// The encoder weights file of a checkpoint path: `DIR/encoder.safetensors` for a folder, the
/// path itself otherwise.
pub fn weights_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(ENCODER_FILE)
    } else {
        p.to_path_buf()
    }
}

/// The architecture stored with a checkpoint: `model.json` in the folder, or next to the file.
pub fn stored_config(p: &Path) -> Result<Option<VitConfig>> {
    let m = if p.is_dir() {
        p.join(MODEL_FILE)
    } else {
        match p.parent() {
            Some(d) => d.join(MODEL_FILE),
            None => return Ok(None),
        }
    };
    if m.is_file() {
        read_config(&m).map(Some)
    } else {
        Ok(None)
    }
}

fn is_pth(p: &Path) -> bool {
    let n = p.to_string_lossy();
    n.ends_with(".pth") || n.ends_with(".pth.tar") || n.ends_with(".pt")
}

/// Encoder tensors (official names, no prefix) of a checkpoint path for architecture `cfg`: a
/// folder's `encoder.safetensors`, a safetensors file ([`pick_encoder`]) or the target encoder of
/// an official `.pth.tar` / `.pth` (checked against `cfg`).
pub fn read_encoder(p: &Path, cfg: &VitConfig, dev: &Device) -> Result<HashMap<String, Tensor>> {
    if !p.exists() {
        return Err(Error::Data(format!(
            "checkpoint {} does not exist",
            p.display()
        )));
    }
    if is_pth(p) && p.is_file() {
        let ck = crate::model::import::read_ijepa_checkpoint(p, cfg)?;
        return ck
            .network(crate::model::jepa::TARGET_ENCODER)
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_device(dev)?)))
            .collect();
    }
    let f = weights_file(p);
    let raw = candle_core::safetensors::load(&f, dev)
        .map_err(|e| Error::Data(format!("cannot read checkpoint {}: {e}", f.display())))?;
    Ok(pick_encoder(raw))
}

/// Load the encoder of a checkpoint path outside a stage (`cjepa embed`): the architecture is
/// `cfg` when given, else the `model.json` stored with the checkpoint. Mismatches are
/// [`Error::Data`].
pub fn open(p: &Path, cfg: Option<VitConfig>, dev: &Device) -> Result<Backbone> {
    let cfg = match cfg {
        Some(c) => c,
        None => stored_config(p)?.ok_or_else(|| {
            Error::Usage(format!(
                "checkpoint {} has no model.json next to it: give the architecture (--model)",
                p.display()
            ))
        })?,
    };
    let t = read_encoder(p, &cfg, dev)?;
    assemble(cfg, &t, dev, p.display().to_string())
}

fn read_config(p: &Path) -> Result<VitConfig> {
    Ok(serde_json::from_slice(&fs_err::read(p)?)?)
}

/// Keep the encoder tensors of a checkpoint: strip `module.`, prefer `target_encoder.`, then
/// `encoder.`, else take unprefixed names.
pub fn pick_encoder(raw: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let raw: HashMap<String, Tensor> = raw
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .collect();
    for prefix in ["target_encoder.", "encoder."] {
        let sel: HashMap<String, Tensor> = raw
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
            .collect();
        if !sel.is_empty() {
            return sel;
        }
    }
    raw
}

/// Build an encoder in a fresh VarMap and copy `tensors` into it (every variable must be given);
/// a mismatch fails stage `id`.
pub fn build(
    id: &str,
    cfg: VitConfig,
    tensors: &HashMap<String, Tensor>,
    dev: &Device,
    source: String,
) -> Result<Backbone> {
    assemble(cfg, tensors, dev, source).map_err(|e| match e {
        Error::Data(m) => Error::stage(id, m),
        e => e,
    })
}

/// [`build`] with mismatches as [`Error::Data`].
fn assemble(
    cfg: VitConfig,
    tensors: &HashMap<String, Tensor>,
    dev: &Device,
    source: String,
) -> Result<Backbone> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let encoder = VisionTransformer::new(&cfg, vb).map_err(|e| Error::Data(e.to_string()))?;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::Data(format!("checkpoint ({source}) has no tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::Data(
                format!("checkpoint ({source}): `{name}` has shape {:?}, the model wants {:?}; check `model:`", t.dims(), var.dims()),
            ));
        }
        var.set(&t.to_dtype(DType::F32)?.copy()?)?;
    }
    Ok(Backbone {
        cfg,
        encoder,
        varmap,
        source,
        at_epoch: None,
    })
}

/// Write the artifact pair (`encoder.safetensors` + `model.json`) into `dir`.
pub fn save(dir: &Path, cfg: &VitConfig, encoder: &HashMap<String, Tensor>) -> Result<()> {
    fs_err::create_dir_all(dir)?;
    candle_core::safetensors::save(encoder, dir.join(ENCODER_FILE))?;
    crate::util::atomic::write_json(&dir.join(MODEL_FILE), cfg)?;
    Ok(())
}

#[cfg(test)]
mod tests;

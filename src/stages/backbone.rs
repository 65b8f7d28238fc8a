//! The backbone an evaluation stage probes or fine-tunes, and the artifact contract of stages that
//! produce one (`pretrain`, `finetune`): `encoder.safetensors` holds the **target encoder** with the
//! official I-JEPA key names (`patch_embed.proj.weight`, `blocks.{i}.*`, `norm.*`, no prefix) and
//! `model.json` its [`VitConfig`].
//!
//! `checkpoint:` of an evaluation stage selects the weights: `upstream` (default: the encoder of
//! the upstream `pretrain`/`finetune` stage), `random` (seeded random init, the baseline row of the
//! tables) or a path to a safetensors file (an imported I-JEPA checkpoint; keys may carry
//! `module.` and `target_encoder.` / `encoder.` prefixes, the target encoder is preferred).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::StageContext;
use crate::error::{Error, Result};
use crate::model::{JepaNetworks, VisionTransformer, VitConfig};

/// Encoder weights file in a producing stage's artifacts.
pub const ENCODER_FILE: &str = "encoder.safetensors";
/// Architecture file next to it.
pub const MODEL_FILE: &str = "model.json";
/// Kinds whose artifacts hold an encoder.
pub const PRODUCERS: &[&str] = &["pretrain", "finetune"];

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
    let d = ctx.job.device.as_str();
    if let Some(i) = d.strip_prefix("cuda:") {
        let i: usize = i
            .parse()
            .map_err(|_| Error::stage(&ctx.job.id, format!("bad device `{d}`")))?;
        return Ok(Device::new_cuda(i)?);
    }
    if d == "cuda" {
        return Ok(Device::new_cuda(0)?);
    }
    Ok(Device::Cpu)
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
}

/// Upstream stage that produced an encoder, if any.
pub fn producer(ctx: &StageContext) -> Option<&crate::exec::job::UpstreamRef> {
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
    let id = ctx.job.id.clone();
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
            let t: HashMap<String, Tensor> = nets
                .state_tensors()
                .into_iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix("target_encoder.")
                        .map(|k| (k.to_string(), v))
                })
                .collect();
            (cfg, t, "random init".to_string())
        }
        CheckpointRef::Path(p) => {
            let raw = candle_core::safetensors::load(p, dev).map_err(|e| {
                Error::stage(&id, format!("cannot read checkpoint {}: {e}", p.display()))
            })?;
            let t = pick_encoder(raw);
            let cfg = own_cfg()?.or(upstream_cfg()?).ok_or_else(|| {
                Error::stage(&id, format!("checkpoint {} needs the architecture: give the stage a `model:` (e.g. `model: vit_base`)", p.display()))
            })?;
            (cfg, t, p.display().to_string())
        }
    };
    build(&id, cfg, &tensors, dev, source)
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

/// Build an encoder in a fresh VarMap and copy `tensors` into it (every variable must be given).
pub fn build(
    id: &str,
    cfg: VitConfig,
    tensors: &HashMap<String, Tensor>,
    dev: &Device,
    source: String,
) -> Result<Backbone> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    let encoder = VisionTransformer::new(&cfg, vb).map_err(|e| Error::stage(id, e.to_string()))?;
    for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
        let t = tensors.get(name).ok_or_else(|| {
            Error::stage(id, format!("checkpoint ({source}) has no tensor `{name}`"))
        })?;
        if t.dims() != var.dims() {
            return Err(Error::stage(
                id,
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
    })
}

/// Write the artifact pair (`encoder.safetensors` + `model.json`) into `dir`.
pub fn save(dir: &Path, cfg: &VitConfig, encoder: &HashMap<String, Tensor>) -> Result<()> {
    fs_err::create_dir_all(dir)?;
    candle_core::safetensors::save(encoder, dir.join(ENCODER_FILE))?;
    crate::util::atomic::write_json(&dir.join(MODEL_FILE), cfg)?;
    Ok(())
}

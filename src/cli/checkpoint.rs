//! `cjepa checkpoint import FILE.pth.tar --model PRESET_OR_YAML [--out DIR]`: an official I-JEPA
//! PyTorch checkpoint into the crate's format.
//!
//! DIR receives what a `pretrain` stage leaves in its artifacts, so everything that reads one
//! reads it: `full.safetensors` (the three networks under their official prefixed names, frozen
//! position embeddings included), `encoder.safetensors` + `model.json` (the target encoder, the
//! backbone contract of `stages::backbone`: `checkpoint: DIR` in an evaluation stage, or
//! `cjepa embed --checkpoint DIR`), and `import.json` (where it came from: path, size, blake3,
//! the file's scalar entries such as `epoch`). What the import accepted with a remark (a target
//! position embedding drifted by the training loop's EMA, imported as the exact table) is printed
//! to stderr as `warning: ...`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cjepa::model::import::read_ijepa_checkpoint;
use cjepa::model::jepa::TARGET_ENCODER;
use cjepa::model::VitConfig;
use cjepa::stages::backbone;
use serde_json::json;

/// The subcommands of `cjepa checkpoint`.
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// Convert an official I-JEPA checkpoint (`*.pth.tar` with `encoder`, `predictor`,
    /// `target_encoder` state dicts) into safetensors + the encoder artifact stages load.
    Import {
        /// The PyTorch checkpoint (zip format of torch.save).
        file: PathBuf,
        /// Architecture: a preset (`vit_tiny` ... `vit_huge`) or a YAML/JSON file of a model
        /// config (the fields of `registry/models/*.yaml`).
        #[arg(long)]
        model: String,
        /// Output folder (default: FILE without `.pth.tar`, next to it).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Architecture from a preset name or a YAML/JSON file.
pub(crate) fn model_arg(s: &str) -> anyhow::Result<VitConfig> {
    if let Some(c) = VitConfig::by_name(s) {
        return Ok(c);
    }
    let p = Path::new(s);
    if !p.is_file() {
        return Err(cjepa::Error::Usage(format!(
            "--model {s}: neither a preset (vit_tiny, vit_small, vit_base, vit_large, vit_huge) nor a file"
        ))
        .into());
    }
    let text = fs_err::read_to_string(p)?;
    let cfg: VitConfig = serde_yaml::from_str(&text)
        .map_err(|e| cjepa::Error::config(p, None, format!("not a model config: {e}")))?;
    cfg.validate()
        .map_err(|e| cjepa::Error::config(p, None, e.to_string()))?;
    Ok(cfg)
}

fn default_out(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let stem = [".pth.tar", ".pth", ".pt", ".tar"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(&name);
    let stem = if stem == name {
        format!("{name}.cjepa")
    } else {
        stem.to_string()
    };
    file.with_file_name(stem)
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a {
        Args::Import { file, model, out } => import(&file, &model, out),
    }
}

fn import(file: &Path, model: &str, out: Option<PathBuf>) -> anyhow::Result<i32> {
    let cfg = model_arg(model)?;
    if !file.is_file() {
        return Err(cjepa::Error::Usage(format!("{}: no such file", file.display())).into());
    }
    let ck = read_ijepa_checkpoint(file, &cfg)?;
    for w in &ck.warnings {
        eprintln!("warning: {w}");
    }
    let out = out.unwrap_or_else(|| default_out(file));
    fs_err::create_dir_all(&out)?;
    let all: HashMap<String, candle_core::Tensor> = ck.tensors.clone().into_iter().collect();
    candle_core::safetensors::save(&all, out.join(cjepa::stages::pretrain::FULL_FILE))
        .with_context(|| format!("writing {}", out.display()))?;
    let target: HashMap<String, candle_core::Tensor> =
        ck.network(TARGET_ENCODER).into_iter().collect();
    backbone::save(&out, &cfg, &target)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(fs_err::File::open(file)?)?;
    let params: usize = target.values().map(|t| t.elem_count()).sum();
    let info = json!({
        "source": fs_err::canonicalize(file)?,
        "source_bytes": fs_err::metadata(file)?.len(),
        "source_blake3": h.finalize().to_hex().to_string(),
        "meta": ck.meta,
        "model": cfg,
        "tensors": ck.tensors.len(),
        "encoder_params": params,
        "cjepa": env!("CARGO_PKG_VERSION"),
    });
    fs_err::write(
        out.join("import.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    let epoch = ck
        .meta
        .get("epoch")
        .map_or("unknown".to_string(), |e| e.to_string());
    outln!(
        "imported {} ({} tensors, epoch {epoch}; target encoder: {params} parameters, D {}, depth {}, patch {}, {} px)",
        file.display(),
        ck.tensors.len(),
        cfg.embed_dim,
        cfg.depth,
        cfg.patch_size,
        cfg.img_size
    )?;
    outln!(
        "wrote {}/{{{}, {}, {}, import.json}}",
        out.display(),
        cjepa::stages::pretrain::FULL_FILE,
        backbone::ENCODER_FILE,
        backbone::MODEL_FILE
    )?;
    outln!(
        "use it with `checkpoint: {}` in an evaluation stage, or `cjepa embed --checkpoint {}`",
        out.display(),
        out.display()
    )?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_out_strips_the_torch_suffix() {
        let p = Path::new("/x/IN1K-vit.h.14-300e.pth.tar");
        assert_eq!(default_out(p), Path::new("/x/IN1K-vit.h.14-300e"));
        assert_eq!(
            default_out(Path::new("a/b.bin")),
            Path::new("a/b.bin.cjepa")
        );
    }
}

//! Pooled ViT features of every image in a folder through library calls, as `cjepa embed` does:
//! [`list_images`] (recursive, in torchvision's order), an encoder from [`backbone::open`] (an
//! artifact folder of a `pretrain` / `finetune` stage or `cjepa checkpoint import`, an
//! `encoder.safetensors`, or an official I-JEPA `.pth.tar` with `--model`) or a seeded random
//! init ([`JepaNetworks::new_random`]), the eval transform, and [`embed_files`]: `last` `(N, D)`,
//! the last block's token mean, and `last4` `(N, L·D)`, the last four blocks'.
//!
//! With no `--images`, a tiny synthetic ImageFolder is generated first; with no `--checkpoint`,
//! the encoder is a random-init 2-block ViT at 32 px (`--model PRESET` picks another size).
//! `--out F.safetensors` writes the two tensors (`cjepa embed` also writes the file order next to
//! them); without it the features' first values are printed.
//!
//! Run: `cargo run --release --example embed_folder -- [--images DIR] [--checkpoint PATH]
//! [--model vit_tiny|vit_small|vit_base|vit_large|vit_huge] [--out F.safetensors]`

use std::path::{Path, PathBuf};

use candle_core::Device;
use cjepa::data::{synth, DataFormat, SynthParams, Transform};
use cjepa::eval::embed::{embed_files, list_images, Embeddings};
use cjepa::model::{JepaNetworks, VitConfig};
use cjepa::stages::backbone;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Folder of images (searched recursively); default: a generated tiny ImageFolder.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Checkpoint path; default: a random-init encoder.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Architecture preset; default: the checkpoint's model.json (random init: a tiny ViT).
    #[arg(long)]
    model: Option<String>,
    /// Write `last` and `last4` to this safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// A ViT-Tiny cut to two blocks on 32 px images in 8 px patches (milliseconds per image).
pub fn tiny_vit() -> VitConfig {
    VitConfig {
        img_size: 32,
        patch_size: 8,
        embed_dim: 48,
        depth: 2,
        pred_embed_dim: 48,
        pred_depth: 1,
        ..VitConfig::vit_tiny()
    }
}

/// The images under `images` and their features from the encoder of `checkpoint` (architecture
/// `model`, else the checkpoint's), or from a random init of `model` (default [`tiny_vit`]).
pub fn embed(
    images: &Path,
    checkpoint: Option<&Path>,
    model: Option<VitConfig>,
    dev: &Device,
) -> anyhow::Result<(Vec<PathBuf>, Embeddings)> {
    let encoder = match checkpoint {
        Some(p) => backbone::open(p, model, dev)?.encoder,
        None => JepaNetworks::new_random(&model.unwrap_or_else(tiny_vit), 0, dev)?.target_encoder,
    };
    let files = list_images(images)?;
    let transform = Transform::imagenet_eval(encoder.config().img_size as u32);
    let emb = embed_files(&encoder, &files, &transform, 32, dev, |_, _| {})?;
    Ok((files, emb))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dev = backbone::parse_device(&a.device)?;
    let model = match a.model.as_deref() {
        Some(m) => Some(VitConfig::by_name(m).ok_or_else(|| anyhow::anyhow!("no preset {m}"))?),
        None => None,
    };
    let tmp = tempfile::tempdir()?;
    let images = match a.images {
        Some(p) => p,
        None => {
            let root = tmp.path().join("shapes");
            synth(DataFormat::ImageFolder, &root, 0, &SynthParams::tiny())?;
            root.join("val")
        }
    };
    let (files, emb) = embed(&images, a.checkpoint.as_deref(), model, &dev)?;
    println!(
        "{} images from {}: last {:?}, last4 {:?} (blocks {:?})",
        files.len(),
        images.display(),
        emb.last.dims(),
        emb.last4.dims(),
        emb.layers
    );
    if let Some(out) = &a.out {
        let map = [("last", &emb.last), ("last4", &emb.last4)];
        let map = map.map(|(k, t)| (k.to_string(), t.clone()));
        candle_core::safetensors::save(&std::collections::HashMap::from(map), out)?;
        println!("wrote {}", out.display());
        return Ok(());
    }
    let rows = emb.last.to_vec2::<f32>()?;
    for (f, row) in files.iter().zip(&rows).take(8) {
        let name = f.strip_prefix(&images).unwrap_or(f).display().to_string();
        let head: Vec<String> = row.iter().take(4).map(|v| format!("{v:+.3}")).collect();
        println!("  {name:<24} [{} ...]", head.join(", "));
    }
    Ok(())
}

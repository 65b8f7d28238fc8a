//! `cjepa embed --checkpoint C [--model M] --images DIR --out F.safetensors`: average-pooled
//! target-encoder features of every image under DIR (see `cjepa::eval::embed` for the folder
//! layouts and the order), written as safetensors `last` `(N, D)` and `last4` `(N, L·D)`, with
//! the ordered file list and the settings in a JSON sidecar (`F.json`).
//!
//! C is a path (an artifact folder of `pretrain` / `finetune` / `cjepa checkpoint import`, an
//! `encoder.safetensors` / `full.safetensors` file, or an official `.pth.tar`) or else the key
//! (or a unique key prefix) of a stored `pretrain` / `finetune` record. The architecture is
//! `--model` when given, else the checkpoint's `model.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cjepa::data::Transform;
use cjepa::eval::embed::{embed_files, list_images};
use cjepa::stages::backbone::{self, Backbone};
use cjepa::store::Store;
use serde_json::json;

/// Arguments of `cjepa embed`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint: artifact folder, safetensors file, `.pth.tar`, or a stored stage key (prefix).
    #[arg(long)]
    checkpoint: String,
    /// Architecture (preset or YAML/JSON file); default: the checkpoint's model.json.
    #[arg(long)]
    model: Option<String>,
    /// Folder of images (flat, ImageFolder split or root; searched recursively).
    #[arg(long)]
    images: PathBuf,
    /// Output safetensors file (the file list goes next to it, with the extension `.json`).
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images per forward pass (does not change the features).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Image side of the eval transform (resize to side·256/224, centre crop); default: the
    /// model's `img_size`.
    #[arg(long)]
    img: Option<u32>,
    /// Store that holds the record when `--checkpoint` is a key (default `.cjepa`).
    #[arg(long)]
    store: Option<PathBuf>,
}

/// The checkpoint path `c` names: itself when it exists, else the artifacts of a stored record.
fn resolve(c: &str, store: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let p = PathBuf::from(c);
    if p.exists() {
        return Ok(p);
    }
    let root = super::default_store(store);
    if !root.is_dir() {
        return Err(cjepa::Error::Usage(format!(
            "--checkpoint {c}: no such file or folder, and no store at {} to look the key up in",
            root.display()
        ))
        .into());
    }
    let st = Store::open(&root, false, "cjepa embed")?;
    let found = st.find_prefix(c)?;
    match found.as_slice() {
        [r] if backbone::PRODUCERS.contains(&r.kind.as_str()) => Ok(st.artifact_dir(&r.key)),
        [r] => Err(cjepa::Error::Usage(format!(
            "record {} is a `{}` stage; --checkpoint needs one of {:?}",
            r.key,
            r.kind,
            backbone::PRODUCERS
        ))
        .into()),
        [] => Err(cjepa::Error::Usage(format!(
            "--checkpoint {c}: no such file or folder, and no record in {} with that key",
            root.display()
        ))
        .into()),
        many => Err(cjepa::Error::Usage(format!(
            "{} records start with {c}; give more characters",
            many.len()
        ))
        .into()),
    }
}

fn sidecar(out: &Path) -> PathBuf {
    out.with_extension("json")
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if a.batch == 0 {
        return Err(cjepa::Error::Usage("--batch must be at least 1".into()).into());
    }
    let dev = backbone::parse_device(&a.device)?;
    let cfg = a
        .model
        .as_deref()
        .map(super::checkpoint::model_arg)
        .transpose()?;
    let path = resolve(&a.checkpoint, &a.store)?;
    let Backbone {
        cfg,
        encoder,
        source,
        ..
    } = backbone::open(&path, cfg, &dev)?;
    let files = list_images(&a.images)?;
    let img = a.img.unwrap_or(cfg.img_size as u32);
    let transform = Transform::imagenet_eval(img);
    eprintln!(
        "embedding {} images from {} with {} (D {}, depth {}, patch {}) at {img} px on {}",
        files.len(),
        a.images.display(),
        source,
        cfg.embed_dim,
        cfg.depth,
        cfg.patch_size,
        a.device
    );
    let t0 = Instant::now();
    let emb = embed_files(
        &encoder,
        &files,
        &transform,
        a.batch,
        &dev,
        |done, total| {
            eprint!("\r  {done}/{total} images");
        },
    )?;
    eprintln!();
    let secs = t0.elapsed().as_secs_f64();
    if let Some(d) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs_err::create_dir_all(d)?;
    }
    let map = std::collections::HashMap::from([
        ("last".to_string(), emb.last.clone()),
        ("last4".to_string(), emb.last4.clone()),
    ]);
    candle_core::safetensors::save(&map, &a.out)?;
    let rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(&a.images)
                .unwrap_or(f)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let side = json!({
        "images": fs_err::canonicalize(&a.images)?,
        "files": rel,
        "checkpoint": source,
        "model": cfg,
        "layers": emb.layers,
        "transform": transform,
        "features": {"last": emb.last.dims(), "last4": emb.last4.dims()},
    });
    let sc = sidecar(&a.out);
    fs_err::write(&sc, serde_json::to_string_pretty(&side)? + "\n")?;
    outln!(
        "wrote {} (last {:?}, last4 {:?}) and {} in {secs:.1} s ({:.1} images/s)",
        a.out.display(),
        emb.last.dims(),
        emb.last4.dims(),
        sc.display(),
        files.len() as f64 / secs.max(1e-9)
    )?;
    Ok(0)
}

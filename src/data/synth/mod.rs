//! Deterministic synthetic datasets written as real files in the real layouts, so the whole
//! pipeline (check, load, train, evaluate) can run end to end without downloads.
//!
//! `synth(format, out_dir, seed, params)` writes the dataset root directly into `out_dir`
//! (which must be empty or absent). Every image gets its own ChaCha8 RNG derived from
//! `(seed, format, split, index)`, so the files are byte-identical for a given seed whatever
//! the number of rayon threads. PNGs use the encoder defaults, JPEGs a fixed quality.
//!
//! What each generator makes learnable:
//! * imagefolder: classes differ by shape structure (disk, square, star, ring, stripes of a given
//!   orientation, ...), with random colours, positions, scales, backgrounds and noise.
//! * coco: scenes of 5 shape categories (ids 1, 3, 7, 18, 44), polygon masks, crowd regions
//!   (uncompressed column-major RLE), objects in all three COCO area ranges.
//! * ade20k: street/room-like scenes with 7 ADE classes plus 0 = other, per-class textures.
//! * davis: textured objects moving, scaling and occluding each other over a panning background.
//! * clevr: 3..10 objects on a ground plane seen in perspective; apparent size and image row
//!   follow the depth stored in `pixel_coords[2]`; Count and Dist labels balanced.

mod ade20k;
mod clevr;
mod coco;
mod davis;
mod draw;
mod imagefolder;

use std::path::Path;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use ade20k::{Ade20kParams, USED_LABELS as ADE20K_USED_LABELS};
pub use clevr::ClevrParams;
pub use coco::{CocoParams, SYNTH_CATEGORIES};
pub use davis::DavisParams;
pub use imagefolder::{ImageFolderParams, CLASS_KINDS};

use super::{DataError, DataFormat};

/// Per-format generator parameters. Defaults are sized so a full quickstart on 2 CPU cores
/// stays in minutes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SynthParams {
    /// ImageFolder generator.
    pub imagefolder: ImageFolderParams,
    /// COCO generator.
    pub coco: CocoParams,
    /// ADE20K generator.
    pub ade20k: Ade20kParams,
    /// DAVIS generator.
    pub davis: DavisParams,
    /// CLEVR generator.
    pub clevr: ClevrParams,
}

impl SynthParams {
    /// Very small datasets for tests (well under a second each).
    pub fn tiny() -> Self {
        SynthParams {
            imagefolder: ImageFolderParams {
                classes: 3,
                train_per_class: 4,
                val_per_class: 2,
                size: 32,
                ..Default::default()
            },
            coco: CocoParams {
                train_images: 6,
                val_images: 3,
                ..Default::default()
            },
            ade20k: Ade20kParams {
                train_images: 4,
                val_images: 2,
                size: 32,
                ..Default::default()
            },
            davis: DavisParams {
                train_sequences: 2,
                val_sequences: 2,
                frames: 4,
                height: 32,
                width: 48,
                ..Default::default()
            },
            clevr: ClevrParams {
                train_images: 8,
                val_images: 4,
                ..Default::default()
            },
        }
    }
}

/// Generate a synthetic dataset of `format` into `out_dir` (created; must be empty if it exists).
pub fn synth(
    format: DataFormat,
    out_dir: &Path,
    seed: u64,
    params: &SynthParams,
) -> Result<(), DataError> {
    if out_dir.exists() {
        if !out_dir.is_dir() {
            return Err(DataError::layout(
                out_dir,
                "output path exists and is not a directory",
            ));
        }
        if fs_err::read_dir(out_dir)?.next().is_some() {
            return Err(DataError::layout(out_dir, "output directory is not empty; synthesise into a fresh directory so no stale file changes the dataset"));
        }
    }
    fs_err::create_dir_all(out_dir)?;
    match format {
        DataFormat::ImageFolder => imagefolder::generate(out_dir, seed, &params.imagefolder),
        DataFormat::Coco => coco::generate(out_dir, seed, &params.coco),
        DataFormat::Ade20k => ade20k::generate(out_dir, seed, &params.ade20k),
        DataFormat::Davis => davis::generate(out_dir, seed, &params.davis),
        DataFormat::Clevr => clevr::generate(out_dir, seed, &params.clevr),
    }
}

/// The RNG of one generated item.
pub(crate) fn item_rng(seed: u64, format: DataFormat, split: &str, index: usize) -> ChaCha8Rng {
    let mut h = blake3::Hasher::new();
    h.update(b"cjepa.data.synth.v1\0");
    h.update(format.as_str().as_bytes());
    h.update(b"\0");
    h.update(split.as_bytes());
    h.update(b"\0");
    h.update(&seed.to_le_bytes());
    h.update(&(index as u64).to_le_bytes());
    ChaCha8Rng::from_seed(*h.finalize().as_bytes())
}

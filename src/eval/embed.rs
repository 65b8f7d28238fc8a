//! Pooled encoder features of every image in a folder (`cjepa embed`), with the extraction of
//! the evaluation stages ([`crate::model::pooled`]): the last `min(4, depth)` blocks, each
//! through the encoder's final norm, averaged over all patch tokens, under the eval transform.
//! `last` = the last block `(N, D)`; `last4` = the extracted blocks concatenated, oldest first
//! `(N, L·D)` (L = 4, or the depth when the encoder is shallower).
//!
//! Image folders are searched recursively, so a flat folder of images, an ImageFolder split
//! (`<class>/*.jpg`) and an ImageFolder root (`train/<class>/*`, `val/<class>/*`) all work. The
//! order is by path components relative to the folder, each compared byte-wise, which for an
//! ImageFolder split is torchvision's order (classes sorted, files sorted within a class).
//! Hidden files and folders (name starting with `.`) are skipped.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::data::imagefolder::IMAGE_EXTENSIONS;
use crate::data::loader::{load_batch, Batch, ImageSamples};
use crate::data::Transform;
use crate::error::{Error, Result};
use crate::model::pooled::{extract_layers, pooled, FeatureSet};
use crate::model::VisionTransformer;

/// A loaded batch as a `(B, C, H, W)` tensor on `dev`.
pub fn batch_tensor(b: &Batch, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(&b.images, b.shape.to_vec(), &Device::Cpu)?.to_device(dev)?)
}

/// Encode images (no gradient): `(L, B, D)` on the CPU.
pub fn encode(
    encoder: &VisionTransformer,
    b: &Batch,
    layers: &[i64],
    dev: &Device,
) -> Result<Tensor> {
    let x = batch_tensor(b, dev)?;
    Ok(pooled(encoder, &x, layers)?
        .detach()
        .to_device(&Device::Cpu)?)
}

/// The images under `dir`, in the documented order.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Data(format!(
            "{}: not a folder of images",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    if out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no images (*.{}) found in it or its subfolders",
            dir.display(),
            IMAGE_EXTENSIONS.join(", *.")
        )));
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<(Vec<u8>, PathBuf)> = fs_err::read_dir(dir)?
        .map(|e| e.map(|e| (e.file_name().as_encoded_bytes().to_vec(), e.path())))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for (name, path) in entries {
        if name.first() == Some(&b'.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Pooled features of a set of images.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// `(N, D)`: token mean of the last block through the final norm.
    pub last: Tensor,
    /// `(N, L·D)`: token means of the last `L = min(4, depth)` blocks, concatenated oldest first.
    pub last4: Tensor,
    /// The blocks of `last4` (`-1` = last).
    pub layers: Vec<i64>,
}

/// Encode `files` with `encoder` under `transform`, `batch` images per forward pass (the result
/// does not depend on it); `progress(done, total)` after every batch. Features end on the CPU.
pub fn embed_files(
    encoder: &VisionTransformer,
    files: &[PathBuf],
    transform: &Transform,
    batch: usize,
    dev: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Embeddings> {
    if files.is_empty() {
        return Err(Error::Data("no images to embed".into()));
    }
    let layers = extract_layers(encoder.config().depth);
    let src = ImageSamples {
        samples: files.iter().map(|p| (p.clone(), 0)).collect(),
        transform: transform.clone(),
    };
    let idx: Vec<usize> = (0..files.len()).collect();
    let mut parts = Vec::new();
    let mut done = 0;
    for chunk in idx.chunks(batch.max(1)) {
        let b = load_batch(&src, chunk, 0, 0).map_err(|e| Error::Data(e.to_string()))?;
        parts.push(encode(encoder, &b, &layers, dev)?);
        done += chunk.len();
        progress(done, files.len());
    }
    let all = Tensor::cat(&parts, 1)?;
    Ok(Embeddings {
        last: FeatureSet::Last.select(&all)?,
        last4: FeatureSet::Last4.select(&all)?,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_recursively_in_component_order() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "b/2.png",
            "b/1.JPG",
            "a-b/x.jpeg",
            "a/z.png",
            "top.png",
            ".hid/q.png",
            "a/n.txt",
        ] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"").unwrap();
        }
        let got: Vec<String> = list_images(d.path())
            .unwrap()
            .iter()
            .map(|p| {
                p.strip_prefix(d.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        // "a" < "a-b" as folder names (torchvision class order), although "a-b/" < "a/" as strings.
        assert_eq!(
            got,
            ["a/z.png", "a-b/x.jpeg", "b/1.JPG", "b/2.png", "top.png"]
        );
        let empty = tempfile::tempdir().unwrap();
        assert!(list_images(empty.path()).is_err());
    }
}

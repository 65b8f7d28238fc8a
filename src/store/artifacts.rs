//! Artifact folders: `<store>/artifacts/<key[0..2]>/<key>/`, their manifest and verification.

use std::path::{Path, PathBuf};

use super::record::ArtifactEntry;

/// Folder of a key's artifacts.
pub fn dir(root: &Path, key: &str) -> PathBuf {
    root.join("artifacts")
        .join(&key[..2.min(key.len())])
        .join(key)
}

/// Manifest (relative path, size, blake3) of every file under `dir`, sorted.
pub fn manifest(dir: &Path) -> std::io::Result<Vec<ArtifactEntry>> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(root: &Path, d: &Path, out: &mut Vec<ArtifactEntry>) -> std::io::Result<()> {
    for e in fs_err::read_dir(d)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            walk(root, &p, out)?;
        } else {
            let mut h = blake3::Hasher::new();
            h.update_reader(fs_err::File::open(&p)?)?;
            out.push(ArtifactEntry {
                path: p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned(),
                size: e.metadata()?.len(),
                blake3: h.finalize().to_hex().to_string(),
            });
        }
    }
    Ok(())
}

/// Every recorded artifact present with its recorded size; `Err(why)` otherwise.
pub fn verify(dir: &Path, entries: &[ArtifactEntry]) -> Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("artifact folder {} is missing", dir.display()));
    }
    for a in entries {
        match std::fs::metadata(dir.join(&a.path)) {
            Ok(m) if m.len() == a.size => {}
            Ok(m) => {
                return Err(format!(
                    "artifact {} has {} bytes, recorded {}",
                    a.path,
                    m.len(),
                    a.size
                ))
            }
            Err(_) => return Err(format!("artifact {} is missing", a.path)),
        }
    }
    Ok(())
}

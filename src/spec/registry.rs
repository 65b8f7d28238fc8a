//! Presets from `registry/` (models, datasets, baselines): a `registry/` folder next to the
//! pipeline file (or above it) wins; the copies built into the binary are the fallback.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Registry files compiled into the binary: (relative path, YAML text).
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "models/vit_tiny.yaml",
        include_str!("../../registry/models/vit_tiny.yaml"),
    ),
    (
        "models/vit_small.yaml",
        include_str!("../../registry/models/vit_small.yaml"),
    ),
    (
        "models/vit_base.yaml",
        include_str!("../../registry/models/vit_base.yaml"),
    ),
    (
        "models/vit_large.yaml",
        include_str!("../../registry/models/vit_large.yaml"),
    ),
    (
        "models/vit_huge.yaml",
        include_str!("../../registry/models/vit_huge.yaml"),
    ),
    (
        "datasets/imagenet.yaml",
        include_str!("../../registry/datasets/imagenet.yaml"),
    ),
    (
        "datasets/coco.yaml",
        include_str!("../../registry/datasets/coco.yaml"),
    ),
    (
        "datasets/ade20k.yaml",
        include_str!("../../registry/datasets/ade20k.yaml"),
    ),
    (
        "datasets/davis2017.yaml",
        include_str!("../../registry/datasets/davis2017.yaml"),
    ),
    (
        "datasets/clevr.yaml",
        include_str!("../../registry/datasets/clevr.yaml"),
    ),
    (
        "baselines/cjepa.yaml",
        include_str!("../../registry/baselines/cjepa.yaml"),
    ),
    (
        "baselines/ijepa.yaml",
        include_str!("../../registry/baselines/ijepa.yaml"),
    ),
];

/// Where a preset came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A file on disk.
    File(PathBuf),
    /// The copy built into the binary.
    Embedded(&'static str),
}

/// Find the nearest `registry/` folder at or above `start`.
pub fn find_dir(start: &Path) -> Option<PathBuf> {
    let mut cur = Some(start);
    while let Some(d) = cur {
        let r = d.join("registry");
        if r.is_dir() {
            return Some(r);
        }
        cur = d.parent();
    }
    None
}

/// Load preset `name` from `registry/<group>/<name>.yaml` as JSON.
pub fn load(group: &str, name: &str, start: &Path) -> Result<(Value, Source), String> {
    let rel = format!("{group}/{name}.yaml");
    if let Some(dir) = find_dir(start) {
        let p = dir.join(&rel);
        if p.is_file() {
            let text = fs_err::read_to_string(&p).map_err(|e| e.to_string())?;
            let v: Value =
                serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
            return Ok((v, Source::File(p)));
        }
    }
    for (r, text) in EMBEDDED {
        if *r == rel {
            let v: Value = serde_yaml::from_str(text).map_err(|e| format!("embedded {r}: {e}"))?;
            return Ok((v, Source::Embedded(r)));
        }
    }
    let names = names(group, start);
    let hint = crate::util::suggest::did_you_mean(name, names.iter().map(String::as_str));
    Err(format!(
        "unknown {group} preset `{name}`{hint}; available: {}",
        names.join(", ")
    ))
}

/// Preset names available in a group (disk and embedded).
pub fn names(group: &str, start: &Path) -> Vec<String> {
    let mut v: Vec<String> = EMBEDDED
        .iter()
        .filter_map(|(r, _)| {
            r.strip_prefix(&format!("{group}/"))
                .and_then(|n| n.strip_suffix(".yaml"))
        })
        .map(str::to_string)
        .collect();
    if let Some(dir) = find_dir(start) {
        if let Ok(rd) = std::fs::read_dir(dir.join(group)) {
            for e in rd.flatten() {
                if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_suffix(".yaml")) {
                    v.push(n.to_string());
                }
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_presets_load_and_unknown_names_suggest() {
        let (v, _) = load("models", "vit_tiny", Path::new("/nonexistent")).unwrap();
        assert_eq!(v["embed_dim"], 192);
        let e = load("models", "vit_tinny", Path::new("/nonexistent")).unwrap_err();
        assert!(e.contains("did you mean `vit_tiny`"), "{e}");
    }
}

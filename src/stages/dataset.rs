//! `dataset` stage: records a dataset given by `path` + `format`, fingerprinted by its file list
//! (relative names and sizes, never its location), so moving the data keeps every key.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{params_of, StageContext, StageOutput};
use crate::error::{Error, Result};

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// Where the data comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// An existing folder given by `path`.
    #[default]
    Path,
}

/// Dataset formats.
pub const FORMATS: &[&str] = &["imagefolder", "coco", "ade20k", "davis", "clevr"];

/// Params of a `dataset` stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// `path` (an existing folder).
    #[serde(default)]
    pub source: Source,
    /// One of imagefolder, coco, ade20k, davis, clevr.
    #[serde(default)]
    pub format: String,
    /// Folder of the dataset (relative to the pipeline file). Not hashed; its file list is.
    #[serde(default)]
    pub path: Option<String>,
}

/// Absolute-or-relative dataset folder of resolved params.
pub fn data_path(params: &Value, pipeline_dir: &Path) -> Option<PathBuf> {
    let p = params.get("path")?.as_str()?;
    let p = expand_env(p);
    let pb = PathBuf::from(&p);
    Some(if pb.is_absolute() {
        pb
    } else {
        pipeline_dir.join(pb)
    })
}

/// Expand `${VAR}` and `${VAR:-default}` in a path.
pub fn expand_env(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            out.push_str(&rest[i..]);
            return out;
        };
        let inner = &rest[i + 2..i + j];
        let (name, dflt) = inner.split_once(":-").unwrap_or((inner, ""));
        out.push_str(&std::env::var(name).unwrap_or_else(|_| dflt.to_string()));
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

/// Key inputs: the fingerprint of the file list.
pub fn key_inputs(params: &Value, pipeline_dir: &Path) -> std::result::Result<Value, String> {
    let fmt = params["format"].as_str().unwrap_or("");
    if !FORMATS.contains(&fmt) {
        let hint = crate::spec::suggest::did_you_mean(fmt, FORMATS.iter().copied());
        return Err(format!(
            "`format` must be one of {}{hint} (got `{fmt}`)",
            FORMATS.join(", ")
        ));
    }
    let Some(dir) = data_path(params, pipeline_dir) else {
        return Err("`path` is required: the folder holding the dataset".into());
    };
    if !dir.is_dir() {
        // Planning must work without the data (dry runs); the stage itself fails with the layout.
        return Ok(json!({"fingerprint": "missing"}));
    }
    let (fp, _) = fingerprint(&dir).map_err(|e| e.to_string())?;
    Ok(json!({ "fingerprint": fp }))
}

/// blake3 over the sorted (relative path, size) list; also returns the file count.
pub fn fingerprint(dir: &Path) -> std::io::Result<(String, usize)> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort();
    let mut h = blake3::Hasher::new();
    for (rel, size) in &files {
        h.update(rel.as_bytes());
        h.update(&[0]);
        h.update(&size.to_le_bytes());
    }
    Ok((h.finalize().to_hex().to_string(), files.len()))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> std::io::Result<()> {
    for e in fs_err::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else {
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, e.metadata()?.len()));
        }
    }
    Ok(())
}

/// Expected layout of each format, for the "missing dataset" message.
pub fn layout_hint(format: &str) -> &'static str {
    match format {
        "imagefolder" => "train/<class>/*.{jpg,png} and val/<class>/*.{jpg,png}",
        "coco" => "annotations/instances_{train,val}2017.json and {train,val}2017/*.jpg",
        "ade20k" => "ADEChallengeData2016/{images,annotations}/{training,validation}/",
        "davis" => {
            "JPEGImages/480p/<seq>/, Annotations/480p/<seq>/, ImageSets/2017/{train,val}.txt"
        }
        "clevr" => {
            "CLEVR_v1.0/images/{train,val}/ and CLEVR_v1.0/scenes/CLEVR_{train,val}_scenes.json"
        }
        _ => "see EVALS.md",
    }
}

/// Run: check the folder, report counts and pass the location downstream.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let dir = data_path(&ctx.job.config["params"], &ctx.job.pipeline_dir)
        .ok_or_else(|| Error::stage(&ctx.job.id, "`path` is required"))?;
    if !dir.is_dir() {
        return Err(Error::stage(
            &ctx.job.id,
            format!(
                "dataset folder {} does not exist; a `{}` dataset is expected there with the layout {}",
                dir.display(),
                p.format,
                layout_hint(&p.format)
            ),
        ));
    }
    let (fp, n) = fingerprint(&dir)?;
    ctx.log(format!(
        "dataset {} ({}): {n} files, fingerprint {}",
        dir.display(),
        p.format,
        &fp[..12]
    ));
    let mut out = StageOutput::default();
    out.metrics.insert("files".into(), n as f64);
    out.info = json!({ "path": dir, "format": p.format, "fingerprint": fp });
    Ok(out)
}

//! Read, override and validate a pipeline file. Every error names the file, the position, the
//! stage and the fix.

use std::path::{Path, PathBuf};

use petgraph::graph::DiGraph;
use serde_json::Value;

use super::locate::locate;
use super::overrides::{self, Override};
use super::suggest::{did_you_mean, unknown_field};
use super::types::PipelineFile;
use crate::error::{Error, Pos, Result};
use crate::stages::StageKind;

/// Options that change how a file is read.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--set a.b.c=value` overrides, in order.
    pub sets: Vec<String>,
}

/// A loaded, validated pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file as given.
    pub file: PathBuf,
    /// Its directory (registry lookup, relative paths).
    pub dir: PathBuf,
    /// The text (for positions in later errors).
    pub text: String,
    /// Parsed content (overrides applied).
    pub spec: PipelineFile,
    /// Pipeline name.
    pub name: String,
    /// Store directory.
    pub store_dir: PathBuf,
}

impl Pipeline {
    /// A config error positioned at `path` (e.g. `["stages", "x", "kind"]`).
    pub fn err_at(&self, path: &[&str], msg: impl Into<String>) -> Error {
        Error::config(&self.file, locate(&self.text, path), msg)
    }
}

/// Load and validate `file`.
pub fn load_pipeline(file: &Path, opts: &LoadOptions) -> Result<Pipeline> {
    let text = fs_err::read_to_string(file)
        .map_err(|e| Error::config(file, None, format!("cannot read the pipeline file: {e}")))?;
    parse_pipeline(file, text, opts)
}

/// Parse and validate pipeline `text` that came from `file`.
pub fn parse_pipeline(file: &Path, text: String, opts: &LoadOptions) -> Result<Pipeline> {
    if text.trim().is_empty() {
        return Err(Error::config(
            file,
            None,
            "the pipeline file is empty; it needs a `stages:` mapping (see `cjepa schema`)",
        ));
    }
    let mut spec: PipelineFile =
        serde_yaml::from_str(&text).map_err(|e| yaml_error(file, &text, &e))?;
    if !opts.sets.is_empty() {
        let sets: Vec<Override> = opts
            .sets
            .iter()
            .map(|s| overrides::parse(s))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::Usage)?;
        let mut doc: Value = serde_json::to_value(&spec)?;
        overrides::apply(&mut doc, &sets).map_err(Error::Usage)?;
        spec = serde_json::from_value(doc).map_err(|e| {
            let msg = unknown_field(&e.to_string())
                .map(|(_, m)| m)
                .unwrap_or_else(|| e.to_string());
            Error::Usage(format!("after --set overrides: {msg}"))
        })?;
    }
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let name = spec.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into())
    });
    let store_dir = dir.join(spec.store.as_deref().unwrap_or(".cjepa"));
    let p = Pipeline {
        file: file.to_path_buf(),
        dir,
        text,
        spec,
        name,
        store_dir,
    };
    validate(&p)?;
    Ok(p)
}

fn yaml_error(file: &Path, text: &str, e: &serde_yaml::Error) -> Error {
    let pos = e.location().map(|l| Pos {
        line: l.line(),
        column: l.column(),
    });
    let raw = e.to_string();
    let raw = match raw.find(" at line ") {
        Some(i) => raw[..i].to_string(),
        None => raw,
    };
    let msg = if let Some((field, m)) = unknown_field(&raw) {
        let ctx = raw
            .split(": unknown field")
            .next()
            .filter(|c| !c.contains("unknown field"))
            .unwrap_or("");
        let pos = pos.or_else(|| locate(text, &[field.as_str()]));
        let where_ = if ctx.is_empty() {
            String::new()
        } else {
            format!(" in `{ctx}`")
        };
        return Error::config(file, pos, format!("{m}{where_}"));
    } else if raw.contains("missing field") {
        format!("{raw} (see `cjepa schema` for the file format)")
    } else {
        raw
    };
    Error::config(file, pos, msg)
}

fn validate(p: &Pipeline) -> Result<()> {
    let stages = &p.spec.stages;
    if stages.is_empty() {
        return Err(p.err_at(
            &["stages"],
            "the pipeline has no stages; add at least one under `stages:`",
        ));
    }
    let ids: Vec<&str> = stages.keys().map(String::as_str).collect();
    for (id, s) in stages {
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(p.err_at(
                &["stages", id],
                format!("stage id `{id}` may use only letters, digits, `_` and `-`"),
            ));
        }
        if StageKind::parse(&s.kind).is_none() {
            let hint = did_you_mean(&s.kind, StageKind::names().iter().copied());
            return Err(p.err_at(
                &["stages", id, "kind"],
                format!(
                    "stage `{id}`: unknown kind `{}`{hint}; known kinds: {}",
                    s.kind,
                    StageKind::names().join(", ")
                ),
            ));
        }
        for n in &s.needs {
            if n == id {
                return Err(p.err_at(
                    &["stages", id, "needs"],
                    format!("stage `{id}` needs itself (cycle: {id} -> {id})"),
                ));
            }
            if !stages.contains_key(n) {
                let hint = did_you_mean(n, ids.iter().copied());
                return Err(p.err_at(
                    &["stages", id, "needs"],
                    format!("stage `{id}` needs `{n}`, which is not a stage in this file{hint}"),
                ));
            }
        }
        for (k, vals) in &s.matrix {
            if vals.is_empty() {
                return Err(p.err_at(
                    &["stages", id, "matrix", k],
                    format!("stage `{id}`: matrix `{k}` has no values"),
                ));
            }
        }
        if let Err(m) = s.merged_params() {
            return Err(p.err_at(&["stages", id], format!("stage `{id}`: {m}")));
        }
    }
    if let Some(cycle) = find_cycle(p) {
        let first = cycle[0].clone();
        return Err(p.err_at(
            &["stages", &first, "needs"],
            format!(
                "the stages form a cycle: {} -> {first}; remove one of these `needs`",
                cycle.join(" -> ")
            ),
        ));
    }
    Ok(())
}

/// The stage ids on one cycle of `needs`, in order, or `None`.
fn find_cycle(p: &Pipeline) -> Option<Vec<String>> {
    let stages = &p.spec.stages;
    let mut g = DiGraph::<&str, ()>::new();
    let idx: Vec<_> = stages.keys().map(|k| g.add_node(k.as_str())).collect();
    for (i, s) in stages.values().enumerate() {
        for n in &s.needs {
            let j = stages.get_index_of(n).expect("validated");
            g.add_edge(idx[i], idx[j], ());
        }
    }
    let scc = petgraph::algo::tarjan_scc(&g)
        .into_iter()
        .find(|c| c.len() > 1)?;
    // walk the cycle from the member that comes first in the file
    let start = *scc.iter().min_by_key(|n| n.index())?;
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let next = g
            .neighbors(cur)
            .filter(|n| scc.contains(n))
            .min_by_key(|n| n.index())?;
        if next == start || path.contains(&next) {
            break;
        }
        path.push(next);
        cur = next;
    }
    // path follows "needs" edges; print in dependency order (upstream first) reversed for reading
    Some(path.into_iter().map(|n| g[n].to_string()).collect())
}

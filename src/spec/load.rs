//! Read, override and validate a pipeline file. Every error names the file, the position, the
//! stage and the fix.

use std::path::{Path, PathBuf};

use petgraph::graph::DiGraph;
use serde_json::Value;

use super::locate::locate;
use super::overrides::{self, Override};
use super::types::PipelineFile;
use crate::error::{Error, Pos, Result};
use crate::kind::StageKind;
use crate::util::suggest::{did_you_mean, unknown_field};

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
    check_duplicate_stages(file, &text)?;
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

/// `stages:` read key by key: a stage id given twice is an error (the map type would keep only
/// the last one).
#[derive(serde::Deserialize)]
struct StageIds {
    #[serde(default)]
    #[allow(dead_code)]
    stages: UniqueKeys,
}

#[derive(Default)]
struct UniqueKeys;

const DUPLICATE_STAGE: &str = "duplicate stage id ";

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of stage ids")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(k) = m.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("{DUPLICATE_STAGE}{k}")));
                    }
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(V)
    }
}

/// A stage id given twice under `stages:` names both lines (serde_yaml would keep the last).
fn check_duplicate_stages(file: &Path, text: &str) -> Result<()> {
    let e = match serde_yaml::from_str::<StageIds>(text) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let raw = e.to_string();
    let Some(i) = raw.find(DUPLICATE_STAGE) else {
        // anything else was reported by the full parse
        return Ok(());
    };
    let id = raw[i + DUPLICATE_STAGE.len()..]
        .split(" at line ")
        .next()
        .unwrap_or("")
        .to_string();
    let lines = stage_key_lines(text, &id);
    let pos = match lines.as_slice() {
        [_, second, ..] => Some(*second),
        _ => locate(text, &["stages", &id]),
    };
    let where_ = match lines.as_slice() {
        [first, second, ..] => format!(" (lines {} and {})", first.line, second.line),
        _ => String::new(),
    };
    Err(Error::config(
        file,
        pos,
        format!(
            "duplicate stage id `{id}`{where_}: each id under `stages:` may appear once \
             (the later stage would silently replace the earlier one); rename or remove one of them"
        ),
    ))
}

/// Positions of the block-style keys `id:` directly under the top-level `stages:`.
fn stage_key_lines(text: &str, id: &str) -> Vec<Pos> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut child_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = line.len() - t.len();
        if indent == 0 {
            inside = t.starts_with("stages:") && t["stages:".len()..].trim().is_empty();
            child_indent = None;
            continue;
        }
        if !inside {
            continue;
        }
        let ci = *child_indent.get_or_insert(indent);
        if indent != ci {
            continue;
        }
        let is_key = [id.to_string(), format!("\"{id}\""), format!("'{id}'")]
            .iter()
            .any(|k| {
                t.strip_prefix(k.as_str())
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
        if is_key {
            out.push(Pos {
                line: i + 1,
                column: indent + 1,
            });
        }
    }
    out
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
            if k == crate::spec::matrix::SEED_KEY {
                if let Some(v) = vals.iter().find(|v| !v.is_u64()) {
                    return Err(p.err_at(
                        &["stages", id, "matrix", k],
                        format!(
                            "stage `{id}`: matrix seed `{}` is not a non-negative integer; \
                             write e.g. `matrix: {{ seed: [0, 1, 2] }}`",
                            crate::util::canon::display_value(v)
                        ),
                    ));
                }
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

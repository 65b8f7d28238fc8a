//! The plan: matrix instances resolved into full configs, keyed, in a petgraph DAG.
//! Pure: no store access, no running.

pub mod cost;
pub mod graph_fmt;
pub mod key;
pub mod select;

use std::collections::BTreeMap;

use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::kind::{Kind, KindTable, PlanIssue, PlanView, StageKind, UpstreamView};
use crate::model::error::ModelError;
use crate::model::VitConfig;
use crate::spec::matrix::{apply_own, expand, instance_seed};
use crate::spec::types::ModelRef;
use crate::spec::{registry, Instance, Pipeline, Resources};

/// One planned stage instance.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    /// Matrix instance (id, stage, coordinates, upstream indices).
    pub inst: Instance,
    /// Kind.
    pub kind: StageKind,
    /// Resolved config: `{params, model?, seed}` with every default filled in.
    pub config: Value,
    /// The JSON that is hashed into `key`.
    pub key_input: Value,
    /// Stage key (blake3 hex).
    pub key: String,
    /// Retries on failure.
    pub retries: u32,
    /// Resources.
    pub resources: Resources,
}

/// A whole plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Instances, upstream first.
    pub stages: Vec<PlannedStage>,
    /// Edges upstream -> downstream (node index = stage index).
    pub graph: DiGraph<usize, ()>,
    /// The kinds' implementations the plan was built with.
    pub kinds: KindTable,
    /// Deprecations met while planning (`file:line:col: ...`), for the CLI to print.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Stage `i` as its kind's hooks see it.
    pub fn view(&self, i: usize) -> PlanView<'_> {
        let s = &self.stages[i];
        let upstream: Vec<usize> = s.inst.upstream.iter().map(|(_, ui)| *ui).collect();
        view_of(
            &s.inst.id,
            &s.config["params"],
            s.config.get("model").and_then(Value::as_object),
            &s.resources,
            &upstream,
            &self.stages,
            &self.pipeline.dir,
            self.kinds,
        )
    }

    /// The kinds of the stages `selected` (e.g. [`select::only`]) check this process's
    /// environment (data folders, settings) before a run starts; the error names the stage, the
    /// field and the fix.
    pub fn check_environment(&self, selected: &std::collections::BTreeSet<usize>) -> Result<()> {
        for &i in selected {
            let s = &self.stages[i];
            (self.kinds)(s.kind)
                .check_environment(&self.view(i))
                .map_err(|issue| issue_error(&self.pipeline, &s.inst, issue))?;
        }
        Ok(())
    }

    /// Index of an instance id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.inst.id == id)
    }

    /// Indices of the direct dependents of `i`.
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        self.graph
            .neighbors(NodeIndex::new(i))
            .map(|n| n.index())
            .collect()
    }
}

/// Build the plan of a loaded pipeline with the kinds' implementations `kinds`
/// (`cjepa::stages::table`): every stage resolved, checked by its kind and keyed.
pub fn build(p: &Pipeline, kinds: KindTable) -> Result<Plan> {
    let insts = expand(p)?;
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(insts.len());
    let mut model_cache: BTreeMap<String, Value> = BTreeMap::new();
    let mut warnings: Vec<String> = Vec::new();
    for inst in insts {
        let spec = &p.spec.stages[&inst.stage];
        let kind = StageKind::parse(&spec.kind).expect("validated");
        let hooks = kinds(kind);
        let at = |field: &str| {
            vec!["stages", inst.stage.as_str(), field]
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let err = |field: &str, msg: String| {
            let path = at(field);
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            p.err_at(&refs, format!("stage `{}`: {msg}", inst.id))
        };
        let mut params = spec.merged_params().map_err(|m| err("params", m))?;
        let mut model = match &spec.model {
            None => None,
            Some(m) => Some(resolve_model(p, m, &mut model_cache).map_err(|m| err("model", m))?),
        };
        let mut model_map = model.take().unwrap_or_default();
        apply_own(&inst.own, &mut params, &mut model_map);
        let has_model = spec.model.is_some() || !model_map.is_empty();
        if has_model && !kind.takes_model() {
            return Err(err(
                "model",
                format!("kind `{}` takes no `model:`", kind.name()),
            ));
        }
        for r in hooks.renamed_params() {
            let Some(v) = params.remove(r.old) else {
                continue;
            };
            if params.contains_key(r.new) {
                return Err(err(
                    "params",
                    format!(
                        "`params.{}` and `params.{}` are the same param; keep `{}`",
                        r.old, r.new, r.new
                    ),
                ));
            }
            params.insert(r.new.to_string(), v);
            let path = at("params");
            let mut refs: Vec<&str> = path.iter().map(String::as_str).collect();
            refs.push(r.old);
            let note = p
                .err_at(
                    &refs,
                    format!(
                        "stage `{}`: `params.{}` is deprecated; write `{}` (same meaning, same key)",
                        inst.id, r.old, r.new
                    ),
                )
                .to_string();
            if !warnings.contains(&note) {
                warnings.push(note);
            }
        }
        let resolved = hooks
            .resolve_params(&params)
            .map_err(|m| err("params", m))?;
        if has_model {
            check_model(hooks, &model_map, &resolved).map_err(|(field, m)| {
                let path = at("model");
                let mut refs: Vec<&str> = path.iter().map(String::as_str).collect();
                refs.push(field);
                p.err_at(&refs, format!("stage `{}`: {m}", inst.id))
            })?;
        }
        let upstream: Vec<usize> = inst.upstream.iter().map(|(_, ui)| *ui).collect();
        let view = view_of(
            &inst.id,
            &resolved,
            has_model.then_some(&model_map),
            &spec.resources,
            &upstream,
            &stages,
            &p.dir,
            kinds,
        );
        hooks
            .check_plan(&view)
            .map_err(|issue| issue_error(p, &inst, issue))?;
        let extra = hooks
            .key_inputs(&resolved, &p.dir)
            .map_err(|m| err("params", m))?;
        let seed = instance_seed(&inst, p.spec.defaults.seed);
        let mut config = json!({ "params": resolved, "seed": seed });
        if has_model {
            config["model"] = Value::Object(model_map);
        }
        // precision matters to the kinds that run a network (not to datasets or commands, whose
        // keys a `defaults: { precision: bf16 }` must not change)
        let precision = spec.precision.unwrap_or(p.spec.defaults.precision);
        if precision != crate::spec::types::Precision::F32 && kind.takes_model() {
            config["precision"] = json!(precision.name());
        }
        let upstream: BTreeMap<String, String> = inst
            .upstream
            .iter()
            .map(|(name, ui)| (name.clone(), stages[*ui].key.clone()))
            .collect();
        let key_input = key::key_input(kind, hooks, &config, &upstream, &extra);
        let key = key::hash(&key_input);
        stages.push(PlannedStage {
            retries: spec.retries.unwrap_or(p.spec.defaults.retries),
            resources: spec.resources.clone(),
            inst,
            kind,
            config,
            key_input,
            key,
        });
    }
    let mut graph = DiGraph::new();
    for i in 0..stages.len() {
        graph.add_node(i);
    }
    for (i, s) in stages.iter().enumerate() {
        for (_, u) in &s.inst.upstream {
            graph.add_edge(NodeIndex::new(*u), NodeIndex::new(i), ());
        }
    }
    petgraph::algo::toposort(&graph, None)
        .map_err(|_| Error::Usage("internal: plan has a cycle".into()))?;
    Ok(Plan {
        pipeline: p.clone(),
        stages,
        graph,
        kinds,
        warnings,
    })
}

/// A stage as its kind's hooks see it (its upstream stages already planned).
#[allow(clippy::too_many_arguments)]
fn view_of<'a>(
    id: &'a str,
    params: &'a Value,
    model: Option<&'a Map<String, Value>>,
    resources: &Resources,
    upstream: &[usize],
    stages: &'a [PlannedStage],
    dir: &'a std::path::Path,
    kinds: KindTable,
) -> PlanView<'a> {
    PlanView {
        id,
        params,
        model,
        world: resources.world(resources.gpus as usize),
        world_field: if resources.ranks > 0 {
            "resources.ranks"
        } else {
            "resources.gpus"
        },
        upstream: upstream
            .iter()
            .map(|ui| UpstreamView {
                id: &stages[*ui].inst.id,
                kind: stages[*ui].kind,
                config: &stages[*ui].config,
            })
            .collect(),
        pipeline_dir: dir,
        kinds,
    }
}

/// A kind's plan issue as an error at the field's line in the pipeline file.
fn issue_error(p: &Pipeline, inst: &crate::spec::Instance, issue: PlanIssue) -> Error {
    let stage = ["stages", inst.stage.as_str()];
    let mut path: Vec<&str> = stage.to_vec();
    path.extend(issue.field.iter().map(String::as_str));
    // a field written on the stage itself as the shorthand of `params.<field>` (`checkpoint:`,
    // a dataset's `path:`, `format:`, `source:`) is where the error points
    if let ["params", f] = &path[2..] {
        let written = |at: &[&str]| crate::spec::locate::locate_exact(&p.text, at).is_some();
        let top = [stage[0], stage[1], *f];
        if !written(&path) && written(&top) {
            path = top.to_vec();
        }
    }
    p.err_at(&path, format!("stage `{}`: {}", inst.id, issue.msg))
}

/// The stage's resolved `model:` checked as a ViT (with a pretrain stage's `img` / `patch`
/// applied), so that a shape that cannot work fails when planning, not when the stage starts.
/// A mapping that is not a complete ViT config is left to the stage (it may come with a
/// checkpoint's `model.json`). The error names the model field and the fix.
fn check_model(
    hooks: &dyn Kind,
    model: &Map<String, Value>,
    params: &Value,
) -> std::result::Result<(), (&'static str, String)> {
    let Ok(raw) = serde_json::from_value::<VitConfig>(Value::Object(model.clone())) else {
        return Ok(());
    };
    let Some(cfg) = hooks.planned_model(model, params) else {
        return Ok(());
    };
    let applied = if (cfg.img_size, cfg.patch_size) != (raw.img_size, raw.patch_size) {
        " (with `params.img` / `params.patch` applied)"
    } else {
        ""
    };
    let Err(ModelError::Config { field, msg }) = cfg.validate() else {
        return Ok(());
    };
    let fix = match field {
        "img_size" => {
            let p = cfg.patch_size.max(1);
            let near = (cfg.img_size / p).max(1) * p;
            format!("set `img_size` to a multiple of `patch_size` (e.g. {near}) or change `patch_size`")
        }
        "embed_dim" => "make `embed_dim` a multiple of 4 divisible by `num_heads`, or change `num_heads`".into(),
        "pred_embed_dim" => "make `pred_embed_dim` a multiple of 4 divisible by `pred_num_heads`, or change `pred_num_heads`".into(),
        f => format!("fix `model.{f}`"),
    };
    Err((
        field,
        format!("model field `{field}`{applied}: {msg}; {fix}"),
    ))
}

fn resolve_model(
    p: &Pipeline,
    m: &ModelRef,
    cache: &mut BTreeMap<String, Value>,
) -> std::result::Result<Map<String, Value>, String> {
    let (name, inline) = match m {
        ModelRef::Preset(n) => (Some(n.clone()), Map::new()),
        ModelRef::Inline(map) => {
            let mut map = map.clone();
            let n = map
                .remove("preset")
                .and_then(|v| v.as_str().map(str::to_string));
            (n, map)
        }
    };
    let has_preset = name.is_some();
    let mut base = match name {
        Some(n) => {
            if !cache.contains_key(&n) {
                let (v, _) = registry::load("models", &n, &p.dir)?;
                cache.insert(n.clone(), v);
            }
            cache[&n]
                .as_object()
                .cloned()
                .ok_or_else(|| format!("preset `{n}` is not a mapping"))?
        }
        None => Map::new(),
    };
    for (k, v) in inline {
        if has_preset && !base.contains_key(&k) {
            let hint = crate::util::suggest::did_you_mean(&k, base.keys().map(String::as_str));
            return Err(format!("unknown model field `{k}`{hint}"));
        }
        base.insert(k, v);
    }
    Ok(base)
}

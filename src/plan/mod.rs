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
use crate::model::error::ModelError;
use crate::model::VitConfig;
use crate::spec::matrix::{apply_own, expand};
use crate::spec::types::ModelRef;
use crate::spec::{registry, Instance, Pipeline, Resources};
use crate::stages::StageKind;

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
}

impl Plan {
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

/// Build the plan of a loaded pipeline.
pub fn build(p: &Pipeline) -> Result<Plan> {
    let insts = expand(p)?;
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(insts.len());
    let mut model_cache: BTreeMap<String, Value> = BTreeMap::new();
    for inst in insts {
        let spec = &p.spec.stages[&inst.stage];
        let kind = StageKind::parse(&spec.kind).expect("validated");
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
        let resolved = kind.resolve_params(&params).map_err(|m| err("params", m))?;
        if has_model {
            check_model(kind, &model_map, &resolved).map_err(|(field, m)| {
                let path = at("model");
                let mut refs: Vec<&str> = path.iter().map(String::as_str).collect();
                refs.push(field);
                p.err_at(&refs, format!("stage `{}`: {m}", inst.id))
            })?;
        }
        if let Some(c) = resolved.get("checkpoint").and_then(Value::as_str) {
            let produced_upstream = inst
                .upstream
                .iter()
                .any(|(_, ui)| stages[*ui].kind == StageKind::Command);
            if !produced_upstream {
                check_checkpoint_path(c, &p.dir).map_err(|m| {
                    let own = if spec.checkpoint.is_some() {
                        vec!["stages", inst.stage.as_str(), "checkpoint"]
                    } else {
                        vec!["stages", inst.stage.as_str(), "params", "checkpoint"]
                    };
                    p.err_at(&own, format!("stage `{}`: {m}", inst.id))
                })?;
            }
        }
        if kind == StageKind::DavisVos {
            let patch = plan_patch_size(&model_map, &resolved, &inst, &stages);
            let dp: crate::stages::davis::Params = serde_json::from_value(resolved.clone())
                .map_err(|e| err("params", e.to_string()))?;
            crate::stages::davis::check_params(&dp, patch).map_err(|(field, m)| {
                let path = at("params");
                let mut refs: Vec<&str> = path.iter().map(String::as_str).collect();
                refs.push(field);
                p.err_at(&refs, format!("stage `{}`: {m}", inst.id))
            })?;
        }
        crate::stages::parallel::check_plan(kind, &resolved, &spec.resources)
            .map_err(|m| err("resources", m))?;
        if let Some(k) = resolved.get("at_epoch").and_then(Value::as_u64) {
            let ups: Vec<(&str, &str, &Value)> = inst
                .upstream
                .iter()
                .map(|(_, ui)| {
                    let u = &stages[*ui];
                    (u.inst.id.as_str(), u.kind.name(), &u.config["params"])
                })
                .collect();
            crate::stages::backbone::check_upstream_snapshot(k, &ups)
                .map_err(|m| err("params", m))?;
        }
        let extra = kind
            .key_inputs(&resolved, &p.dir)
            .map_err(|m| err("params", m))?;
        let seed = p.spec.defaults.seed;
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
        let key_input = key::key_input(kind, &config, &upstream, &extra);
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
    })
}

/// The stage's resolved `model:` checked as a ViT (with a pretrain stage's `img` / `patch`
/// applied), so that a shape that cannot work fails when planning, not when the stage starts.
/// A mapping that is not a complete ViT config is left to the stage (it may come with a
/// checkpoint's `model.json`). The error names the model field and the fix.
fn check_model(
    kind: StageKind,
    model: &Map<String, Value>,
    params: &Value,
) -> std::result::Result<(), (&'static str, String)> {
    let Ok(mut cfg) = serde_json::from_value::<VitConfig>(Value::Object(model.clone())) else {
        return Ok(());
    };
    let mut applied = "";
    if kind == StageKind::Pretrain {
        if let Some(i) = params.get("img").and_then(Value::as_u64) {
            cfg.img_size = i as usize;
            applied = " (with `params.img` / `params.patch` applied)";
        }
        if let Some(s) = params.get("patch").and_then(Value::as_u64) {
            cfg.patch_size = s as usize;
            applied = " (with `params.img` / `params.patch` applied)";
        }
    }
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

/// The patch size an evaluation stage will run with, when planning can tell: the stage's own
/// complete `model:` (for `random` or a path), else an upstream `pretrain` stage's model (with its
/// `params.patch` applied) for `upstream` / `random`.
fn plan_patch_size(
    model: &Map<String, Value>,
    params: &Value,
    inst: &crate::spec::Instance,
    stages: &[PlannedStage],
) -> Option<usize> {
    let checkpoint = params
        .get("checkpoint")
        .and_then(Value::as_str)
        .unwrap_or("upstream");
    let upstream_ok = matches!(checkpoint, "" | "upstream" | "random");
    if checkpoint != "upstream" && checkpoint != "" {
        if let Ok(c) = serde_json::from_value::<VitConfig>(Value::Object(model.clone())) {
            return Some(c.patch_size);
        }
    }
    if !upstream_ok {
        return None;
    }
    inst.upstream.iter().find_map(|(_, ui)| {
        let u = &stages[*ui];
        if u.kind != StageKind::Pretrain {
            return None;
        }
        let c: VitConfig = serde_json::from_value(u.config.get("model")?.clone()).ok()?;
        Some(
            u.config["params"]
                .get("patch")
                .and_then(Value::as_u64)
                .map_or(c.patch_size, |p| p as usize),
        )
    })
}

/// A `checkpoint:` path (not `upstream` / `random`) must exist when planning, unless an upstream
/// `command` stage may write it; relative paths are read from the pipeline file's folder, as
/// the stage reads them.
fn check_checkpoint_path(c: &str, dir: &std::path::Path) -> std::result::Result<(), String> {
    match crate::stages::backbone::CheckpointRef::parse(c, dir) {
        crate::stages::backbone::CheckpointRef::Path(path) if !path.exists() => Err(format!(
            "`checkpoint` {} does not exist (relative paths are read from the pipeline \
             file's folder); fix the path, import official weights with `cjepa checkpoint import`, \
             or use `checkpoint: upstream` (with a pretrain / finetune stage in `needs`) or \
             `checkpoint: random`",
            path.display()
        )),
        _ => Ok(()),
    }
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
            let hint = crate::spec::suggest::did_you_mean(&k, base.keys().map(String::as_str));
            return Err(format!("unknown model field `{k}`{hint}"));
        }
        base.insert(k, v);
    }
    Ok(base)
}

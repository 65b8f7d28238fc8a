//! Stored runs in the paper's terms: which records a report covers (every seed of the current
//! configuration), and for an evaluation record the pretraining behind it (method, backbone,
//! epochs), found through the upstream chain `key_input.upstream` (stage name -> key).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use super::baselines::{arch_label, Method};
use crate::kind::report_facts::{PretrainFacts, ReportFacts};
use crate::kind::StageKind;
use crate::model::VitConfig;
use crate::plan::Plan;
use crate::store::{Record, Status};
use crate::util::canon;

/// The loss weights of the paper (METHOD.md §4); a pretraining run that differs from them says so
/// in its row label.
pub const PAPER_WEIGHTS: [(&str, f64); 4] = [
    ("b_vic", 0.001),
    ("b_sim", 25.0),
    ("b_std", 25.0),
    ("b_cov", 1.0),
];

/// Seed-free identity of a key input: the key input without `seed`, with each upstream key
/// replaced by the upstream's own seed-free identity. Runs that differ only in their seed share it.
pub fn identity_of(
    key_input: &Value,
    upstream_identity: &dyn Fn(&str) -> Option<String>,
) -> String {
    let mut v = key_input.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("seed");
        if let Some(Value::Object(up)) = m.get_mut("upstream") {
            for (_, k) in up.iter_mut() {
                if let Some(s) = k.as_str() {
                    if let Some(id) = upstream_identity(s) {
                        *k = Value::String(id);
                    }
                }
            }
        }
    }
    canon::hash(&v)
}

/// Seed-free identity of every record, by key. An upstream record that is not stored keeps its key.
pub fn identities(records: &BTreeMap<String, Record>) -> BTreeMap<String, String> {
    fn go(
        key: &str,
        recs: &BTreeMap<String, Record>,
        memo: &mut BTreeMap<String, String>,
    ) -> Option<String> {
        if let Some(id) = memo.get(key) {
            return Some(id.clone());
        }
        let r = recs.get(key)?;
        let mut up: BTreeMap<String, String> = BTreeMap::new();
        if let Some(m) = r.key_input["upstream"].as_object() {
            for k in m.values().filter_map(Value::as_str) {
                if let Some(id) = go(k, recs, memo) {
                    up.insert(k.to_string(), id);
                }
            }
        }
        let id = identity_of(&r.key_input, &|k| up.get(k).cloned());
        memo.insert(key.to_string(), id.clone());
        Some(id)
    }
    let mut memo = BTreeMap::new();
    for k in records.keys() {
        go(k, records, &mut memo);
    }
    memo
}

/// Seed-free identities of every stage of a plan.
pub fn plan_identities(plan: &Plan) -> BTreeSet<String> {
    let mut by_key: BTreeMap<String, String> = BTreeMap::new();
    for s in &plan.stages {
        let id = identity_of(&s.key_input, &|k| by_key.get(k).cloned());
        by_key.insert(s.key.clone(), id);
    }
    by_key.into_values().collect()
}

/// The records a report covers: succeeded records whose identity is in `wanted` (with a plan:
/// its stages' identities; so every seed of the current configuration, and nothing stale).
/// Without `wanted`: the newest record of each (pipeline, stage instance), with its other seeds.
pub fn select(all: Vec<Record>, wanted: Option<&BTreeSet<String>>) -> Vec<Record> {
    let ok: BTreeMap<String, Record> = all
        .into_iter()
        .filter(|r| r.status == Status::Succeeded)
        .map(|r| (r.key.clone(), r))
        .collect();
    let ids = identities(&ok);
    let wanted: BTreeSet<String> = match wanted {
        Some(w) => w.clone(),
        None => {
            let mut newest: BTreeMap<(&str, &str), &Record> = BTreeMap::new();
            for r in ok.values() {
                let k = (r.pipeline.as_str(), r.stage_id.as_str());
                if newest.get(&k).is_none_or(|o| o.finished < r.finished) {
                    newest.insert(k, r);
                }
            }
            newest
                .values()
                .filter_map(|r| ids.get(&r.key).cloned())
                .collect()
        }
    };
    ok.into_values()
        .filter(|r| ids.get(&r.key).is_some_and(|id| wanted.contains(id)))
        .collect()
}

/// The pretraining behind a record, in the paper's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// Paper method, when the run is one of the paper's four (paper loss weights).
    pub method: Option<Method>,
    /// Row label: the method plus every loss weight that differs from the paper's.
    pub method_label: String,
    /// Architecture id: a preset name (`vit_base`), with `@<img>` when not at 224 px.
    pub arch: String,
    /// Architecture label (`ViT-B/16`).
    pub arch_label: String,
    /// Pretraining epochs the evaluated weights have seen (`None` without a pretraining stage):
    /// the run's length, or `at_epoch` for an evaluation of one of its snapshots.
    pub epochs: Option<u64>,
    /// The run's length when the weights are its snapshot of epoch `epochs` (`at_epoch`); such a
    /// point belongs to that run's convergence line, not to a run of `epochs` epochs.
    pub snapshot_of: Option<u64>,
    /// The pretraining run saves snapshots (`snapshot_epochs`): its evaluations, final and
    /// intermediate, form one convergence line.
    pub with_snapshots: bool,
    /// Key of the pretraining record.
    pub pretrain_key: Option<String>,
}

/// What the report reads from a record's params, read by the record's kind
/// ([`crate::kind::Kind::report_facts`]).
pub fn facts(r: &Record) -> ReportFacts {
    let params = r.config.get("params").unwrap_or(&Value::Null);
    match StageKind::parse(&r.kind) {
        Some(k) => crate::stages::table(k).report_facts(params),
        None => ReportFacts::common(params),
    }
}

/// A record's nearest upstream record of `kind` (breadth first through `key_input.upstream`).
pub fn upstream_of_kind<'a>(
    r: &'a Record,
    kind: &str,
    by_key: &'a BTreeMap<String, Record>,
) -> Option<&'a Record> {
    let mut q: VecDeque<&Record> = VecDeque::from([r]);
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    while let Some(cur) = q.pop_front() {
        let ups = cur.key_input["upstream"].as_object();
        for k in ups.into_iter().flatten().filter_map(|(_, v)| v.as_str()) {
            if !seen.insert(k) {
                continue;
            }
            if let Some(u) = by_key.get(k) {
                if u.kind == kind {
                    return Some(u);
                }
                q.push_back(u);
            }
        }
    }
    None
}

/// The report's name of ImageNet-1K, the data set of the paper's image-classification columns.
pub const IMAGENET_LABEL: &str = "IN-1K";

/// The report's name of the data set behind a record (its nearest upstream `dataset` record):
/// `IN-1K` for ImageNet-1K, the preset name for another data set of `registry/datasets/`
/// (recognised by its folder name among the presets built into the binary), else the dataset
/// stage's id; generated data is `<stage id> (synthetic)`. `None` when no upstream dataset record
/// is among `by_key`.
pub fn dataset_label(r: &Record, by_key: &BTreeMap<String, Record>) -> Option<String> {
    let d = upstream_of_kind(r, "dataset", by_key)?;
    let src = facts(d).dataset.unwrap_or_default();
    if src.synth {
        return Some(format!("{} (synthetic)", d.stage_id));
    }
    let preset = match (&src.path, &src.format) {
        (Some(path), Some(format)) => crate::spec::datasets::recognise_embedded(path, format),
        _ => None,
    };
    Some(match preset {
        Some(preset) if preset.name == "imagenet" => IMAGENET_LABEL.to_string(),
        Some(preset) => preset.name,
        None => d.stage_id.clone(),
    })
}

/// Whether the nearest upstream dataset of a record is synthetic.
pub fn on_synth_data(r: &Record, by_key: &BTreeMap<String, Record>) -> bool {
    upstream_of_kind(r, "dataset", by_key)
        .is_some_and(|d| facts(d).dataset.is_some_and(|s| s.synth))
}

/// Method and label of a pretraining run (its `method`, `vic_terms` and `b_*` weights; a
/// weight not written is the paper's).
pub fn method_of(p: &PretrainFacts) -> (Option<Method>, String) {
    let w = |name: &str| -> f64 {
        p.weights
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| *v)
            .unwrap_or_else(|| {
                PAPER_WEIGHTS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0.0, |(_, v)| *v)
            })
    };
    let m = p.method.as_str();
    if m == "ijepa" || (m == "cjepa" && w("b_vic") == 0.0) {
        return (Some(Method::Ijepa), Method::Ijepa.label().to_string());
    }
    if m != "cjepa" {
        return (None, m.to_string());
    }
    let terms = p.vic_terms.as_str();
    let inv = matches!(terms, "all" | "invariance") && w("b_sim") != 0.0;
    let var = matches!(terms, "all" | "var_cov") && (w("b_std") != 0.0 || w("b_cov") != 0.0);
    let method = match (inv, var) {
        (true, true) => Method::Cjepa,
        (true, false) => Method::Inv,
        (false, true) => Method::VarCov,
        (false, false) => Method::Ijepa,
    };
    let mut extras = Vec::new();
    for (name, paper) in PAPER_WEIGHTS {
        let used = match name {
            "b_vic" => inv || var,
            "b_sim" => inv,
            _ => var,
        };
        let v = w(name);
        if used && v != paper {
            extras.push(format!("{name}={v}"));
        }
    }
    if extras.is_empty() {
        (Some(method), method.label().to_string())
    } else {
        (None, format!("{} ({})", method.label(), extras.join(", ")))
    }
}

/// Architecture id and label of a resolved `model` (+ the training image size).
pub fn arch_of(model: &Value, img: Option<u64>) -> (String, String) {
    let Ok(cfg) = serde_json::from_value::<VitConfig>(model.clone()) else {
        return ("?".into(), "?".into());
    };
    let img = img.unwrap_or(cfg.img_size as u64);
    let preset = ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge"]
        .into_iter()
        .find(|n| {
            VitConfig::by_name(n).is_some_and(|p| {
                (
                    p.embed_dim,
                    p.depth,
                    p.num_heads,
                    p.patch_size,
                    p.pred_depth,
                ) == (
                    cfg.embed_dim,
                    cfg.depth,
                    cfg.num_heads,
                    cfg.patch_size,
                    cfg.pred_depth,
                )
            })
        });
    let (id, label) = match preset {
        Some(p) => (p.to_string(), arch_label(p)),
        None => (
            format!("vit_d{}_l{}_p{}", cfg.embed_dim, cfg.depth, cfg.patch_size),
            format!("ViT D{} L{} /{}", cfg.embed_dim, cfg.depth, cfg.patch_size),
        ),
    };
    if img == 224 {
        (id, label)
    } else {
        (format!("{id}@{img}"), format!("{label} @{img}px"))
    }
}

/// The pretraining behind `r` (itself, if it is a pretraining record).
pub fn origin(r: &Record, by_key: &BTreeMap<String, Record>) -> Origin {
    let pre = if r.kind == "pretrain" {
        Some(r)
    } else {
        upstream_of_kind(r, "pretrain", by_key)
    };
    match pre {
        Some(p) => {
            let pf = facts(p);
            let pre = pf.pretrain.clone().unwrap_or_default();
            let (method, method_label) = method_of(&pre);
            let (arch, arch_label) = arch_of(&p.config["model"], pf.img_size);
            let run_epochs = pre.epochs;
            // an evaluation of the run's snapshot of epoch K counts as K pretraining epochs
            let at_epoch = match r.kind.as_str() {
                "pretrain" => None,
                _ => facts(r).at_epoch,
            };
            Origin {
                method,
                method_label,
                arch,
                arch_label,
                epochs: at_epoch.or(run_epochs),
                snapshot_of: at_epoch.and(run_epochs),
                with_snapshots: pre.snapshots,
                pretrain_key: Some(p.key.clone()),
            }
        }
        None => {
            let rf = facts(r);
            let ck = rf.checkpoint.as_deref().unwrap_or("");
            let label = match ck {
                "random" => "random init".to_string(),
                "" | "upstream" => "no pretraining".to_string(),
                path => format!(
                    "checkpoint {}",
                    path.rsplit(['/', '\\']).next().unwrap_or(path)
                ),
            };
            let (arch, arch_label) = if r.config.get("model").is_some() {
                arch_of(&r.config["model"], rf.img_size)
            } else {
                ("?".into(), "?".into())
            };
            Origin {
                method: None,
                method_label: label,
                arch,
                arch_label,
                epochs: None,
                snapshot_of: None,
                with_snapshots: false,
                pretrain_key: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A pretraining's facts, read by the pretrain kind as the report reads them.
    fn pre(params: Value) -> PretrainFacts {
        crate::stages::table(StageKind::Pretrain)
            .report_facts(&params)
            .pretrain
            .expect("pretrain facts")
    }

    #[test]
    fn methods_follow_the_ablation() {
        assert_eq!(
            method_of(&pre(json!({"method": "ijepa"}))).0,
            Some(Method::Ijepa)
        );
        assert_eq!(
            method_of(&pre(json!({"method": "cjepa"}))).0,
            Some(Method::Cjepa)
        );
        assert_eq!(
            method_of(&pre(json!({"method": "cjepa", "vic_terms": "var_cov"}))).0,
            Some(Method::VarCov)
        );
        assert_eq!(
            method_of(&pre(json!({"method": "cjepa", "vic_terms": "invariance"}))).0,
            Some(Method::Inv)
        );
        assert_eq!(
            method_of(&pre(json!({"method": "cjepa", "b_sim": 0.0}))).0,
            Some(Method::VarCov)
        );
        assert_eq!(
            method_of(&pre(json!({"method": "cjepa", "b_vic": 0.0}))).0,
            Some(Method::Ijepa)
        );
        let (m, l) = method_of(&pre(
            json!({"method": "cjepa", "b_vic": 0.01, "b_sim": 25.0}),
        ));
        assert_eq!((m, l.as_str()), (None, "C-JEPA (b_vic=0.01)"));
        // a weight of an unused term does not count
        let (m, _) = method_of(&pre(
            json!({"method": "cjepa", "vic_terms": "invariance", "b_std": 5.0}),
        ));
        assert_eq!(m, Some(Method::Inv));
    }

    #[test]
    fn architectures_are_named_after_presets() {
        let b = serde_json::to_value(VitConfig::vit_base()).unwrap();
        assert_eq!(
            arch_of(&b, Some(224)),
            ("vit_base".into(), "ViT-B/16".into())
        );
        assert_eq!(arch_of(&b, Some(64)).0, "vit_base@64");
        let mut t = VitConfig::vit_tiny();
        t.depth = 2;
        t.patch_size = 8;
        let t = serde_json::to_value(t).unwrap();
        assert_eq!(arch_of(&t, Some(32)).1, "ViT D192 L2 /8 @32px");
    }

    #[test]
    fn identity_ignores_the_seed_through_the_chain() {
        let a0 = json!({"v": 1, "kind": "pretrain", "upstream": {}});
        let a1 = json!({"v": 1, "kind": "pretrain", "upstream": {}, "seed": 1});
        let ida = identity_of(&a0, &|_| None);
        assert_eq!(ida, identity_of(&a1, &|_| None));
        let ids: BTreeMap<&str, String> = [("k0", ida.clone()), ("k1", ida.clone())].into();
        let b0 = json!({"kind": "linear_probe", "upstream": {"pretrain": "k0"}});
        let b1 = json!({"kind": "linear_probe", "upstream": {"pretrain": "k1"}, "seed": 1});
        let f = |k: &str| ids.get(k).cloned();
        assert_eq!(identity_of(&b0, &f), identity_of(&b1, &f));
        let b2 = json!({"kind": "linear_probe", "upstream": {"pretrain": "k0"}, "params": {"epochs": 5}});
        assert_ne!(identity_of(&b0, &f), identity_of(&b2, &f));
    }
}

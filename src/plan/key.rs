//! Semantic stage keys: blake3 over the canonical JSON of {key-format version, kind, kind
//! version, the resolved config minus defaults and non-semantic fields, upstream keys, file
//! fingerprints}. Paths, devices, worker counts and logging cadence are never hashed.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::kind::{Kind, StageKind, NON_SEMANTIC};
use crate::util::canon;

/// Bump when the key format itself changes (invalidates every key).
pub const KEY_VERSION: u32 = 1;

/// The JSON that is hashed (and stored, to explain reruns).
pub fn key_input(
    kind: StageKind,
    hooks: &dyn Kind,
    config: &Value,
    upstream: &BTreeMap<String, String>,
    extra: &Value,
) -> Value {
    let mut params = config["params"].clone();
    if let Some(m) = params.as_object_mut() {
        for k in NON_SEMANTIC {
            m.remove(*k);
        }
        // e.g. dataset paths: the fingerprint of their file list is hashed instead
        for k in hooks.unkeyed_params() {
            m.remove(*k);
        }
    }
    let mut defaults = hooks.default_params();
    if let Some(m) = defaults.as_object_mut() {
        for k in NON_SEMANTIC {
            m.remove(*k);
        }
    }
    // renamed params hash under their old names: the rename keeps every key
    for v in [&mut params, &mut defaults] {
        if let Some(m) = v.as_object_mut() {
            for r in hooks.renamed_params() {
                if let Some(x) = m.remove(r.new) {
                    m.insert(r.old.to_string(), x);
                }
            }
        }
    }
    let mut v = json!({
        "v": KEY_VERSION,
        "kind": kind.name(),
        "kind_version": hooks.version(),
        "params": canon::diff_from_default(&params, &defaults),
        "upstream": upstream,
    });
    if let Some(s) = config.get("seed").filter(|s| s.as_u64() != Some(0)) {
        v["seed"] = s.clone();
    }
    if let Some(m) = config.get("model") {
        v["model"] = m.clone();
    }
    // only `bf16` is written: f32 stages keep the keys they had before precision existed
    if let Some(pr) = config.get("precision") {
        v["precision"] = pr.clone();
    }
    if !extra.is_null() {
        v["inputs"] = extra.clone();
    }
    v
}

/// The key of a key input.
pub fn hash(key_input: &Value) -> String {
    canon::hash(key_input)
}

/// Why a stage's key changed: field changes, and upstream stages whose keys changed.
pub fn explain(old: &Value, new: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("upstream");
        }
        v
    };
    out.extend(canon::changes(&strip(old), &strip(new)));
    let (ou, nu) = (&old["upstream"], &new["upstream"]);
    let mut names: Vec<&String> = ou
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .collect();
    names.extend(nu.as_object().into_iter().flatten().map(|(k, _)| k));
    names.sort();
    names.dedup();
    for n in names {
        if ou.get(n) != nu.get(n) {
            out.push(format!("upstream {n} changed"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::{StageContext, StageOutput};

    /// A kind with a command's default params.
    struct Cmd;

    impl Kind for Cmd {
        fn version(&self) -> u32 {
            1
        }
        fn resolve_params(
            &self,
            params: &serde_json::Map<String, Value>,
        ) -> std::result::Result<Value, String> {
            Ok(Value::Object(params.clone()))
        }
        fn default_params(&self) -> Value {
            json!({"cmd": "", "inputs": [], "outputs": [], "metrics": null, "vars": {}})
        }
        fn run(&self, _ctx: &mut StageContext) -> crate::Result<StageOutput> {
            unreachable!("never run")
        }
    }

    #[test]
    fn non_semantic_and_defaults_do_not_change_keys() {
        let up = BTreeMap::new();
        let a = json!({"params": {"cmd": "x", "inputs": [], "outputs": [], "metrics": null, "vars": {}}, "seed": 0});
        let b = json!({"params": {"cmd": "x", "inputs": [], "outputs": [], "metrics": null, "vars": {}, "device": "cuda"}, "seed": 0});
        let ka = hash(&key_input(StageKind::Command, &Cmd, &a, &up, &Value::Null));
        let kb = hash(&key_input(StageKind::Command, &Cmd, &b, &up, &Value::Null));
        assert_eq!(ka, kb);
        let c = json!({"params": {"cmd": "y"}, "seed": 0});
        assert_ne!(
            ka,
            hash(&key_input(StageKind::Command, &Cmd, &c, &up, &Value::Null))
        );
        let d = json!({"params": {"cmd": "x"}, "seed": 1});
        assert_ne!(
            ka,
            hash(&key_input(StageKind::Command, &Cmd, &d, &up, &Value::Null))
        );
    }

    #[test]
    fn upstream_keys_matter_and_are_explained() {
        let cfg = json!({"params": {"cmd": "x"}, "seed": 0});
        let u1: BTreeMap<_, _> = [("data".to_string(), "aa".to_string())].into();
        let u2: BTreeMap<_, _> = [("data".to_string(), "bb".to_string())].into();
        let k1 = key_input(StageKind::Command, &Cmd, &cfg, &u1, &Value::Null);
        let k2 = key_input(StageKind::Command, &Cmd, &cfg, &u2, &Value::Null);
        assert_ne!(hash(&k1), hash(&k2));
        assert_eq!(explain(&k1, &k2), vec!["upstream data changed".to_string()]);
    }
}

//! Matrix expansion: one stage instance per combination of matrix values, and automatic fan-out
//! of dependents (a stage that needs a matrix stage runs once per upstream instance; diamonds
//! stay aligned because instances combine only when their matrix coordinates agree).

use std::collections::BTreeMap;

use indexmap::IndexMap;
use serde_json::{Map, Value};

use super::load::Pipeline;
use crate::error::Result;
use crate::util::canon;

/// One runnable instance of a stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// `stage` or `stage[key=value,...]`.
    pub id: String,
    /// The stage id in the file.
    pub stage: String,
    /// Matrix coordinates, inherited and own: (origin stage, key) -> value.
    pub coords: BTreeMap<(String, String), Value>,
    /// The stage's own matrix values (path -> value), in matrix order.
    pub own: IndexMap<String, Value>,
    /// Upstream instances: (needed stage id, index into the instance list).
    pub upstream: Vec<(String, usize)>,
}

/// Expand all stages of `p` into instances, in topological order (upstream first).
pub fn expand(p: &Pipeline) -> Result<Vec<Instance>> {
    let order = stage_order(p);
    let mut out: Vec<Instance> = Vec::new();
    let mut by_stage: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for sid in order {
        let s = &p.spec.stages[&sid];
        // combinations of upstream instances whose coordinates agree
        let mut combos: Vec<(Vec<(String, usize)>, BTreeMap<(String, String), Value>)> =
            vec![(vec![], BTreeMap::new())];
        for n in &s.needs {
            let mut next = Vec::new();
            for (ups, coords) in &combos {
                for &ui in &by_stage[n] {
                    let u = &out[ui];
                    if u.coords
                        .iter()
                        .all(|(k, v)| coords.get(k).map_or(true, |c| c == v))
                    {
                        let mut ups2 = ups.clone();
                        ups2.push((n.clone(), ui));
                        let mut c2 = coords.clone();
                        c2.extend(u.coords.iter().map(|(k, v)| (k.clone(), v.clone())));
                        next.push((ups2, c2));
                    }
                }
            }
            combos = next;
        }
        // own matrix: cartesian product in declaration order
        let mut owns: Vec<IndexMap<String, Value>> = vec![IndexMap::new()];
        for (k, vals) in &s.matrix {
            owns = owns
                .into_iter()
                .flat_map(|o| {
                    vals.iter().map(move |v| {
                        let mut o2 = o.clone();
                        o2.insert(k.clone(), v.clone());
                        o2
                    })
                })
                .collect();
        }
        let mut ids = Vec::new();
        for (ups, coords) in &combos {
            for own in &owns {
                let mut c = coords.clone();
                for (k, v) in own {
                    c.insert((sid.clone(), k.clone()), v.clone());
                }
                let id = instance_id(&sid, &c);
                ids.push(out.len());
                out.push(Instance {
                    id,
                    stage: sid.clone(),
                    coords: c,
                    own: own.clone(),
                    upstream: ups.clone(),
                });
            }
        }
        by_stage.insert(sid.clone(), ids);
    }
    Ok(out)
}

/// `stage[k=v,...]` with keys in sorted order (origin stage named only when two share a key).
pub fn instance_id(stage: &str, coords: &BTreeMap<(String, String), Value>) -> String {
    if coords.is_empty() {
        return stage.to_string();
    }
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, k) in coords.keys() {
        *count.entry(k).or_default() += 1;
    }
    let mut parts: Vec<(String, String)> = coords
        .iter()
        .map(|((origin, k), v)| {
            let name = if count[k.as_str()] > 1 {
                format!("{origin}.{k}")
            } else {
                k.clone()
            };
            (name, canon::display_value(v))
        })
        .collect();
    parts.sort();
    let parts: Vec<String> = parts.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{stage}[{}]", parts.join(","))
}

/// The matrix key that sets a stage's seed rather than one of its params.
pub const SEED_KEY: &str = "seed";

/// The seed of an instance: its own `matrix: { seed: [...] }` value, else the seed of the
/// upstream matrix instance it fans out from (so that the probes of `pretrain[seed=1]` also run
/// with seed 1), else `default` (`defaults.seed`). Values are checked when loading.
pub fn instance_seed(inst: &Instance, default: u64) -> u64 {
    if let Some(v) = inst.own.get(SEED_KEY).and_then(Value::as_u64) {
        return v;
    }
    inst.coords
        .iter()
        .find(|((_, k), _)| k == SEED_KEY)
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(default)
}

/// Apply an instance's own matrix values to its params / model overrides.
/// `k` -> `params.k`, `params.a.b` -> `params.a.b`, `model.x` -> `model.x`; `seed` is not a
/// param (see [`instance_seed`]).
pub fn apply_own(
    own: &IndexMap<String, Value>,
    params: &mut Map<String, Value>,
    model: &mut Map<String, Value>,
) {
    for (k, v) in own.iter().filter(|(k, _)| k.as_str() != SEED_KEY) {
        let (target, path) = if let Some(rest) = k.strip_prefix("model.") {
            (&mut *model, rest)
        } else {
            (&mut *params, k.strip_prefix("params.").unwrap_or(k))
        };
        set_path(target, path, v.clone());
    }
}

fn set_path(m: &mut Map<String, Value>, path: &str, v: Value) {
    let mut segs: Vec<&str> = path.split('.').collect();
    let last = segs.pop().expect("non-empty");
    let mut cur = m;
    for s in segs {
        let e = cur
            .entry(s.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !e.is_object() {
            *e = Value::Object(Map::new());
        }
        cur = e.as_object_mut().expect("object");
    }
    cur.insert(last.to_string(), v);
}

/// Stage ids in dependency order (upstream first, file order among equals).
pub fn stage_order(p: &Pipeline) -> Vec<String> {
    let stages = &p.spec.stages;
    let mut done: Vec<String> = Vec::new();
    let mut left: Vec<&String> = stages.keys().collect();
    while !left.is_empty() {
        let pos = left
            .iter()
            .position(|s| stages[*s].needs.iter().all(|n| done.contains(n)))
            .expect("validated acyclic");
        done.push(left.remove(pos).clone());
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load::{parse_pipeline, LoadOptions};
    use std::path::Path;

    fn load(y: &str) -> Pipeline {
        parse_pipeline(Path::new("t.yaml"), y.to_string(), &LoadOptions::default()).unwrap()
    }

    #[test]
    fn fans_out_and_aligns_diamonds() {
        let p = load(
            "stages:\n  d: {kind: dataset, path: x}\n  a: {kind: command, cmd: 'true', needs: [d], matrix: {m: [1, 2]}}\n  b: {kind: command, cmd: 'true', needs: [a]}\n  c: {kind: command, cmd: 'true', needs: [a, b], matrix: {lr: [0.1, 0.01]}}\n",
        );
        let inst = expand(&p).unwrap();
        let ids: Vec<&str> = inst.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids.len(), 1 + 2 + 2 + 4, "{ids:?}");
        assert!(ids.contains(&"a[m=1]"));
        assert!(ids.contains(&"b[m=2]"));
        assert!(ids.contains(&"c[lr=0.01,m=2]"));
        // c[m=1,*] uses a[m=1] and b[m=1] only
        let c = inst.iter().find(|i| i.id == "c[lr=0.1,m=1]").unwrap();
        for (_, u) in &c.upstream {
            assert!(inst[*u].id.ends_with("[m=1]"), "{}", inst[*u].id);
        }
    }

    #[test]
    fn own_values_go_to_params_or_model() {
        let mut own = IndexMap::new();
        own.insert("method".to_string(), Value::from("cjepa"));
        own.insert("model.depth".to_string(), Value::from(4));
        own.insert("params.opt.lr".to_string(), Value::from(0.5));
        own.insert("seed".to_string(), Value::from(2));
        let (mut p, mut m) = (Map::new(), Map::new());
        apply_own(&own, &mut p, &mut m);
        assert!(p.get("seed").is_none());
        assert_eq!(p["method"], "cjepa");
        assert_eq!(p["opt"]["lr"], 0.5);
        assert_eq!(m["depth"], 4);
    }

    #[test]
    fn seed_matrix_sets_the_seed_of_the_stage_and_its_dependents() {
        let p = load(
            "defaults: {seed: 7}\nstages:\n  d: {kind: dataset, path: x}\n  a: {kind: command, cmd: 'true', needs: [d], matrix: {seed: [0, 1, 2]}}\n  b: {kind: command, cmd: 'true', needs: [a]}\n",
        );
        let inst = expand(&p).unwrap();
        let seed = |id: &str| instance_seed(inst.iter().find(|i| i.id == id).unwrap(), 7);
        assert_eq!(seed("d"), 7);
        assert_eq!(seed("a[seed=1]"), 1);
        assert_eq!(seed("b[seed=2]"), 2);
    }
}

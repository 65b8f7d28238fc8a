//! Canonical JSON: sorted keys, normalised numbers (`1e-3` == `0.001`, `5.0` == `5`), used for
//! stage keys and for explaining what changed between two configs.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Map, Value};

/// Canonical text of a number: integers without a fraction, other floats in shortest round-trip form.
pub fn number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        return format!("{}", f as i64);
    }
    // shortest round-trip representation, normalised exponent form
    let s = format!("{f:e}");
    s
}

/// Canonical bytes of a JSON value.
pub fn to_canonical(v: &Value) -> String {
    let mut s = String::new();
    write_canon(v, &mut s);
    s
}

fn write_canon(v: &Value, s: &mut String) {
    match v {
        Value::Null => s.push_str("null"),
        Value::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => s.push_str(&number(n)),
        Value::String(t) => {
            let _ = write!(s, "{}", Value::String(t.clone()));
        }
        Value::Array(a) => {
            s.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                write_canon(x, s);
            }
            s.push(']');
        }
        Value::Object(m) => {
            let sorted: BTreeMap<&String, &Value> = m.iter().collect();
            s.push('{');
            for (i, (k, x)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                let _ = write!(s, "{}:", Value::String(k.clone()));
                write_canon(x, s);
            }
            s.push('}');
        }
    }
}

/// Short human text of a value (matrix ids, explanations): strings bare, numbers canonical.
pub fn display_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(0.0);
            if n.is_f64() && f.fract() != 0.0 {
                format!("{f}")
            } else {
                number(n)
            }
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(display_value).collect();
            format!("[{}]", parts.join(","))
        }
        other => to_canonical(other),
    }
}

/// Equal after normalisation (so `5` == `5.0`).
pub fn same(a: &Value, b: &Value) -> bool {
    to_canonical(a) == to_canonical(b)
}

/// The parts of `v` that differ from `default` (recursively for mappings); keys absent from
/// `default` are kept. A field added later with its default therefore leaves old keys unchanged.
pub fn diff_from_default(v: &Value, default: &Value) -> Value {
    match (v, default) {
        (Value::Object(m), Value::Object(d)) => {
            let mut out = Map::new();
            for (k, x) in m {
                match d.get(k) {
                    Some(dx) if same(x, dx) => {}
                    Some(dx @ Value::Object(_)) if x.is_object() => {
                        let sub = diff_from_default(x, dx);
                        if sub.as_object().is_some_and(|o| !o.is_empty()) {
                            out.insert(k.clone(), sub);
                        }
                    }
                    _ => {
                        out.insert(k.clone(), x.clone());
                    }
                }
            }
            Value::Object(out)
        }
        _ => v.clone(),
    }
}

/// Flatten to `a.b.c` -> canonical value text (arrays are leaves).
pub fn flatten(v: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn go(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    go(&p, x, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), display_value(v));
            }
        }
    }
    go("", v, &mut out);
    out
}

/// Changed fields between two configs: `path old -> new` (`(absent)` for missing).
pub fn changes(old: &Value, new: &Value) -> Vec<String> {
    let (a, b) = (flatten(old), flatten(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let o = a.get(k).map(String::as_str).unwrap_or("(absent)");
            let n = b.get(k).map(String::as_str).unwrap_or("(absent)");
            format!("{k} {o} -> {n}")
        })
        .collect()
}

/// blake3 hex digest of the canonical bytes.
pub fn hash(v: &Value) -> String {
    blake3::hash(to_canonical(v).as_bytes())
        .to_hex()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn display_is_readable_inside_arrays() {
        assert_eq!(display_value(&json!(0.95)), "0.95");
        assert_eq!(display_value(&json!([0.95, 1.0])), "[0.95,1]");
        assert_eq!(display_value(&json!(["a", 2])), "[a,2]");
    }

    #[test]
    fn numbers_are_normalised() {
        let a: Value = serde_yaml::from_str("{lr: 1e-3, epochs: 5.0, b: 2}").unwrap();
        let b: Value = serde_yaml::from_str("{b: 2, epochs: 5, lr: 0.001}").unwrap();
        assert_eq!(to_canonical(&a), to_canonical(&b));
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(hash(&a), hash(&json!({"b": 2, "epochs": 6, "lr": 0.001})));
    }

    #[test]
    fn defaults_are_not_hashed() {
        let d = json!({"epochs": 10, "opt": {"lr": 0.1, "wd": 0.0}, "new_field": true});
        let v = json!({"epochs": 10, "opt": {"lr": 0.2, "wd": 0.0}, "new_field": true});
        assert_eq!(diff_from_default(&v, &d), json!({"opt": {"lr": 0.2}}));
        let old = json!({"epochs": 10, "opt": {"lr": 0.2, "wd": 0.0}});
        assert_eq!(diff_from_default(&old, &d), diff_from_default(&v, &d));
    }

    #[test]
    fn changes_name_paths() {
        let c = changes(
            &json!({"params": {"epochs": 300, "x": 1}}),
            &json!({"params": {"epochs": 600, "x": 1.0}}),
        );
        assert_eq!(c, vec!["params.epochs 300 -> 600".to_string()]);
    }
}

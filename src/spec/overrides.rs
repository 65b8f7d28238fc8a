//! `--set a.b.c=value` overrides (the Hydra habit), applied to the parsed file before validation.

use serde_json::{Map, Value};

/// Stage-level shorthands of `params` fields.
const SUGAR: &[&str] = &["source", "format", "path", "cmd", "checkpoint"];

/// One parsed `--set` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted path as the user wrote it.
    pub raw_path: String,
    /// Path segments.
    pub path: Vec<String>,
    /// Value parsed as YAML (`5` is a number, `[1,2]` a list, `abc` a string).
    pub value: Value,
}

/// Parse `a.b.c=value`.
pub fn parse(s: &str) -> Result<Override, String> {
    let (p, v) = s.split_once('=').ok_or_else(|| {
        format!("--set `{s}`: expected PATH=VALUE, e.g. --set pretrain.params.epochs=5")
    })?;
    let p = p.trim();
    if p.is_empty() || p.split('.').any(|seg| seg.is_empty()) {
        return Err(format!("--set `{s}`: the path `{p}` has an empty segment"));
    }
    let value: Value = if v.trim().is_empty() {
        Value::String(String::new())
    } else {
        serde_yaml::from_str(v).map_err(|e| format!("--set `{s}`: value is not valid YAML: {e}"))?
    };
    Ok(Override {
        raw_path: p.to_string(),
        path: p.split('.').map(str::to_string).collect(),
        value,
    })
}

/// Apply overrides to the whole file as a JSON value. A first segment naming a stage is read as
/// `stages.<id>...`.
pub fn apply(doc: &mut Value, sets: &[Override]) -> Result<(), String> {
    for o in sets {
        let mut path = o.path.clone();
        let is_stage = doc
            .get("stages")
            .and_then(|s| s.as_object())
            .is_some_and(|s| s.contains_key(&path[0]));
        if is_stage && path[0] != "stages" {
            path.insert(0, "stages".into());
        }
        // `X.params.cmd` where the stage gives `cmd:` at stage level overrides that field
        if path.len() == 4
            && path[0] == "stages"
            && path[2] == "params"
            && SUGAR.contains(&path[3].as_str())
        {
            let at_stage = doc["stages"][&path[1]]
                .get(&path[3])
                .is_some_and(|v| !v.is_null());
            if at_stage {
                path.remove(2);
            }
        }
        let top = ["name", "store", "defaults", "stages"];
        if !top.contains(&path[0].as_str()) {
            let stages: Vec<String> = doc
                .get("stages")
                .and_then(|s| s.as_object())
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let hint = crate::util::suggest::did_you_mean(
                &path[0],
                stages.iter().map(String::as_str).chain(top.iter().copied()),
            );
            return Err(format!(
                "--set {}: `{}` is neither a stage id nor a top-level key{hint}",
                o.raw_path, path[0]
            ));
        }
        let mut cur = &mut *doc;
        for seg in &path[..path.len() - 1] {
            if !cur.is_object() {
                return Err(format!(
                    "--set {}: `{seg}` is inside a value that is not a mapping",
                    o.raw_path
                ));
            }
            cur = cur
                .as_object_mut()
                .expect("checked object")
                .entry(seg.clone())
                .or_insert_with(|| Value::Object(Map::new()));
        }
        match cur.as_object_mut() {
            Some(m) => {
                m.insert(path.last().expect("non-empty").clone(), o.value.clone());
            }
            None => return Err(format!("--set {}: parent is not a mapping", o.raw_path)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_values_as_yaml() {
        assert_eq!(parse("a.b=5").unwrap().value, json!(5));
        assert_eq!(parse("a.b=1e-3").unwrap().value, json!(0.001));
        assert_eq!(parse("a.b=[1, 2]").unwrap().value, json!([1, 2]));
        assert_eq!(parse("a=x").unwrap().value, json!("x"));
        assert!(parse("a.b").is_err());
        assert!(parse("a..b=1").is_err());
    }

    #[test]
    fn stage_ids_are_shorthand() {
        let mut d = json!({"stages": {"pre": {"kind": "pretrain", "params": {"epochs": 1}}}});
        apply(
            &mut d,
            &[
                parse("pre.params.epochs=7").unwrap(),
                parse("defaults.seed=3").unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(d["stages"]["pre"]["params"]["epochs"], json!(7));
        assert_eq!(d["defaults"]["seed"], json!(3));
        let e = apply(&mut d, &[parse("pree.params.x=1").unwrap()]).unwrap_err();
        assert!(e.contains("did you mean `pre`"), "{e}");
    }
}

//! `cjepa schema`: JSON Schema of the pipeline file (point your editor's YAML plugin at it).

pub fn run() -> anyhow::Result<i32> {
    let mut schema = serde_json::to_value(schemars::schema_for!(cjepa::spec::PipelineFile))?;
    let kinds: Vec<serde_json::Value> = cjepa::stages::StageKind::names()
        .into_iter()
        .map(Into::into)
        .collect();
    if let Some(k) = schema.pointer_mut("/definitions/StageSpec/properties/kind") {
        k["enum"] = serde_json::Value::Array(kinds);
    }
    outln!("{}", serde_json::to_string_pretty(&schema)?)?;
    Ok(0)
}

//! `cjepa dag PIPELINE --format mermaid|dot`.

use super::PipelineArgs;

/// Arguments of `cjepa dag`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    p: PipelineArgs,
    /// mermaid or dot.
    #[arg(long, default_value = "mermaid", value_parser = ["mermaid", "dot"])]
    format: String,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let pipeline = super::load(&a.p)?;
    let plan = super::plan(&pipeline)?;
    let out = match a.format.as_str() {
        "dot" => cjepa::plan::graph_fmt::dot(&plan),
        _ => cjepa::plan::graph_fmt::mermaid(&plan),
    };
    out!("{out}")?;
    Ok(0)
}

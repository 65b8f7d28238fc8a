//! `cjepa show KEY`: one record as JSON (a unique key prefix is enough).

use std::path::PathBuf;

/// Arguments of `cjepa show`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stage key or a unique prefix of it.
    key: String,
    /// Store folder (default `.cjepa`).
    #[arg(long)]
    store: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let store = super::open_read(&super::default_store(&a.store), "cjepa show")?;
    let found = store.find_prefix(&a.key)?;
    match found.len() {
        0 => Err(cjepa::Error::Usage(format!("no record with key {}", a.key)).into()),
        1 => {
            let r = &found[0];
            outln!("{}", serde_json::to_string_pretty(r)?)?;
            outln!("artifacts: {}", store.artifact_dir(&r.key).display())?;
            Ok(0)
        }
        n => Err(cjepa::Error::Usage(format!(
            "{n} records start with {}; give more characters",
            a.key
        ))
        .into()),
    }
}

//! `cjepa ls`: stored records, newest first.

use std::path::PathBuf;

/// Arguments of `cjepa ls`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Store folder (default `.cjepa`).
    #[arg(long)]
    store: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let store = super::open_read(&super::default_store(&a.store), "cjepa ls")?;
    let mut recs = store.records()?;
    recs.sort_by(|a, b| b.finished.cmp(&a.finished));
    for r in recs {
        let status = match r.status {
            cjepa::store::Status::Succeeded if r.artifacts_deleted => "gc'd",
            cjepa::store::Status::Succeeded => "ok",
            cjepa::store::Status::Failed => "FAILED",
        };
        outln!(
            "{}  {:<7} {:<14} {:<40} {:>8.1}s  {}",
            &r.key[..12],
            status,
            r.kind,
            format!("{}/{}", r.pipeline, r.stage_id),
            r.secs,
            r.finished.format("%Y-%m-%d %H:%M")
        )?;
    }
    Ok(0)
}

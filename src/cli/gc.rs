//! `cjepa gc [PIPELINE...]`: delete artifacts of stages no given pipeline references (by default:
//! not used by the latest run of any pipeline), optionally only older ones. Metrics stay.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cjepa::store::Store;

/// Arguments of `cjepa gc`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pipelines whose stages are kept (default: what the latest run of each pipeline used).
    pipelines: Vec<PathBuf>,
    /// Store folder (default: the first pipeline's store, else `.cjepa`).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Only delete artifacts of records older than this many days.
    #[arg(long)]
    older_than_days: Option<f64>,
    /// Say what would be deleted.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut store_dir = a.store.clone();
    for p in &a.pipelines {
        let pl = cjepa::spec::load_pipeline(p, &Default::default())?;
        store_dir.get_or_insert(pl.store_dir.clone());
        keep.extend(
            cjepa::plan::build(&pl, cjepa::stages::table)?
                .stages
                .into_iter()
                .map(|s| s.key),
        );
    }
    let store = Store::open(&super::default_store(&store_dir), false, "cjepa gc")?;
    if a.pipelines.is_empty() {
        let mut latest = std::collections::BTreeMap::new();
        for inv in store.invocations()? {
            latest.insert(inv.pipeline.clone(), inv);
        }
        for inv in latest.values() {
            keep.extend(inv.stages.iter().map(|(_, k, _)| k.clone()));
        }
    }
    let cutoff = a
        .older_than_days
        .map(|d| chrono::Utc::now() - chrono::Duration::seconds((d * 86400.0) as i64));
    let (mut n, mut bytes) = (0usize, 0u64);
    for mut r in store.records()? {
        if keep.contains(&r.key) || r.artifacts_deleted || cutoff.is_some_and(|c| r.finished > c) {
            continue;
        }
        let dir = store.artifact_dir(&r.key);
        let size: u64 = r.artifacts.iter().map(|x| x.size).sum();
        outln!(
            "{} {} {} ({} bytes)",
            if a.dry_run { "would delete" } else { "delete" },
            &r.key[..12],
            r.stage_id,
            size
        )?;
        if !a.dry_run {
            if dir.exists() {
                fs_err::remove_dir_all(&dir)?;
            }
            let _ = fs_err::remove_dir_all(store.work_dir(&r.key));
            r.artifacts_deleted = true;
            store.put(&r)?;
        }
        n += 1;
        bytes += size;
    }
    store.flush()?;
    outln!(
        "{n} artifact folders, {bytes} bytes{}; metrics kept",
        if a.dry_run {
            " would be freed"
        } else {
            " freed"
        }
    )?;
    Ok(0)
}

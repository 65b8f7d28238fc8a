//! A two-stage pipeline built from Rust, planned, and run twice with the local executor: the
//! library path `cjepa run` takes.
//!
//! [`parse_pipeline`] turns YAML into a validated pipeline, [`cjepa::plan::build`] resolves every
//! stage's config and key, [`Store::open`] locks the store and [`local::run`] runs what the store
//! lacks. The pipeline is a synthetic ImageFolder (`dataset`) and a tiny C-JEPA pretraining on
//! it (`pretrain`: 32 px, two blocks, two steps; seconds on a CPU). The first run runs both; the
//! second plans the same keys and finds both stages cached.
//!
//! The local executor runs each stage as a child process `WORKER exec-stage JOB.json`. With no
//! worker given it starts this program again, so `main` answers that call first (the `cjepa`
//! binary is a worker too: `RunOptions::worker_exe`).
//!
//! Run: `cargo run --release --example two_stage_pipeline -- [DIR]` (DIR: where the store goes,
//! default a temporary folder; with a DIR, a second invocation finds everything cached).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use cjepa::exec::core::{Event, Outcome, Reporter, RunOptions};
use cjepa::exec::local;
use cjepa::spec::{load::parse_pipeline, LoadOptions};
use cjepa::store::Store;

/// The pipeline, as a pipeline file would hold it.
pub const PIPELINE: &str = r#"
name: two_stage
defaults: { seed: 0, device: cpu }
stages:
  data:
    kind: dataset
    source: synth
    format: imagefolder
    params: { classes: 2, train_per_class: 8, val_per_class: 2, size: 32 }
  pretrain:
    kind: pretrain
    needs: [data]
    model: { preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }
    params: { method: cjepa, epochs: 1, batch_size: 8, warmup_epochs: 0, mask: { min_keep: 0 } }
"#;

/// One stage instance after a run.
pub struct StageRow {
    /// Instance id.
    pub id: String,
    /// Stage key (blake3 of kind, resolved config and upstream keys).
    pub key: String,
    /// Found in the store instead of run.
    pub cached: bool,
    /// Scalar metrics of its record.
    pub metrics: BTreeMap<String, f64>,
}

/// Plan [`PIPELINE`] as if it were the file `dir/two_stage.yaml` (so its store is
/// `dir/.cjepa`), run what is missing with `worker` (default: this program) and return every
/// stage with its record's metrics; a failed stage is an error.
pub fn run_once(
    dir: &Path,
    worker: Option<PathBuf>,
    rep: &mut dyn Reporter,
) -> anyhow::Result<Vec<StageRow>> {
    let file = dir.join("two_stage.yaml");
    let pipeline = parse_pipeline(&file, PIPELINE.to_string(), &LoadOptions::default())?;
    let plan = cjepa::plan::build(&pipeline, cjepa::stages::table)?;
    let store = Store::open(&pipeline.store_dir, false, "two_stage_pipeline example")?;
    let opts = RunOptions {
        device: pipeline.spec.defaults.device.clone(),
        worker_exe: worker,
        ..RunOptions::default()
    };
    let summary = local::run(&plan, &store, &opts, rep)?;
    let mut rows = Vec::new();
    // Every stage is selected (no `only`), so the outcomes follow the plan's order.
    for (s, (id, outcome)) in plan.stages.iter().zip(summary.outcomes) {
        if !matches!(outcome, Outcome::Cached | Outcome::Ran { .. }) {
            anyhow::bail!("stage {id}: {outcome:?}");
        }
        let rec = store.get(&s.key)?.context("no record")?;
        let rec = rec.map_err(|e| anyhow::anyhow!("record of {id}: {e}"))?;
        let (key, cached) = (s.key.clone(), outcome == Outcome::Cached);
        let metrics = rec.metrics;
        rows.push(StageRow {
            id,
            key,
            cached,
            metrics,
        });
    }
    Ok(rows)
}

/// Says on stderr what starts, finishes and fails.
struct Log;

impl Reporter for Log {
    fn event(&mut self, ev: Event) {
        match ev {
            Event::Started { id, .. } => eprintln!("  started  {id}"),
            Event::Finished { id, secs, .. } => eprintln!("  finished {id} in {secs:.1} s"),
            Event::Failed { id, error, log, .. } => {
                eprintln!("  failed   {id}: {error} (log: {})", log.display())
            }
            _ => {}
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, job] = args.as_slice() {
        if cmd == "exec-stage" {
            std::process::exit(cjepa::exec::worker::exec_stage(
                Path::new(job),
                cjepa::stages::table,
            )?);
        }
    }
    let tmp = tempfile::tempdir()?;
    let dir = args.first().map_or(tmp.path().to_path_buf(), PathBuf::from);
    fs_err::create_dir_all(&dir)?;
    for round in ["first", "second"] {
        println!("{round} run (store {}):", dir.join(".cjepa").display());
        for r in run_once(&dir, None, &mut Log)? {
            let how = if r.cached { "cached" } else { "ran" };
            let m: Vec<String> = (r.metrics.iter())
                .map(|(k, v)| format!("{k}={}", (v * 1e4).round() / 1e4))
                .collect();
            println!("  {:<9} {} {how:<6} {}", r.id, &r.key[..12], m.join(" "));
        }
    }
    Ok(())
}

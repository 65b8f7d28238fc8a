//! `cjepa report [PIPELINE]`: a table of stored metrics per stage (md, csv, json, latex).

use std::collections::BTreeMap;
use std::path::PathBuf;

use cjepa::report::{metrics_table, Format};
use cjepa::store::{Record, Status, Store};

/// Arguments of `cjepa report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pipeline file (default: every pipeline in the store).
    pipeline: Option<PathBuf>,
    /// Store folder.
    #[arg(long)]
    store: Option<PathBuf>,
    /// md, csv, json or latex.
    #[arg(long, default_value = "md")]
    format: String,
    /// Also write the tables into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `--set` overrides for the pipeline.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let format: Format = a.format.parse().map_err(cjepa::Error::Usage)?;
    let (store_dir, plan) = match &a.pipeline {
        Some(p) => {
            let pl = cjepa::spec::load_pipeline(
                p,
                &cjepa::spec::LoadOptions {
                    sets: a.sets.clone(),
                },
            )?;
            let plan = cjepa::plan::build(&pl)?;
            (
                a.store.clone().unwrap_or_else(|| pl.store_dir.clone()),
                Some(plan),
            )
        }
        None => (super::default_store(&a.store), None),
    };
    let store = Store::open(&store_dir, false, "cjepa report")?;
    let (title, records): (String, Vec<Record>) = match &plan {
        Some(plan) => {
            let mut v = Vec::new();
            for s in &plan.stages {
                if let Some(Ok(r)) = store.get(&s.key)? {
                    if r.status == Status::Succeeded {
                        v.push(r);
                    }
                }
            }
            (format!("{}: stored metrics", plan.pipeline.name), v)
        }
        None => {
            // newest successful record per (pipeline, stage)
            let mut latest: BTreeMap<(String, String), Record> = BTreeMap::new();
            for r in store
                .records()?
                .into_iter()
                .filter(|r| r.status == Status::Succeeded)
            {
                let k = (r.pipeline.clone(), r.stage_id.clone());
                if latest.get(&k).map_or(true, |o| o.finished < r.finished) {
                    latest.insert(k, r);
                }
            }
            ("stored metrics".into(), latest.into_values().collect())
        }
    };
    let table = metrics_table(&title, &records);
    let text = table.render(format);
    print!("{text}");
    if let Some(dir) = a.out {
        fs_err::create_dir_all(&dir)?;
        fs_err::write(dir.join(format!("metrics.{}", format.ext())), &text)?;
    }
    Ok(0)
}

//! `cjepa report [PIPELINE]`: the paper's tables next to the published numbers (default), the
//! plain table of stored metrics, or both; with `--out DIR` also each table as a file and the plots
//! (SVG and PNG) (loss curves, collapse monitors, linear probe vs pretraining epochs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cjepa::report::{
    baselines, html, metrics_table, paper_tables, plots, runs, state, Format, Table,
};

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
    /// Also write the tables (one file each) and the plots (SVG and PNG) into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the report as one self-contained HTML page (tables, stage states and DAG,
    /// failed stages' logs, plots); the tables are then not printed.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// Which tables: `paper` (the paper's tables with published numbers), `metrics` (every
    /// stored metric per stage), `all`, or `auto`: the paper's tables and the metrics table
    /// when the pipeline (or store) pretrains, else the metrics table alone. With `--format
    /// json`, `metrics` alone prints one table object; otherwise a list of tables.
    #[arg(long, default_value = "auto", value_parser = ["auto", "paper", "metrics", "all"])]
    tables: String,
    /// `--set` overrides for the pipeline.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    sets: Vec<String>,
}

impl Args {
    /// The default report of one pipeline (`cjepa run --report`).
    pub fn for_pipeline(pipeline: PathBuf, store: PathBuf, sets: Vec<String>) -> Args {
        Args {
            pipeline: Some(pipeline),
            store: Some(store),
            format: "md".into(),
            out: None,
            html: None,
            tables: "auto".into(),
            sets,
        }
    }
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
            let plan = super::plan(&pl)?;
            (
                a.store.clone().unwrap_or_else(|| pl.store_dir.clone()),
                Some(plan),
            )
        }
        None => (super::default_store(&a.store), None),
    };
    let registry_start: PathBuf = match &plan {
        Some(p) => p.pipeline.dir.clone(),
        None => std::env::current_dir()?,
    };
    if let Some(f) = &a.html {
        check_folder_of(f)?;
    }
    let store = super::open_read(&store_dir, "cjepa report")?;
    let wanted: Option<BTreeSet<String>> = plan.as_ref().map(runs::plan_identities);
    let records = runs::select(store.records()?, wanted.as_ref());
    let want_page = a.html.is_some() || a.out.is_some();
    let states = match &plan {
        Some(p) if want_page => state::stage_states(p, &store)?,
        _ => vec![],
    };
    drop(store);

    let which = which_tables(&a.tables, plan.as_ref(), &records);
    let mut tables: Vec<(String, Table)> = Vec::new();
    let published = baselines::load_all(&registry_start).map_err(cjepa::Error::Usage)?;
    let paper = paper_tables(&published, &records);
    if which != "metrics" {
        for t in &paper {
            tables.push((t.slug.clone(), t.table.clone()));
        }
    }
    if which != "paper" {
        let title = match &plan {
            Some(p) => format!("{}: stored metrics", p.pipeline.name),
            None => "stored metrics".into(),
        };
        tables.push(("metrics".into(), metrics_table(&title, &records)));
    }
    let texts: Vec<String> = tables.iter().map(|(_, t)| t.render(format)).collect();
    if a.html.is_none() {
        // (with --html, the page holds the tables)
        print_tables(&tables, &texts, format, which)?;
    }
    let plots = if want_page {
        plots::plots(&records, &published)
    } else {
        vec![]
    };
    let page = || {
        let title = plan
            .as_ref()
            .map_or("stored runs".to_string(), |p| p.pipeline.name.clone());
        html::render(&html::Page {
            title: &title,
            store: &store_dir.display().to_string(),
            plan: plan.as_ref(),
            states: &states,
            paper: &paper,
            records: &records,
            plots: &plots,
        })
    };
    if let Some(dir) = &a.out {
        fs_err::create_dir_all(dir)?;
        for ((slug, _), text) in tables.iter().zip(&texts) {
            fs_err::write(dir.join(format!("{slug}.{}", format.ext())), text)?;
        }
        let n = write_plots(dir, &plots)?;
        fs_err::write(dir.join("index.html"), page()?)?;
        eprintln!(
            "wrote {} tables, {n} plots and index.html to {}",
            tables.len(),
            dir.display()
        );
    }
    if let Some(f) = &a.html {
        fs_err::write(f, page()?)?;
        eprintln!("wrote {}", f.display());
    }
    Ok(0)
}

/// `--tables auto`: the paper's tables and the metrics (`all`) when the pipeline (or the store)
/// pretrains, i.e. one of its stages' kinds reports pretraining facts; else the metrics alone.
fn which_tables<'t>(
    tables: &'t str,
    plan: Option<&cjepa::plan::Plan>,
    records: &[cjepa::store::Record],
) -> &'t str {
    if tables != "auto" {
        return tables;
    }
    let pretrains = match plan {
        Some(p) => p.stages.iter().any(|s| {
            let facts = cjepa::stages::table(s.kind).report_facts(&s.config["params"]);
            facts.pretrain.is_some()
        }),
        None => records.iter().any(|r| runs::facts(r).pretrain.is_some()),
    };
    if pretrains {
        "all"
    } else {
        "metrics"
    }
}

/// `--html FILE` into a folder that does not exist is a usage error, found before any work.
fn check_folder_of(f: &Path) -> anyhow::Result<()> {
    let parent = f.parent().filter(|d| !d.as_os_str().is_empty());
    if parent.is_some_and(|d| !d.is_dir()) {
        return Err(cjepa::Error::Usage(format!(
            "--html {}: the folder {} does not exist",
            f.display(),
            parent.map(|d| d.display().to_string()).unwrap_or_default()
        ))
        .into());
    }
    Ok(())
}

/// The tables on stdout: rendered one after the other, or one JSON document (the list of
/// tables; `metrics` alone prints its one table object).
fn print_tables(
    tables: &[(String, Table)],
    texts: &[String],
    format: Format,
    which: &str,
) -> anyhow::Result<()> {
    if format == Format::Json {
        let all: Vec<serde_json::Value> = tables.iter().map(|(_, t)| t.json()).collect();
        if which == "metrics" {
            outln!("{}", serde_json::to_string_pretty(&all[0])?)?;
        } else {
            outln!("{}", serde_json::to_string_pretty(&all)?)?;
        }
    } else {
        out!("{}", texts.join("\n"))?;
    }
    Ok(())
}

/// PNG plots are drawn at twice the SVG's pixel size (print, high-density screens).
const PNG_SCALE: u32 = 2;

/// Each plot as `<stem>.svg` and `<stem>.png` under `DIR/plots`.
fn write_plots(dir: &Path, ps: &[plots::Plot]) -> anyhow::Result<usize> {
    if ps.is_empty() {
        return Ok(0);
    }
    let pdir = dir.join("plots");
    fs_err::create_dir_all(&pdir)?;
    for p in ps {
        fs_err::write(pdir.join(p.svg_file()), p.svg()?)?;
        fs_err::write(pdir.join(p.png_file()), p.png(PNG_SCALE)?)?;
    }
    Ok(ps.len())
}

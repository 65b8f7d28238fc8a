//! clap definitions and dispatch; one file per subcommand.
#![allow(clippy::print_stdout, clippy::print_stderr)]

/// `println!` for command output; returns `anyhow::Result<()>` (see [`stdout`]).
macro_rules! outln {
    () => {
        $crate::cli::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output; returns `anyhow::Result<()>` (see [`stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::stdout::write(format_args!($($arg)*))
    };
}

mod bench;
mod bench_cocoeval;
mod bench_cocoeval_gen;
mod bench_loader;
mod bench_train;
mod bench_trajectory;
mod cancel;
mod checkpoint;
mod dag;
mod data;
mod embed;
mod eval;
mod eval_coco;
mod gc;
mod ls;
mod printer;
mod report;
mod run;
mod schema;
mod show;
mod status;
pub mod stdout;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Reproduce and extend C-JEPA as cached, resumable pipelines.
#[derive(Debug, Parser)]
#[command(name = "cjepa", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options shared by commands that read a pipeline file.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub pipeline: PathBuf,
    /// Override a value: `--set pretrain.params.epochs=5` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
    /// Store folder (default: the file's `store:` or `.cjepa` next to the file).
    #[arg(long)]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run what is missing in a pipeline (cached stages are skipped).
    Run(run::Args),
    /// Cancel a pipeline's Slurm jobs (stages checkpoint; the next run resumes them).
    Cancel(cancel::Args),
    /// Per stage: fresh / stale / missing / failed, and with --explain what changed.
    Status(status::Args),
    /// Print the stage DAG as mermaid or dot.
    Dag(dag::Args),
    /// List stored records.
    Ls(ls::Args),
    /// Show one record (key or key prefix).
    Show(show::Args),
    /// Delete artifacts no pipeline references (metrics are kept).
    Gc(gc::Args),
    /// Tables of stored metrics.
    Report(report::Args),
    /// JSON Schema of the pipeline file.
    Schema,
    /// Check or synthesise datasets.
    #[command(subcommand)]
    Data(data::Args),
    /// Benchmarks of the engine.
    #[command(subcommand)]
    Bench(bench::Args),
    /// Import official I-JEPA checkpoints.
    #[command(subcommand)]
    Checkpoint(checkpoint::Args),
    /// Pooled encoder features of a folder of images.
    Embed(embed::Args),
    /// Exact evaluation metrics on files of predictions (COCO, ADE20K, DAVIS).
    #[command(subcommand)]
    Eval(eval::Args),
    /// Run one stage from a job file (used by executors).
    #[command(hide = true)]
    ExecStage {
        /// The job file.
        job: PathBuf,
        /// Run as this rank of a data-parallel stage (started by the local launcher).
        #[arg(long, conflicts_with = "slurm_rank")]
        rank: Option<usize>,
        /// Run as the rank `SLURM_PROCID` of a data-parallel stage (started by `srun`).
        #[arg(long)]
        slurm_rank: bool,
        /// Start the ranks of a data-parallel stage with `srun` (inside a Slurm allocation).
        #[arg(long)]
        srun: bool,
    },
}

/// Parse arguments and run; returns the exit code.
pub fn main() -> anyhow::Result<i32> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Ok(code);
        }
    };
    match cli.cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Cancel(a) => cancel::run(a),
        Cmd::Status(a) => status::run(a),
        Cmd::Dag(a) => dag::run(a),
        Cmd::Ls(a) => ls::run(a),
        Cmd::Show(a) => show::run(a),
        Cmd::Gc(a) => gc::run(a),
        Cmd::Report(a) => report::run(a),
        Cmd::Schema => schema::run(),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Checkpoint(a) => checkpoint::run(a),
        Cmd::Embed(a) => embed::run(a),
        Cmd::Data(a) => data::run(a),
        Cmd::Eval(a) => eval::run(a),
        Cmd::ExecStage {
            job,
            rank,
            slurm_rank,
            srun,
        } => {
            use cjepa::{exec::worker::Role, train::parallel::launch::Launcher};
            let role = match (rank, slurm_rank, srun) {
                (Some(r), _, _) => Role::Rank(r),
                (None, true, _) => Role::SlurmRank,
                (None, false, true) => Role::Stage(Launcher::Srun),
                (None, false, false) => Role::Stage(Launcher::Local),
            };
            Ok(cjepa::exec::worker::exec_stage_as(
                &job,
                role,
                cjepa::stages::table,
            )?)
        }
    }
}

/// Load a pipeline with its overrides; the store folder honours `--store`.
pub fn load(a: &PipelineArgs) -> anyhow::Result<cjepa::spec::Pipeline> {
    let mut p = cjepa::spec::load_pipeline(
        &a.pipeline,
        &cjepa::spec::LoadOptions {
            sets: a.sets.clone(),
        },
    )?;
    if let Some(s) = &a.store {
        p.store_dir = s.clone();
    }
    Ok(p)
}

/// Store folder for commands without a pipeline.
/// Plan `pipeline` with the built-in kinds, printing the deprecations met to stderr.
pub fn plan(pipeline: &cjepa::spec::Pipeline) -> cjepa::error::Result<cjepa::plan::Plan> {
    let plan = cjepa::plan::build(pipeline, cjepa::stages::table)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    Ok(plan)
}

pub fn default_store(s: &Option<PathBuf>) -> PathBuf {
    s.clone().unwrap_or_else(|| PathBuf::from(".cjepa"))
}

/// Open a store to read it. While a run holds it, this is the run's readers' copy, and a note on
/// stderr says whose and from when.
pub fn open_read(dir: &std::path::Path, purpose: &str) -> anyhow::Result<cjepa::store::Store> {
    let store = cjepa::store::Store::open_read(dir, purpose)?;
    if let Some((holder, written)) = store.read_only() {
        let when = written
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%H:%M:%S")
                    .to_string()
            })
            .unwrap_or_else(|| "?".into());
        eprintln!("note: the store is in use by {holder}; showing its records as of {when}");
    }
    Ok(store)
}

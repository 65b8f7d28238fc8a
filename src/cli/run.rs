//! `cjepa run PIPELINE`: plan, skip what is cached, run the rest; `--dry-run` says what would run and why.

use std::io::IsTerminal;

use cjepa::exec::core::{self, Decision, Outcome, RunOptions, RunSummary};
use cjepa::exec::local;
use cjepa::exec::slurm::{self, DetachedOutcome, DetachedSummary, SlurmOptions};
use cjepa::spec::ExecutorKind;
use cjepa::store::Store;

use super::printer::Printer;
use super::PipelineArgs;

/// Arguments of `cjepa run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    p: PipelineArgs,
    /// Only these stages (ids or instance ids), with their upstream.
    #[arg(long)]
    only: Vec<String>,
    /// Rerun these stages and their dependents even if cached.
    #[arg(long)]
    force: Vec<String>,
    /// Stages run at once.
    #[arg(long, short = 'j', default_value_t = 1)]
    jobs: usize,
    /// CPU threads in the pool (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Keep running independent stages after a failure.
    #[arg(long)]
    keep_going: bool,
    /// Say what would run and why, run nothing.
    #[arg(long)]
    dry_run: bool,
    /// If the store is in use, wait for it instead of failing.
    #[arg(long)]
    wait: bool,
    /// Device: auto, cpu, cuda (not part of stage keys).
    #[arg(long)]
    device: Option<String>,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    plain: bool,
    /// Where stages run (default: the file's `executor:`, else local).
    #[arg(long, value_parser = ["local", "slurm"])]
    executor: Option<String>,
    /// Slurm: submit every stage at once (children wait with `--dependency=afterok`) and return;
    /// `cjepa status` imports the results later.
    #[arg(long)]
    detach: bool,
    /// After a successful run, print the report's tables (as `cjepa report PIPELINE`).
    #[arg(long)]
    report: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let pipeline = super::load(&a.p)?;
    let plan = super::plan(&pipeline)?;
    let on_slurm = match a.executor.as_deref() {
        Some(e) => e == "slurm",
        None => pipeline.spec.executor == Some(ExecutorKind::Slurm),
    };
    if !a.dry_run && !on_slurm {
        // data folders and settings the selected stages need on this machine, before anything
        // is written (on Slurm the stages run elsewhere and check there)
        plan.check_environment(&cjepa::plan::select::only(&plan, &a.only)?)?;
    }
    let opts = RunOptions {
        only: a.only.clone(),
        force: a.force.clone(),
        jobs: a.jobs.max(1),
        threads: a.threads.unwrap_or_else(num_cpus::get),
        gpus: detect_gpus(),
        keep_going: a.keep_going,
        device: a
            .device
            .clone()
            .unwrap_or_else(|| pipeline.spec.defaults.device.clone()),
        worker_exe: None,
        interrupted: if a.dry_run {
            Default::default()
        } else {
            cjepa::exec::signals::install()
        },
    };
    let store = Store::open(
        &pipeline.store_dir,
        a.wait,
        &format!("cjepa run {}", pipeline.file.display()),
    )?;
    if a.dry_run {
        print_dry_run(&plan, &store, &opts)?;
        return Ok(0);
    }
    if a.detach && !on_slurm {
        anyhow::bail!("--detach needs the Slurm executor (`--executor slurm` or `executor: slurm` in the file)");
    }
    let tty = std::io::stderr().is_terminal() && !a.plain;
    let mut printer = Printer::new(tty);
    let summary = if on_slurm {
        let sopts = SlurmOptions {
            detach: a.detach,
            ..SlurmOptions::new(pipeline.spec.slurm.clone())
        };
        if a.detach {
            let d = slurm::run_detached(&plan, &store, &opts, &sopts, &mut printer)?;
            printer.finish();
            return Ok(print_detached(&pipeline, &d));
        }
        slurm::run(&plan, &store, &opts, &sopts, &mut printer)?
    } else {
        local::run(&plan, &store, &opts, &mut printer)?
    };
    printer.finish();
    let failed = print_summary(&pipeline, &summary);
    if summary.interrupted {
        return Ok(130);
    }
    if failed > 0 {
        return Ok(1);
    }
    if a.report {
        drop(store);
        return super::report::run(super::report::Args::for_pipeline(
            a.p.pipeline.clone(),
            pipeline.store_dir.clone(),
            a.p.sets.clone(),
        ));
    }
    Ok(0)
}

/// `--dry-run`: what each stage would do (cached or run, and why) with its cost estimate.
fn print_dry_run(plan: &cjepa::plan::Plan, store: &Store, opts: &RunOptions) -> anyhow::Result<()> {
    let d = core::decide(plan, store, opts)?;
    let est = cjepa::plan::cost::plan_estimates(plan);
    let gpuh = |e: Option<f64>| match e {
        Some(h) if h > 0.0 => format!("{h:.3} GPU-h"),
        Some(_) => "-".to_string(),
        None => "? GPU-h".to_string(),
    };
    let (mut n_run, mut total) = (0, 0.0);
    for ((s, d), e) in plan.stages.iter().zip(&d).zip(&est) {
        match d {
            Decision::Cached => outln!(
                "cached  {:<40} {}  {:>14}",
                s.inst.id,
                &s.key[..12],
                gpuh(*e)
            )?,
            Decision::Run(why) => {
                n_run += 1;
                total += e.unwrap_or(0.0);
                outln!(
                    "run     {:<40} {}  {:>14}  {}",
                    s.inst.id,
                    &s.key[..12],
                    gpuh(*e),
                    why.join("; ")
                )?;
            }
            Decision::NotSelected => {}
        }
    }
    outln!(
        "{n_run} of {} stages would run (~{total:.1} H100 GPU-hours at {:.0}% of the bf16 peak, of the TF32 peak for f32 stages; see plan::cost)",
        plan.stages.len(),
        cjepa::plan::cost::ASSUMED_UTILISATION * 100.0
    )?;
    Ok(())
}

/// The end of a run: the skipped and interrupted stages by name, then the counts. Returns the
/// number of failed stages.
fn print_summary(pipeline: &cjepa::spec::Pipeline, summary: &RunSummary) -> usize {
    let (mut cached, mut ran, mut failed, mut skipped, mut not_started) = (0, 0, 0, 0, 0);
    for (id, o) in &summary.outcomes {
        match o {
            Outcome::Cached => cached += 1,
            Outcome::Ran { .. } => ran += 1,
            Outcome::Failed(_) => failed += 1,
            Outcome::Skipped { because } => {
                skipped += 1;
                eprintln!("skipped {id}: upstream {because} failed");
            }
            Outcome::Interrupted => {
                eprintln!("interrupted {id}: checkpointed; run the same command to resume")
            }
            Outcome::NotStarted => {
                not_started += 1;
            }
        }
    }
    eprintln!(
        "{ran} ran, {cached} cached, {failed} failed, {skipped} skipped ({} store: {})",
        pipeline.name,
        pipeline.store_dir.display()
    );
    if not_started > 0 && !summary.interrupted {
        eprintln!("{not_started} stages not started after the failure (pass --keep-going to run independent stages anyway)");
    }
    failed
}

fn print_detached(pipeline: &cjepa::spec::Pipeline, d: &DetachedSummary) -> i32 {
    let (mut submitted, mut earlier, mut cached, mut failed) = (0, 0, 0, 0);
    for (id, o) in &d.outcomes {
        match o {
            DetachedOutcome::Submitted(_) => submitted += 1,
            DetachedOutcome::AlreadySubmitted(_) => earlier += 1,
            DetachedOutcome::Cached | DetachedOutcome::Imported => cached += 1,
            DetachedOutcome::Failed(e) => {
                failed += 1;
                eprintln!("failed  {id}: {e}");
            }
            DetachedOutcome::Skipped { because } => {
                eprintln!("skipped {id}: upstream {because} failed")
            }
        }
    }
    eprintln!(
        "{submitted} submitted, {earlier} already in Slurm, {cached} done, {failed} failed ({} store: {}); \
         `cjepa status {}` imports the results as they finish, `cjepa cancel {}` stops them",
        pipeline.name,
        pipeline.store_dir.display(),
        pipeline.file.display(),
        pipeline.file.display()
    );
    if failed > 0 {
        1
    } else {
        0
    }
}

fn detect_gpus() -> Vec<u32> {
    #[cfg(feature = "cuda")]
    {
        if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
            return v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        }
        let mut n = 0;
        while candle_core::Device::new_cuda(n).is_ok() {
            n += 1;
        }
        (0..n as u32).collect()
    }
    #[cfg(not(feature = "cuda"))]
    Vec::new()
}

//! `cjepa cancel PIPELINE`: scancel the pipeline's Slurm jobs (attached or `--detach`ed); each
//! stage checkpoints on the SIGTERM, and the next `cjepa run` resumes it.

use super::PipelineArgs;

/// Arguments of `cjepa cancel`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    p: PipelineArgs,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let pipeline = super::load(&a.p)?;
    let cmds = cjepa::exec::slurm::poll::Commands::default();
    let gone = cjepa::exec::slurm::cancel(&pipeline.store_dir, &pipeline.name, &cmds)?;
    for e in &gone {
        eprintln!("cancelled {} (Slurm job {})", e.stage_id, e.job_id);
    }
    eprintln!(
        "{} Slurm jobs of {} cancelled; `cjepa status {}` shows where they stopped",
        gone.len(),
        pipeline.name,
        pipeline.file.display()
    );
    Ok(0)
}

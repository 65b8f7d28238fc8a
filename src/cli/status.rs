//! `cjepa status PIPELINE [--explain]`: fresh / stale / missing / failed per stage.

use cjepa::exec::slurm::SlurmOptions;
use cjepa::store::Lookup;

use super::PipelineArgs;

/// Arguments of `cjepa status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    p: PipelineArgs,
    /// For stale stages, print the exact fields that changed since the stored record.
    #[arg(long)]
    explain: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let pipeline = super::load(&a.p)?;
    let plan = cjepa::plan::build(&pipeline)?;
    let store = super::open_read(&pipeline.store_dir, "cjepa status")?;
    // import what submitted Slurm jobs (e.g. of `run --detach`) left since the last look
    let mut printer = super::printer::Printer::new(false);
    let sopts = SlurmOptions::new(pipeline.spec.slurm.clone());
    // (a read-only view cannot import: the run holding the store does that itself)
    let slurm = if store.read_only().is_some() {
        Default::default()
    } else {
        cjepa::exec::slurm::reconcile(&plan, &store, &sopts, &mut printer)?
    };
    for s in &plan.stages {
        if let Some((label, state)) = slurm.active.get(&s.key) {
            let ckpt = cjepa::exec::checkpoint::latest(&store.work_dir(&s.key).join("ckpt"))?
                .map(|c| format!(" (checkpoint at step {})", c.step))
                .unwrap_or_default();
            outln!(
                "{label:<8} {:<40} {}{ckpt}  {state}",
                s.inst.id,
                &s.key[..12]
            )?;
            continue;
        }
        let ckpt = cjepa::exec::checkpoint::latest(&store.work_dir(&s.key).join("ckpt"))?
            .map(|c| format!(" (checkpoint at step {})", c.step))
            .unwrap_or_default();
        let (state, why): (&str, Vec<String>) = match store.lookup(&s.key)? {
            Lookup::Hit(_) => ("fresh", vec![]),
            Lookup::Failed(r) => ("failed", vec![r.error.unwrap_or_default()]),
            Lookup::Miss(reason) => match store.latest_key(&pipeline.name, &s.inst.id)? {
                Some(old) if old != s.key => {
                    let why = match store.get(&old)? {
                        Some(Ok(rec)) => cjepa::plan::key::explain(&rec.key_input, &s.key_input),
                        _ => vec!["previous record unreadable".into()],
                    };
                    ("stale", why)
                }
                _ => ("missing", reason.into_iter().collect()),
            },
        };
        outln!("{state:<8} {:<40} {}{ckpt}", s.inst.id, &s.key[..12])?;
        if a.explain {
            for w in why {
                outln!("           {}: {w}", s.inst.id)?;
            }
        }
    }
    Ok(0)
}

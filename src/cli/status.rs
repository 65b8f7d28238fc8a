//! `cjepa status PIPELINE [--explain] [--watch [SECONDS]]`: fresh / stale / missing / failed per
//! stage; with `--watch`, redrawn every few seconds (with the running stages' step, loss and
//! images/s) from the readers' copy of the store until the run that holds it ends.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use cjepa::exec::slurm::SlurmOptions;
use cjepa::store::Store;

use super::PipelineArgs;

/// Arguments of `cjepa status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    p: PipelineArgs,
    /// For stale stages, print the exact fields that changed since the stored record.
    #[arg(long)]
    explain: bool,
    /// Redraw every SECONDS (default 2) until the run holding the store ends.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
}

/// The last progress reading of each running stage, for its rate: `(when, step)` by key.
type Seen = HashMap<String, (Instant, u64)>;

pub fn run(a: Args) -> anyhow::Result<i32> {
    let pipeline = super::load(&a.p)?;
    let plan = super::plan(&pipeline)?;
    let Some(every) = a.watch else {
        let store = super::open_read(&pipeline.store_dir, "cjepa status")?;
        for line in lines(&pipeline, &plan, &store, a.explain, &mut Seen::new())? {
            outln!("{line}")?;
        }
        return Ok(0);
    };
    anyhow::ensure!(
        every.is_finite() && every > 0.0,
        "--watch {every}: give a number of seconds above 0"
    );
    let tty = std::io::stdout().is_terminal();
    let mut seen = Seen::new();
    loop {
        // opened afresh each time (and dropped before the pause): a reader never keeps a run
        // from taking the store
        let store = Store::open_read(&pipeline.store_dir, "cjepa status --watch")?;
        let holder = store.read_only().map(|(h, at)| {
            let at = at.map_or("?".into(), |t| {
                t.with_timezone(&chrono::Local)
                    .format("%H:%M:%S")
                    .to_string()
            });
            format!("{h} holds the store; its records as of {at}")
        });
        let body = lines(&pipeline, &plan, &store, a.explain, &mut seen)?;
        drop(store);
        if tty {
            out!("\x1b[2J\x1b[H")?;
        }
        outln!(
            "{} {}",
            chrono::Local::now().format("%H:%M:%S"),
            holder.as_deref().unwrap_or("no run holds the store")
        )?;
        for line in body {
            outln!("{line}")?;
        }
        if holder.is_none() {
            return Ok(0);
        }
        outln!()?;
        std::thread::sleep(Duration::from_secs_f64(every));
    }
}

/// One line per stage (and the changed fields with `explain`); a stage with a progress file
/// that is not done gets a second line with its step, message and rate.
fn lines(
    pipeline: &cjepa::spec::Pipeline,
    plan: &cjepa::plan::Plan,
    store: &Store,
    explain: bool,
    seen: &mut Seen,
) -> anyhow::Result<Vec<String>> {
    // import what submitted Slurm jobs (e.g. of `run --detach`) left since the last look
    let mut printer = super::printer::Printer::new(false);
    let sopts = SlurmOptions::new(pipeline.spec.slurm.clone());
    // (a read-only view cannot import: the run holding the store does that itself)
    let slurm = if store.read_only().is_some() {
        Default::default()
    } else {
        cjepa::exec::slurm::reconcile(plan, store, &sopts, &mut printer)?
    };
    let mut out = Vec::new();
    for st in cjepa::report::state::stage_states(plan, store)? {
        let s = &plan.stages[st.index];
        let ckpt = st
            .checkpoint
            .map(|c| format!(" (checkpoint at step {c})"))
            .unwrap_or_default();
        if let Some((label, state)) = slurm.active.get(&s.key) {
            out.push(format!(
                "{label:<8} {:<40} {}{ckpt}  {state}",
                s.inst.id,
                &s.key[..12]
            ));
            continue;
        }
        out.push(format!(
            "{:<8} {:<40} {}{ckpt}",
            st.state.as_str(),
            s.inst.id,
            &s.key[..12]
        ));
        if let Some(p) = st.progress {
            let batch = cjepa::kind::param(&s.config["params"], cjepa::kind::hooks::BATCH)
                .and_then(|v| v.as_u64());
            out.push(format!(
                "           step {}/{} {}{}",
                p.step,
                p.total,
                p.msg,
                rate(seen, &s.key, p.step, batch)
            ));
        }
        if explain {
            for w in st.why {
                out.push(format!("           {}: {w}", s.inst.id));
            }
        }
    }
    Ok(out)
}

/// ` | 3.2 steps/s, 102 images/s` from the step count's change since the last look (empty the
/// first time).
fn rate(seen: &mut Seen, key: &str, step: u64, batch: Option<u64>) -> String {
    let now = Instant::now();
    let before = seen.insert(key.to_string(), (now, step));
    let Some((t0, s0)) = before else {
        return String::new();
    };
    let dt = (now - t0).as_secs_f64();
    if dt <= 0.0 || step < s0 {
        return String::new();
    }
    let per_s = (step - s0) as f64 / dt;
    match batch {
        Some(b) => format!(" | {per_s:.2} steps/s, {:.1} images/s", per_s * b as f64),
        None => format!(" | {per_s:.2} steps/s"),
    }
}

//! `cjepa bench trajectory run|compare`: the training trajectory of the quickstart's pretraining
//! against another implementation's (`bench/trajectory.sh` runs both and compares).
//!
//! - `run --method ijepa|cjepa --out DIR [--replay]`: trains the quickstart's recipe
//!   ([`cjepa::stages::pretrain::trajectory::Setup::quickstart`]) through the pretrain stage's iteration and
//!   writes `DIR/trajectory.json` (per step: loss terms, lr, wd, momentum, gradient and parameter
//!   norms, target-feature std); with `--replay`, also `DIR/replay/` (initial weights with the
//!   official names, the batches, the masks) for `bench/torch_step.py --replay`.
//! - `compare OURS THEIRS`: the largest relative deviation per quantity over the first 1, 10,
//!   100, 300 steps.

use std::path::PathBuf;

use cjepa::data::transforms::Interpolation;
use cjepa::stages::pretrain::trajectory::{deviations, record, Setup, Trajectory};
use cjepa::train::loss::Method;
use cjepa::train::parallel::shards::shard_count;

/// The subcommands of `cjepa bench trajectory`.
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// Train and record our trajectory (and the replay files for the other implementation).
    Run {
        /// `ijepa` or `cjepa`.
        #[arg(long)]
        method: String,
        /// Steps to train (at most the recipe's 300).
        #[arg(long, default_value_t = 300)]
        steps: u64,
        /// Seed of the images, the initial weights, the crops and the masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Crop filter: `bicubic` (ours) or `bilinear` (torchvision's default).
        #[arg(long, default_value = "bicubic")]
        interpolation: String,
        /// Thread shards of each batch: a divisor of the batch, or `auto` (as the pretrain stage).
        #[arg(long, default_value = "1")]
        shards: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Also write `OUT/replay/` for the other implementation.
        #[arg(long)]
        replay: bool,
    },
    /// Largest relative deviation per quantity between two trajectory files.
    Compare {
        /// Ours.
        ours: PathBuf,
        /// The other implementation's.
        theirs: PathBuf,
        /// Steps to report, comma separated.
        #[arg(long, default_value = "1,10,100,300")]
        at: String,
    },
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a {
        Args::Run {
            method,
            steps,
            seed,
            interpolation,
            shards,
            out,
            replay,
        } => run_record(&method, steps, seed, &interpolation, &shards, out, replay),
        Args::Compare { ours, theirs, at } => compare(&ours, &theirs, &at),
    }
}

fn run_record(
    method: &str,
    steps: u64,
    seed: u64,
    interpolation: &str,
    shards: &str,
    out: PathBuf,
    replay: bool,
) -> anyhow::Result<i32> {
    let method = match method {
        "ijepa" => Method::Ijepa,
        "cjepa" => Method::Cjepa,
        m => anyhow::bail!("--method {m}: use `ijepa` or `cjepa`"),
    };
    let mut setup = Setup::quickstart(method);
    setup.seed = seed;
    setup.interpolation = match interpolation {
        "bicubic" => Interpolation::Bicubic,
        "bilinear" => Interpolation::Bilinear,
        i => anyhow::bail!("--interpolation {i}: use `bicubic` or `bilinear`"),
    };
    let threads = rayon::current_num_threads();
    setup.shards = shard_count("--shards", Some(shards), threads, setup.params.batch_size)
        .map_err(anyhow::Error::msg)?;
    // shards run their kernels on rayon pools of their own; candle's element-wise pool would
    // make them queue (set before any candle op starts it)
    if setup.shards > 1 && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    fs_err::create_dir_all(&out)?;
    let work = tempfile::tempdir()?;
    let replay_dir = replay.then(|| out.join("replay"));
    outln!(
        "trajectory: {} on the quickstart's recipe, seed {seed}, {interpolation} crops, {} \
         shard(s), {steps} steps",
        setup.method_name(),
        setup.shards
    )?;
    let mut failed = None;
    let t = record(
        &setup,
        steps,
        work.path(),
        replay_dir.as_deref(),
        &mut |r| {
            if failed.is_none() && (r.step == 1 || r.step % 25 == 0) {
                failed = outln!(
                    "  step {:>3}: loss {:.6} (jepa {:.6}) target_std {:.5} lr {:.3e} grad_norm {:.4}",
                    r.step,
                    r.loss,
                    r.loss_jepa,
                    r.target_std,
                    r.lr,
                    r.grad_norm
                )
                .err();
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    let file = out.join("trajectory.json");
    t.write(&file)?;
    outln!("wrote {}", file.display())?;
    if let Some(d) = replay_dir {
        outln!("wrote {}", d.display())?;
    }
    Ok(0)
}

fn compare(ours: &std::path::Path, theirs: &std::path::Path, at: &str) -> anyhow::Result<i32> {
    let at: Vec<u64> = at
        .split(',')
        .map(|s| s.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--at {at}: {e}"))?;
    let (a, b) = (Trajectory::read(ours)?, Trajectory::read(theirs)?);
    anyhow::ensure!(
        a.method == b.method,
        "{} is {}, {} is {}",
        ours.display(),
        a.method,
        theirs.display(),
        b.method
    );
    outln!(
        "{}: {} ({} steps) vs {} ({} steps); largest relative deviation |a-b|/max(|a|,|b|) over \
         steps 1..k",
        a.method,
        a.source,
        a.steps.len(),
        b.source,
        b.steps.len()
    )?;
    out!("| quantity |")?;
    for k in &at {
        out!(" k = {k} |")?;
    }
    outln!()?;
    outln!("|---|{}", "---|".repeat(at.len()))?;
    for d in deviations(&a, &b, &at) {
        out!("| {} |", d.quantity)?;
        for (_, v) in &d.upto {
            match v {
                Some(v) => out!(" {v:.1e} |")?,
                None => out!(" - |")?,
            }
        }
        outln!()?;
    }
    Ok(0)
}

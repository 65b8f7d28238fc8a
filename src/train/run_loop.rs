//! The training loop shared by every kind that trains (pretraining, fine-tuning, detection,
//! segmentation, the linear probes). A kind writes its step as a [`Recipe`]; the loop owns
//! everything around it:
//!
//! - **resume**: the newest checkpoint restores the recipe's tensors and the loop's state;
//! - **one device read per log**: a step hands back its losses as tensors left on the device; the
//!   loop reads them all at once every `log_every` steps, at the first and last step and before
//!   each checkpoint (one device-to-host read, [`crate::util::host_read`]), never inside a step;
//! - **the NaN stop**: a non-finite loss found at a read stops the stage with the step it
//!   happened at. Weights are never checkpointed unread, so the last checkpoint is a healthy one;
//! - **curves**: every step's values go to TensorBoard (written at the read); the stage's series
//!   hold either the mean over each `n` steps ([`Points::Means`]) or the values of the logged steps
//!   themselves ([`Points::Logged`]);
//! - **a recipe's own reads**: a step may ask for a read ([`Recipe::read_at`], e.g. before its
//!   weights are copied out) and gets the read step back ([`Recipe::after_read`]) to add values
//!   that cost a read of their own (e.g. an effective rank) or to write files;
//! - **checkpoints and interrupts**: saved when [`crate::kind::checkpoint::Checkpointer::due`]
//!   or on Ctrl-C / SIGTERM; with several ranks every rank agrees on both at every step, so
//!   every rank reads at the same steps and rank 0 alone writes;
//! - **progress**: the step counter and the last read loss.
//!
//! The per-step values are summed on the host in step order, so a resumed run logs exactly the
//! numbers of an uninterrupted one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kind::StageContext;
use crate::train::parallel::ranks::Ranks;
use crate::util::host_read;

/// The loop's own file in each checkpoint folder.
pub const LOOP_FILE: &str = "loop.json";

/// What the loop needs to know about a kind's training.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Steps in all.
    pub total: u64,
    /// Read (and log) the losses every this many steps (0: only at the first and last step
    /// and before checkpoints).
    pub log_every: u64,
    /// How the stage's series are made.
    pub points: Points,
    /// Names of the values a step returns; the first is the loss the NaN stop watches.
    pub names: Vec<&'static str>,
    /// Stop at a non-finite loss, with this end of the message: what to change (e.g. "lower
    /// `blr`"); `None`: train on (a sweep whose diverging heads are scored, not fatal).
    pub nan_hint: Option<String>,
    /// What a step is called in messages ("step", "iteration").
    pub unit: &'static str,
    /// The values a step returns are already the same on every rank (averaged inside the step):
    /// they are not averaged again.
    pub rank_means: bool,
    /// Images (or samples) one step trains: the loop then logs the throughput
    /// (`images_per_sec`, since this run started) with the read values. Never a series.
    pub images_per_step: Option<usize>,
}

impl LoopConfig {
    /// `total` steps returning the values `names`, read at the first and last step and before
    /// checkpoints, a series point per step, no NaN stop, one process's values, no throughput:
    /// a kind sets what differs with `..LoopConfig::new(total, names)`.
    pub fn new(total: u64, names: Vec<&'static str>) -> Self {
        LoopConfig {
            total,
            log_every: 0,
            points: Points::Means(1),
            names,
            nan_hint: None,
            unit: "step",
            rank_means: false,
            images_per_step: None,
        }
    }
}

/// How the points of a stage's series are made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Points {
    /// The mean of the step's values over each this many steps (e.g. an epoch); the last point
    /// may cover fewer.
    Means(u64),
    /// The values of each logged step (the first, every `log_every`-th, the last), with the
    /// host values and those [`Recipe::after_read`] adds; non-finite values make no point.
    Logged,
}

/// One kind's training step and the tensors it checkpoints.
pub trait Recipe {
    /// Step `step` (0-based): forward, backward, update. The returned losses stay on the device.
    fn step(&mut self, ctx: &mut StageContext, ranks: &mut Ranks, step: u64) -> Result<Step>;
    /// Write the recipe's tensors (weights, optimiser moments) into a checkpoint folder.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Restore them from a checkpoint folder written after `step` steps.
    fn load(&mut self, dir: &Path, step: u64) -> Result<()>;
    /// Whether the values of `step` (1-based: steps done) must be read even when it is not a
    /// logged step (e.g. before weights of that step are written anywhere).
    fn read_at(&self, _step: u64) -> bool {
        false
    }
    /// Called once the values of the latest step (`step` steps done) have been read and found
    /// finite; `logged` says whether it is a logged step. Returns values to log with it.
    fn after_read(
        &mut self,
        _ctx: &mut StageContext,
        _step: u64,
        _logged: bool,
    ) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }
    /// The loop state of a checkpoint written before the loop's own file existed, if this kind
    /// can read it (its step and series); `None`: the checkpoint is not resumed.
    fn legacy_state(&self, _dir: &Path) -> Result<Option<LoopState>> {
        Ok(None)
    }
}

/// What one step hands back.
#[derive(Debug)]
pub struct Step {
    /// Scalar tensors, in the order of [`LoopConfig::names`]; read later, all at once.
    pub losses: Vec<Tensor>,
    /// Values the host already knows (learning rate, counts), logged with the losses.
    pub host: Vec<(&'static str, f64)>,
}

/// The loop's checkpointed state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Steps done.
    pub step: u64,
    /// Values of the steps since the last series point (read, not yet averaged).
    window: Vec<Vec<f64>>,
    /// Series: name -> (step, value), made as [`LoopConfig::points`] says.
    pub curves: BTreeMap<String, Vec<(u64, f64)>>,
}

impl LoopState {
    /// The state after `step` steps with these series (a checkpoint of an older format).
    pub fn at(step: u64, curves: BTreeMap<String, Vec<(u64, f64)>>) -> Self {
        LoopState {
            step,
            window: Vec::new(),
            curves,
        }
    }
}

/// What the loop hands back once every step is done.
#[derive(Debug)]
pub struct Trained {
    /// Steps done, series.
    pub state: LoopState,
    /// The step this run started from (0 unless resumed).
    pub resumed_from: u64,
    /// Seconds spent in this run's steps.
    pub secs: f64,
    /// The last step's values, by name (empty when no step ran in this run).
    pub last: BTreeMap<String, f64>,
    /// Device-to-host reads made inside the steps of this run (0 for a kind whose step reads
    /// nothing; the loop's own reads are not counted).
    pub reads_in_steps: u64,
}

impl Trained {
    /// The series `name` (empty if the loop kept none).
    pub fn curve(&self, name: &str) -> Vec<(u64, f64)> {
        self.state.curves.get(name).cloned().unwrap_or_default()
    }
}

struct Unread {
    step: u64,
    losses: Vec<Tensor>,
    host: Vec<(&'static str, f64)>,
}

/// Run the steps of `recipe` that are left, from its newest checkpoint if it has one.
pub fn run(
    ctx: &mut StageContext,
    ranks: &mut Ranks,
    cfg: &LoopConfig,
    recipe: &mut dyn Recipe,
) -> Result<Trained> {
    let id = ctx.job.id.clone();
    let mut st = resume(ctx, cfg, recipe)?;
    let resumed_from = st.step;
    let mut unread: Vec<Unread> = Vec::new();
    let mut last = BTreeMap::new();
    let mut msg = String::new();
    let mut reads_in_steps = 0;
    let t0 = Instant::now();
    while st.step < cfg.total {
        let before = host_read::reads();
        let out = recipe.step(ctx, ranks, st.step)?;
        reads_in_steps += host_read::reads() - before;
        if out.losses.len() != cfg.names.len() {
            return Err(Error::stage(
                &id,
                format!(
                    "internal: a step returned {} values for {} names",
                    out.losses.len(),
                    cfg.names.len()
                ),
            ));
        }
        st.step += 1;
        let s = st.step;
        unread.push(Unread {
            step: s,
            losses: out.losses,
            host: out.host,
        });
        let finished = s == cfg.total;
        // Past the last step nothing is left to resume: the stage finishes instead.
        let [stop, save] = if finished {
            [false, false]
        } else {
            let due = ranks.is_leader() && ctx.ckpt.due(s);
            ranks.agree([ctx.is_interrupted(), due])?
        };
        let log_now = s == 1 || finished || (cfg.log_every > 0 && s % cfg.log_every == 0);
        if log_now || save || stop || recipe.read_at(s) {
            let values = read(ranks, &mut unread, !cfg.rank_means)?;
            let rate = |n: usize| {
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                ((s - resumed_from) as usize * n) as f64 / secs
            };
            for (step, losses, host) in values {
                let now = (step == s).then_some(Now {
                    log_now,
                    rate: &rate,
                });
                last = publish(ctx, cfg, recipe, &mut st, step, losses, &host, now)?;
            }
            msg = short_line(&last);
            if log_now {
                ctx.log(format!("{} {s}/{}: {}", cfg.unit, cfg.total, line(&last)));
            }
        }
        ctx.progress.set(s, cfg.total, msg.clone());
        if save || stop {
            if ranks.is_leader() {
                checkpoint(ctx, &st, recipe)?;
            }
            if stop {
                ranks.barrier()?;
                return Err(Error::Interrupted);
            }
        }
    }
    last.remove("images_per_sec");
    Ok(Trained {
        state: st,
        resumed_from,
        secs: t0.elapsed().as_secs_f64(),
        last,
        reads_in_steps,
    })
}

/// What [`publish`] needs to know about the step just taken (absent for the earlier steps
/// of the same read).
struct Now<'a> {
    /// The step is logged.
    log_now: bool,
    /// Images per second since the start of this process, given the images per step.
    rate: &'a dyn Fn(usize) -> f64,
}

/// One read step's values: the NaN stop, the recipe's own values (at the step just taken),
/// the throughput, the curves and the stage's series. Returns the values as curves hold them.
#[allow(clippy::too_many_arguments)]
fn publish(
    ctx: &mut StageContext,
    cfg: &LoopConfig,
    recipe: &mut dyn Recipe,
    st: &mut LoopState,
    step: u64,
    losses: Vec<f64>,
    host: &[(&'static str, f64)],
    now: Option<Now>,
) -> Result<BTreeMap<String, f64>> {
    if let (false, Some(hint)) = (losses[0].is_finite(), &cfg.nan_hint) {
        return Err(diverged(ctx, cfg, step, losses[0], hint));
    }
    let mut named: Vec<(&str, f64)> = cfg
        .names
        .iter()
        .copied()
        .zip(losses.iter().copied())
        .collect();
    named.extend(host.iter().copied());
    if let Some(now) = &now {
        named.extend(recipe.after_read(ctx, step, now.log_now)?);
    }
    let mut curves = named.clone();
    if let (Some(n), Some(now)) = (cfg.images_per_step, &now) {
        curves.push(("images_per_sec", (now.rate)(n)));
    }
    ctx.scalars(step, &curves);
    let logged = now.as_ref().is_some_and(|n| n.log_now);
    add_point(st, cfg, step, logged, losses, &named);
    Ok(curves.iter().map(|(k, v)| (k.to_string(), *v)).collect())
}

/// The state of the newest checkpoint (its tensors restored into `recipe`), or a fresh one.
fn resume(ctx: &mut StageContext, cfg: &LoopConfig, recipe: &mut dyn Recipe) -> Result<LoopState> {
    let Some(c) = ctx.ckpt.load()? else {
        return Ok(LoopState::default());
    };
    let file = c.path.join(LOOP_FILE);
    let st: LoopState = if file.is_file() {
        serde_json::from_slice(&fs_err::read(&file)?)
            .map_err(|e| Error::stage(&ctx.job.id, format!("checkpoint {}: {e}", file.display())))?
    } else if let Some(st) = recipe.legacy_state(&c.path)? {
        st
    } else {
        ctx.log(format!(
            "checkpoint {} was written by an older version: training from the start",
            c.path.display()
        ));
        return Ok(LoopState::default());
    };
    if st.step != c.step || st.step > cfg.total {
        return Err(Error::stage(
            &ctx.job.id,
            format!(
                "checkpoint {} holds {} {}, expected {} (at most {}); delete it to train from \
                 the start",
                c.path.display(),
                cfg.unit,
                st.step,
                c.step,
                cfg.total
            ),
        ));
    }
    recipe.load(&c.path, st.step)?;
    ctx.log(format!(
        "resumed from {} {} of {}",
        cfg.unit, st.step, cfg.total
    ));
    Ok(st)
}

/// The error of a non-finite loss at `step`.
fn diverged(ctx: &StageContext, cfg: &LoopConfig, step: u64, v: f64, hint: &str) -> Error {
    let kept = match ctx.ckpt.load() {
        Ok(Some(c)) => format!("{} {}", cfg.unit, c.step),
        _ => "none yet".into(),
    };
    Error::stage(
        &ctx.job.id,
        format!(
            "{} is non-finite ({v}) at {} {step} of {}: training diverged; {hint}; the last \
             good checkpoint ({kept}) is kept",
            cfg.names[0], cfg.unit, cfg.total
        ),
    )
}

/// Adds a read step's values to the series, as [`LoopConfig::points`] says.
fn add_point(
    st: &mut LoopState,
    cfg: &LoopConfig,
    step: u64,
    logged: bool,
    losses: Vec<f64>,
    named: &[(&str, f64)],
) {
    match cfg.points {
        Points::Means(n) => {
            st.window.push(losses);
            if step % n.max(1) == 0 || step == cfg.total {
                close_window(st, &cfg.names, step);
            }
        }
        Points::Logged if logged => {
            for &(name, v) in named.iter().filter(|(_, v)| v.is_finite()) {
                st.curves
                    .entry(name.to_string())
                    .or_default()
                    .push((step, v));
            }
        }
        Points::Logged => {}
    }
}

/// Checkpoint the finished training (e.g. before a long evaluation that may be interrupted).
pub fn checkpoint(ctx: &mut StageContext, st: &LoopState, recipe: &dyn Recipe) -> Result<()> {
    let bytes = serde_json::to_vec(st)?;
    ctx.ckpt.save(st.step, |dir| {
        recipe.save(dir)?;
        fs_err::write(dir.join(LOOP_FILE), &bytes)?;
        Ok(())
    })
}

type Read = (u64, Vec<f64>, Vec<(&'static str, f64)>);

/// The values of the unread steps, in one device read (averaged over the ranks with `mean`).
fn read(ranks: &mut Ranks, unread: &mut Vec<Unread>, mean: bool) -> Result<Vec<Read>> {
    if unread.is_empty() {
        return Ok(Vec::new());
    }
    let per = unread[0].losses.len();
    let all: Vec<Tensor> = unread
        .iter()
        .flat_map(|u| u.losses.iter())
        .map(|t| t.detach().to_dtype(DType::F64)?.reshape(()))
        .collect::<candle_core::Result<_>>()?;
    let mut flat: Vec<f64> = if all.is_empty() {
        Vec::new()
    } else {
        host_read::vec1::<f64>(&Tensor::stack(&all, 0)?)?
    };
    if mean && ranks.world() > 1 {
        let as32: Vec<f32> = flat.iter().map(|&v| v as f32).collect();
        flat = ranks
            .mean_scalars(&as32)?
            .into_iter()
            .map(f64::from)
            .collect();
    }
    Ok(unread
        .drain(..)
        .enumerate()
        .map(|(i, u)| (u.step, flat[i * per..(i + 1) * per].to_vec(), u.host))
        .collect())
}

/// Average the window into one point per name at `step`.
fn close_window(st: &mut LoopState, names: &[&'static str], step: u64) {
    if st.window.is_empty() {
        return;
    }
    for (j, name) in names.iter().enumerate() {
        let sum: f64 = st.window.iter().map(|v| v[j]).sum();
        st.curves
            .entry(name.to_string())
            .or_default()
            .push((step, sum / st.window.len() as f64));
    }
    st.window.clear();
}

/// The progress line: the loss, and the throughput when the loop measures it.
fn short_line(values: &BTreeMap<String, f64>) -> String {
    let mut parts = Vec::new();
    if let Some(l) = values.get("loss") {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(ips) = values.get("images_per_sec") {
        parts.push(format!("{ips:.1} img/s"));
    }
    parts.join(" ")
}

/// The log line: every value read.
fn line(values: &BTreeMap<String, f64>) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(l) = values.get("loss") {
        parts.push(format!("loss {l:.4}"));
    }
    for (k, v) in values {
        if k == "loss" || !v.is_finite() {
            continue;
        }
        if k == "lr" {
            parts.push(format!("lr {v:.3e}"));
        } else if v.fract() == 0.0 && v.abs() < 1e9 {
            parts.push(format!("{k} {v}"));
        } else {
            parts.push(format!("{k} {v:.4}"));
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_window_averages_into_one_point() {
        let mut st = LoopState::default();
        st.window = vec![vec![1.0, 10.0], vec![3.0, 20.0]];
        close_window(&mut st, &["loss", "aux"], 2);
        assert_eq!(st.curves["loss"], vec![(2, 2.0)]);
        assert_eq!(st.curves["aux"], vec![(2, 15.0)]);
        assert!(st.window.is_empty());
        close_window(&mut st, &["loss", "aux"], 3);
        assert_eq!(st.curves["loss"].len(), 1, "an empty window adds nothing");
    }

    #[test]
    fn the_log_line_names_each_value() {
        let v: BTreeMap<String, f64> = [("loss", 0.5), ("lr", 1e-3), ("num_pos", 12.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(line(&v), "loss 0.5000 lr 1.000e-3 num_pos 12");
    }

    #[test]
    fn unread_steps_come_back_in_one_read() {
        let dev = Device::Cpu;
        let mut unread: Vec<Unread> = (1..=3)
            .map(|s| Unread {
                step: s,
                losses: vec![
                    Tensor::new(s as f32, &dev).unwrap(),
                    Tensor::new(&[2.0 * s as f32], &dev).unwrap(),
                ],
                host: vec![("lr", 0.1)],
            })
            .collect();
        let mut ranks = Ranks::single(&dev);
        let before = host_read::reads();
        let got = read(&mut ranks, &mut unread, true).unwrap();
        assert_eq!(host_read::reads() - before, 1);
        assert!(unread.is_empty());
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].0, 3);
        assert_eq!(got[2].1, vec![3.0, 6.0]);
        assert_eq!(got[2].2, vec![("lr", 0.1)]);
    }
}

#[cfg(test)]
mod loop_tests;

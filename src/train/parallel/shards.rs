//! The training step with the batch split into shards, each trained on its own threads.
//!
//! On the CPU, splitting each matrix product over the threads leaves them waiting for each other
//! after every one of the step's thousands of small ops. Here the batch is cut into `n` equal
//! shards instead, and each shard runs the whole forward and backward pass on its own thread
//! pool, exactly as a rank of a data-parallel group does
//! ([`crate::train::step::train_step_pending`]): the JEPA term is the shard's mean, the VICReg
//! terms are computed on the whole batch (gathered through an in-process all-reduce,
//! [`super::comm::local`]), and the gradients are averaged over the shards in shard order. The
//! optimiser step and the EMA then run once, on all threads.
//!
//! The result is the one-shard step's up to the order of float sums; for a given shard count it
//! is the same from run to run, so a resumed run reproduces an uninterrupted one exactly.

use std::collections::HashMap;

use candle_core::Tensor;

use super::comm::local::{local_group, LocalComm};
use super::comm::{AllReduce, DistError};
use crate::model::JepaNetworks;
use crate::train::fused_update::mean_of;
use crate::train::loss::LossConfig;
use crate::train::optim::AdamW;
use crate::train::step::{
    forward_loss_timed, pending_values, update, Batch, Lap, PendingLosses, PhaseTimes, StepError,
    StepHyper,
};

/// The environment variable that sets the shard count of the `pretrain` stage on the CPU: a
/// number (`1` turns sharding off) or `auto` (the default, [`ThreadShards::auto`]).
pub const SHARDS_ENV: &str = "CJEPA_SHARDS";

/// Most shards [`ThreadShards::auto`] picks: each keeps its own copy of the gradients until they
/// are averaged.
pub const MAX_AUTO_SHARDS: usize = 4;

/// The thread pools of the shards (one per shard, the threads shared out evenly).
pub struct ThreadShards {
    pools: Vec<rayon::ThreadPool>,
}

impl std::fmt::Debug for ThreadShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let threads: Vec<usize> = self.pools.iter().map(|p| p.current_num_threads()).collect();
        f.debug_struct("ThreadShards")
            .field("threads", &threads)
            .finish()
    }
}

impl ThreadShards {
    /// `shards` pools sharing `threads` threads (at least one each).
    pub fn new(shards: usize, threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let shards = shards.max(1);
        let pools = (0..shards)
            .map(|k| {
                let n = (threads / shards + usize::from(k < threads % shards)).max(1);
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(move |i| format!("shard{k}-{i}"))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { pools })
    }

    /// Number of shards.
    pub fn count(&self) -> usize {
        self.pools.len()
    }

    /// The number of shards a CPU step of `batch` images on `threads` threads uses by default:
    /// one per thread, at most [`MAX_AUTO_SHARDS`], lowered until it divides the batch (the
    /// shards must be equal for the mean of their losses to be the batch's).
    pub fn auto(threads: usize, batch: usize) -> usize {
        let mut n = threads.clamp(1, MAX_AUTO_SHARDS);
        while n > 1 && !batch.is_multiple_of(n) {
            n -= 1;
        }
        n
    }
}

/// The shard count for a CPU step of `batch` images on `threads` threads, from `setting` (the
/// value of [`SHARDS_ENV`] or of a command-line option, named `name` in the error), if set: `auto`
/// or unset picks [`ThreadShards::auto`]; a number must divide the batch. The error says what to
/// set instead.
pub fn shard_count(
    name: &str,
    setting: Option<&str>,
    threads: usize,
    batch: usize,
) -> Result<usize, String> {
    match setting.map(str::trim) {
        None | Some("") | Some("auto") => Ok(ThreadShards::auto(threads, batch)),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 && batch.is_multiple_of(n) => Ok(n),
            Ok(n) if n > 0 => Err(format!(
                "{name}={v}: a batch of {batch} images does not split into {n} equal \
                 shards; set a divisor of the batch, `auto`, or 1 to train without shards"
            )),
            _ => Err(format!(
                "{name}={v}: not a shard count; set a positive number, `auto`, or 1 to \
                 train without shards"
            )),
        },
    }
}

/// Rows `k * b .. (k + 1) * b` of the batch.
fn shard_of(
    batch: &Batch,
    k: usize,
    b: usize,
) -> candle_core::Result<(Tensor, Vec<Tensor>, Vec<Tensor>)> {
    let rows = |t: &Tensor| t.narrow(0, k * b, b);
    Ok((
        rows(batch.images)?,
        batch
            .masks_enc
            .iter()
            .map(rows)
            .collect::<candle_core::Result<_>>()?,
        batch
            .masks_pred
            .iter()
            .map(rows)
            .collect::<candle_core::Result<_>>()?,
    ))
}

/// A shard's named gradients, the batch's loss values and z_t of the global batch.
type ShardOut = (HashMap<String, Tensor>, Tensor, Tensor);

/// Forward and backward of shard `k`: its named gradients and the batch's mean loss values. A
/// shard that fails aborts the group, releasing the others from the reductions they wait in.
fn run_shard(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    opt: &AdamW,
    k: usize,
    comm: &mut LocalComm,
    times: Option<&mut PhaseTimes>,
) -> Result<ShardOut, StepError> {
    let r = (|| -> Result<ShardOut, StepError> {
        let b = batch.images.dim(0)? / comm.world();
        let (images, masks_enc, masks_pred) = shard_of(batch, k, b)?;
        let shard = Batch {
            images: &images,
            masks_enc: &masks_enc,
            masks_pred: &masks_pred,
        };
        let mut lap = Lap::new(times, images.device());
        let fwd = forward_loss_timed(nets, &shard, cfg, &mut lap, comm)?;
        let losses = pending_values(&fwd.loss, &fwd.z_t_global, comm)?;
        let z_t = fwd.z_t_global.detach();
        lap.mark(|t| &mut t.loss);
        let grads = fwd.backward_root.backward()?;
        drop(fwd);
        let named = opt.named_grads(&grads);
        drop(grads);
        lap.mark(|t| &mut t.backward);
        Ok((named, losses, z_t))
    })();
    if r.is_err() {
        comm.abort();
    }
    r
}

/// One training step with the batch split over `shards` (see the module's documentation). The
/// batch must divide into equal shards. `times` gets shard 0's forward and backward phases (the
/// shards run at the same time) and the optimiser's and the EMA's.
///
/// The step's values are left unread (see [`crate::train::step::train_step_pending`]).
pub fn train_step_sharded(
    nets: &JepaNetworks,
    batch: &Batch,
    cfg: &LossConfig,
    opt: &mut AdamW,
    hyper: StepHyper,
    shards: &ThreadShards,
    times: Option<&mut PhaseTimes>,
) -> Result<PendingLosses, StepError> {
    let n = shards.count();
    let size = batch.images.dim(0)?;
    if !size.is_multiple_of(n) {
        return Err(StepError::Dist(DistError::Protocol {
            rank: 0,
            msg: format!("a batch of {size} images does not split into {n} equal shards"),
        }));
    }
    let mut shard_times = PhaseTimes::default();
    let want_times = times.is_some();
    let opt_ref: &AdamW = opt;
    let results: Vec<Result<ShardOut, StepError>> = std::thread::scope(|s| {
        let mut comms = local_group(n).into_iter();
        let mut comm0 = comms.next().expect("a group has rank 0");
        let handles: Vec<_> = comms
            .enumerate()
            .map(|(i, mut comm)| {
                let pool = &shards.pools[i + 1];
                s.spawn(move || {
                    pool.install(|| run_shard(nets, batch, cfg, opt_ref, i + 1, &mut comm, None))
                })
            })
            .collect();
        let t0 = want_times.then_some(&mut shard_times);
        let first =
            shards.pools[0].install(|| run_shard(nets, batch, cfg, opt_ref, 0, &mut comm0, t0));
        let mut all = vec![first];
        for h in handles {
            match h.join() {
                Ok(r) => all.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    });
    let (outs, errs): (Vec<_>, Vec<_>) = results.into_iter().partition(|r| r.is_ok());
    if !errs.is_empty() {
        let mut errs: Vec<StepError> = errs.into_iter().filter_map(Result::err).collect();
        // the shard that failed, not the ones its failure released
        let at = errs.iter().position(|e| !is_release(e)).unwrap_or(0);
        return Err(errs.swap_remove(at));
    }
    let outs: Vec<ShardOut> = outs.into_iter().filter_map(Result::ok).collect();
    let (values, z_t) = (outs[0].1.clone(), outs[0].2.clone());
    let mut per_shard: Vec<HashMap<String, Tensor>> = outs.into_iter().map(|(g, _, _)| g).collect();
    let mut lap = Lap::new(
        times.map(|t| {
            *t += shard_times;
            t
        }),
        batch.images.device(),
    );
    let names: Vec<String> = per_shard[0].keys().cloned().collect();
    let mut named = HashMap::with_capacity(names.len());
    for name in names {
        let parts = per_shard
            .iter_mut()
            .map(|g| {
                g.remove(&name).ok_or_else(|| DistError::Protocol {
                    rank: 0,
                    msg: format!("a shard has no gradient for {name}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        named.insert(name, mean_of(&parts)?);
    }
    drop(per_shard);
    lap.mark(|t| &mut t.backward);
    let optim = update(nets, opt, named, hyper, &mut lap)?;
    Ok(PendingLosses::new(values, optim, z_t))
}

/// The error of a shard released by another one's failure.
fn is_release(e: &StepError) -> bool {
    matches!(e, StepError::Dist(DistError::PeerStopped { .. }))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::fused::testutil::randn;
    use crate::model::VitConfig;
    use crate::train::optim::AdamWConfig;
    use crate::train::step::train_step;
    use crate::train::testutil::{host_masks, tiny_vit};

    const HYPER: StepHyper = StepHyper {
        lr: 1e-3,
        wd: 0.04,
        momentum: 0.99,
    };

    fn cfg() -> VitConfig {
        tiny_vit()
    }

    fn masks(batch: usize, seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
        host_masks(&cfg(), batch, seed)
    }

    /// Runs three steps with `shards` shards (0: the one-shard `train_step`); the loss values and
    /// gradient norm of each step, and the final online and target weights.
    fn run(shards: usize) -> (Vec<f32>, Vec<f32>) {
        let batch = 6;
        let nets = JepaNetworks::new_random(&cfg(), 3, &Device::Cpu).unwrap();
        // a clipping bound that never clips, for the gradient norm
        let opt_cfg = AdamWConfig {
            clip_grad_norm: Some(1e9),
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(nets.online_vars(), opt_cfg).unwrap();
        let pools = (shards > 0).then(|| ThreadShards::new(shards, 2).unwrap());
        let loss_cfg = LossConfig::cjepa();
        let mut losses = Vec::new();
        for step in 0..3u64 {
            let images = randn(&[batch, 3, 32, 32], step);
            let (enc, pred) = masks(batch, step);
            let b = Batch {
                images: &images,
                masks_enc: &enc,
                masks_pred: &pred,
            };
            let l = match &pools {
                Some(p) => train_step_sharded(&nets, &b, &loss_cfg, &mut opt, HYPER, p, None)
                    .and_then(|l| l.read()),
                None => train_step(&nets, &b, &loss_cfg, &mut opt, HYPER),
            }
            .unwrap();
            let norm = l.optim.grad_norm.unwrap() as f32;
            losses.extend([l.total, l.jepa, l.sim, l.std, l.cov, norm]);
        }
        let mut weights = Vec::new();
        for (_, v) in nets.online_vars().into_iter().chain(nets.target_vars()) {
            weights.extend(v.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        (losses, weights)
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / (1e-3 + x.abs().max(y.abs())))
            .fold(0.0, f32::max)
    }

    #[test]
    fn shards_give_the_one_shard_steps_and_repeat_exactly() {
        let seeded = run;
        let (l1, w1) = seeded(0);
        for shards in [2, 3] {
            let (l, w) = seeded(shards);
            assert!(
                max_rel(&l, &l1) < 1e-4,
                "{shards} shards: losses {l:?} vs {l1:?}"
            );
            assert!(max_rel(&w, &w1) < 1e-3, "{shards} shards: weights differ");
            let (l_again, w_again) = seeded(shards);
            assert_eq!(l, l_again, "{shards} shards: losses repeat exactly");
            assert_eq!(w, w_again, "{shards} shards: weights repeat exactly");
        }
    }

    /// The error of one two-shard step on zero images with these masks.
    fn two_shard_step_error(batch: usize, enc: &[Tensor], pred: &[Tensor]) -> StepError {
        let nets = JepaNetworks::new_random(&cfg(), 3, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(nets.online_vars(), AdamWConfig::default()).unwrap();
        let shape = (batch, 3, 32, 32);
        let images = Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Batch {
            images: &images,
            masks_enc: enc,
            masks_pred: pred,
        };
        let pools = ThreadShards::new(2, 2).unwrap();
        train_step_sharded(
            &nets,
            &b,
            &LossConfig::cjepa(),
            &mut opt,
            HYPER,
            &pools,
            None,
        )
        .and_then(|l| l.read())
        .unwrap_err()
    }

    #[test]
    fn a_batch_that_does_not_split_evenly_is_an_error() {
        let (enc, pred) = masks(5, 0);
        let e = two_shard_step_error(5, &enc, &pred);
        assert!(
            e.to_string().contains("does not split into 2 equal shards"),
            "{e}"
        );
    }

    #[test]
    fn a_failing_shard_fails_the_step_without_hanging() {
        // The first target mask has 3 rows for a batch of 4: shard 1 cannot take its rows 2..4
        // and fails before the first all-reduce, where shard 0 waits for it.
        let (enc, mut pred) = masks(4, 0);
        pred[0] = pred[0].narrow(0, 0, 3).unwrap();
        let e = two_shard_step_error(4, &enc, &pred);
        assert!(!is_release(&e), "the root cause, not the release: {e}");
    }

    #[test]
    fn the_setting_is_auto_a_divisor_or_an_error_that_names_the_fix() {
        assert_eq!(shard_count(SHARDS_ENV, None, 2, 32), Ok(2));
        assert_eq!(shard_count(SHARDS_ENV, Some("auto"), 4, 6), Ok(3));
        assert_eq!(shard_count(SHARDS_ENV, Some("1"), 2, 32), Ok(1));
        assert_eq!(shard_count(SHARDS_ENV, Some(" 4 "), 2, 32), Ok(4));
        let e = shard_count(SHARDS_ENV, Some("3"), 2, 32).unwrap_err();
        assert!(
            e.contains("CJEPA_SHARDS=3") && e.contains("does not split"),
            "{e}"
        );
        for bad in ["0", "two", "-1"] {
            let e = shard_count(SHARDS_ENV, Some(bad), 2, 32).unwrap_err();
            assert!(e.contains("not a shard count"), "{e}");
        }
    }

    #[test]
    fn auto_picks_one_shard_per_thread_dividing_the_batch() {
        assert_eq!(ThreadShards::auto(1, 32), 1);
        assert_eq!(ThreadShards::auto(2, 32), 2);
        assert_eq!(ThreadShards::auto(2, 7), 1);
        assert_eq!(ThreadShards::auto(16, 24), 4);
        assert_eq!(ThreadShards::auto(3, 8), 2);
        let p = ThreadShards::new(3, 8).unwrap();
        let threads: Vec<usize> = p.pools.iter().map(|p| p.current_num_threads()).collect();
        assert_eq!(threads, vec![3, 3, 2]);
    }
}

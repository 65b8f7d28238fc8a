//! The all-reduce between threads of one process: the ranks are the shards of a batch trained on
//! separate threads ([`crate::train::parallel::shards`]). Each call sums the ranks' buffers in rank order,
//! so the result is the same on every rank and from run to run.
//!
//! A rank that stops early (an error, a panic) aborts the group: the others, waiting in a
//! reduction that can no longer complete, get an error instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{DType, Tensor};

use super::{AllReduce, DistError};

#[derive(Debug, Default)]
struct State {
    /// Buffers of the reduction in progress, by rank.
    slots: Vec<Option<Vec<f32>>>,
    /// Ranks that have deposited their buffer in the reduction in progress.
    arrived: usize,
    /// Reductions completed so far.
    done: u64,
    /// The sum of the last completed reduction.
    result: Option<Arc<Vec<f32>>>,
    /// A rank stopped before the others; no reduction can complete any more.
    aborted: Option<usize>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One rank's end of an in-process group; `Send`, so each shard's thread owns one.
#[derive(Debug)]
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

/// The `world` ends of a new group, rank 0 first.
pub fn local_group(world: usize) -> Vec<LocalComm> {
    let world = world.max(1);
    let shared = Arc::new(Shared {
        world,
        state: Mutex::new(State {
            slots: vec![None; world],
            ..State::default()
        }),
        wake: Condvar::new(),
    });
    (0..world)
        .map(|rank| LocalComm {
            rank,
            shared: Arc::clone(&shared),
        })
        .collect()
}

impl LocalComm {
    /// Tells the other ranks that this one will not take part in any further reduction.
    pub fn abort(&self) {
        let mut st = self.shared.lock();
        st.aborted.get_or_insert(self.rank);
        self.shared.wake.notify_all();
    }

    fn aborted(&self, by: usize) -> DistError {
        DistError::PeerStopped {
            rank: self.rank,
            peer: by,
        }
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort();
        }
    }
}

impl AllReduce for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor, DistError> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(flat.clone());
        }
        let mine = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let len = mine.len();
        let mut st = self.shared.lock();
        if let Some(by) = st.aborted {
            return Err(self.aborted(by));
        }
        // A round cannot complete without this rank, so the one this rank joins is `done`.
        let round = st.done;
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == world {
            let mut sum = vec![0f32; len];
            let mut bad = None;
            for (r, slot) in st.slots.iter_mut().enumerate() {
                let part = slot.take().unwrap_or_default();
                if part.len() != len {
                    bad = Some((r, part.len()));
                    continue;
                }
                for (s, v) in sum.iter_mut().zip(&part) {
                    *s += v;
                }
            }
            st.arrived = 0;
            st.done += 1;
            st.result = Some(Arc::new(sum));
            if let Some((r, n)) = bad {
                st.aborted.get_or_insert(r);
                self.shared.wake.notify_all();
                return Err(DistError::Protocol {
                    rank: self.rank,
                    msg: format!("shard {r} sent {n} values where the others sent {len}"),
                });
            }
            self.shared.wake.notify_all();
        } else {
            while st.done == round && st.aborted.is_none() {
                st = self.shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            // An abort, even one just after this round, means the group is failing anyway.
            if let Some(by) = st.aborted {
                return Err(self.aborted(by));
            }
        }
        let sum = st.result.clone().unwrap_or_default();
        drop(st);
        Ok(Tensor::from_slice(&sum, len, flat.device())?.to_dtype(flat.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_rank_gets_the_sum_in_rank_order_round_after_round() {
        let comms = local_group(3);
        let out: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        (0..50)
                            .map(|round| {
                                let r = c.rank() as f32;
                                let x = t(&[r, round as f32, 1e8, -1e8 + r]);
                                c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap()
                            })
                            .collect()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for round in 0..50 {
            let r = round as f32;
            // rank order: ((0 + 1) + 2) for each element, as one process would add them
            let want = vec![
                3.0,
                3.0 * r,
                1e8f32 + 1e8 + 1e8,
                (-1e8f32 + 0.0) + (-1e8 + 1.0) + (-1e8 + 2.0),
            ];
            for rank in &out {
                assert_eq!(rank[round], want);
            }
        }
    }

    #[test]
    fn a_rank_that_stops_releases_the_others_with_an_error() {
        let mut comms = local_group(2);
        let c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        let err = std::thread::scope(|s| {
            let h = s.spawn(move || c0.all_reduce_sum(&t(&[1.0])));
            std::thread::sleep(std::time::Duration::from_millis(20));
            c1.abort();
            h.join().unwrap()
        })
        .unwrap_err();
        assert!(err.to_string().contains("shard 1 stopped"), "{err}");
    }

    #[test]
    fn a_panicking_rank_aborts_the_group() {
        let mut comms = local_group(2);
        let c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(move || c0.all_reduce_sum(&t(&[1.0])));
            let panicker = s.spawn(move || {
                let _c = c1;
                panic!("shard failed");
            });
            assert!(panicker.join().is_err());
            assert!(waiter.join().unwrap().is_err());
        });
    }

    #[test]
    fn buffers_of_different_lengths_are_an_error() {
        let comms = local_group(2);
        let res: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let n = 1 + c.rank();
                        c.all_reduce_sum(&t(&vec![1.0; n]))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(res.iter().all(|r| r.is_err()));
    }
}

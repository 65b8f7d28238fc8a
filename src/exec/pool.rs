//! The local resource pool: CPU threads and GPUs by index.

use crate::spec::Resources;

/// What a running stage holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Grant {
    /// CPU threads.
    pub threads: usize,
    /// GPU indices.
    pub gpus: Vec<u32>,
}

/// Free resources.
#[derive(Debug, Clone)]
pub struct Pool {
    total_threads: usize,
    free_threads: usize,
    free_gpus: Vec<u32>,
    total_gpus: usize,
    jobs: usize,
}

impl Pool {
    /// A pool of `threads` CPU threads and the given GPUs, for at most `jobs` stages at once.
    pub fn new(threads: usize, gpus: Vec<u32>, jobs: usize) -> Self {
        let threads = threads.max(1);
        Pool {
            total_threads: threads,
            free_threads: threads,
            total_gpus: gpus.len(),
            free_gpus: gpus,
            jobs: jobs.max(1),
        }
    }

    /// Threads a stage asks for: its `cpus`, else a fair share of the pool.
    pub fn want_threads(&self, r: &Resources) -> usize {
        if r.cpus > 0 {
            (r.cpus as usize).min(self.total_threads)
        } else {
            (self.total_threads / self.jobs).max(1)
        }
    }

    /// GPUs a stage gets: what it asks for, capped by what exists (none on a CPU machine: the
    /// stage then runs on the CPU).
    pub fn want_gpus(&self, r: &Resources) -> usize {
        (r.gpus as usize).min(self.total_gpus)
    }

    /// Try to take resources for a stage; `running` = stages running now.
    pub fn try_take(&mut self, r: &Resources, running: usize) -> Option<Grant> {
        if running >= self.jobs {
            return None;
        }
        let t = self.want_threads(r);
        let g = self.want_gpus(r);
        let threads_ok = self.free_threads >= t || running == 0;
        if !threads_ok || self.free_gpus.len() < g {
            return None;
        }
        let t = t.min(self.free_threads.max(1));
        self.free_threads = self.free_threads.saturating_sub(t);
        let gpus = self.free_gpus.drain(..g).collect();
        Some(Grant { threads: t, gpus })
    }

    /// Return a grant.
    pub fn give_back(&mut self, g: Grant) {
        self.free_threads = (self.free_threads + g.threads).min(self.total_threads);
        self.free_gpus.extend(g.gpus);
        self.free_gpus.sort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_threads_and_gpus() {
        let mut p = Pool::new(4, vec![0, 1], 2);
        let r = Resources {
            gpus: 1,
            ..Default::default()
        };
        let a = p.try_take(&r, 0).unwrap();
        assert_eq!((a.threads, a.gpus.clone()), (2, vec![0]));
        let b = p.try_take(&r, 1).unwrap();
        assert_eq!(b.gpus, vec![1]);
        assert!(p.try_take(&r, 2).is_none(), "jobs limit");
        p.give_back(a);
        assert_eq!(p.try_take(&r, 1).unwrap().gpus, vec![0]);
    }

    #[test]
    fn gpu_requests_on_a_cpu_machine_run_on_cpu() {
        let mut p = Pool::new(2, vec![], 1);
        let g = p
            .try_take(
                &Resources {
                    gpus: 8,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        assert!(g.gpus.is_empty());
    }
}

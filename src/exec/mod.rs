//! Running stages: the executors' shared core (cache decisions, job preparation, events), the
//! local scheduler with its resource pool, the Slurm executor, result import shared by both, the
//! `exec-stage` worker that runs one stage through its kind's hooks, the launcher of a
//! data-parallel stage's ranks, and signal handling. The stage contract itself (job files,
//! checkpointer, progress files, live curves) is in [`crate::kind`].

pub mod core;
pub mod import;
pub mod local;
pub mod pool;
pub mod signals;
pub mod slurm;
pub mod worker;

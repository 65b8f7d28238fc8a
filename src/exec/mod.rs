//! Running stages: the job file, the `exec-stage` worker, the local scheduler with its resource
//! pool, the Slurm executor, result import shared by both, the checkpointer handed to stages,
//! progress files and signal handling.

pub mod checkpoint;
pub mod dist;
pub mod import;
pub mod job;
pub mod local;
pub mod pool;
pub mod proc;
pub mod progress;
pub mod ranks;
pub mod signals;
pub mod slurm;
pub mod tensorboard;
pub mod worker;

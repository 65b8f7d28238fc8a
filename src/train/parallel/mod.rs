//! Data parallel, in one place: a stage trains on shards of each global batch, and after the
//! backward pass the shards' gradients are averaged, so every shard applies the same update.
//!
//! One trait, [`comm::AllReduce`], sums buffers over the shards; two kinds of shards implement
//! it:
//! - **in-process shards** ([`shards`]): the batch cut into `n` pieces, each trained on its own
//!   thread pool in one process ([`comm::local`]); used by `pretrain` on the CPU;
//! - **ranks**: one process per GPU or per CPU slice, started by [`launch`] (child processes or
//!   one `srun`), meeting through the job's `dist/` folder ([`group`]) over TCP ([`comm::tcp`]) or
//!   NCCL ([`comm::nccl`]); a stage's loop sees them through [`ranks::Ranks`] (its shard of each
//!   batch, the gradient mean, the agreed stop on an interrupt), and [`ranks::check_plan`] refuses
//!   a global batch that does not split when the pipeline is planned.
//!
//! With one shard every operation is the identity ([`comm::Single`]).

pub mod comm;
pub mod group;
pub mod launch;
pub mod ranks;
pub mod shards;

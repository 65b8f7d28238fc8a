//! Data-parallel training: the gradient all-reduce behind one small trait.
//!
//! Every rank runs the same loop on its shard of each global batch; after the backward pass the
//! gradients of all ranks are summed (one flattened f32 buffer, parameters sorted by name) and
//! divided by the world size, so every rank applies the same optimiser step to the same weights.
//! Implementations: [`Single`] (one process, no communication), [`tcp::TcpHub`] (processes on
//! CPU, rank 0 sums in rank order over local sockets: exact and deterministic) and, with the
//! `nccl` feature, [`nccl::Nccl`] (one process per GPU), and [`local`] (the shards of one batch on
//! threads of one process). Processes meet through files in a shared
//! folder ([`rendezvous`]).

pub mod local;
pub mod rendezvous;
pub mod tcp;

#[cfg(feature = "nccl")]
pub mod nccl;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// Errors of the collective operations.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A socket or rendezvous file failed.
    #[error("rank {rank}: {what}: {source}")]
    Io {
        /// This rank.
        rank: usize,
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Ranks disagree (buffer sizes, world size) or a peer broke the protocol.
    #[error("rank {rank}: {msg}")]
    Protocol {
        /// This rank.
        rank: usize,
        /// What is wrong.
        msg: String,
    },
    /// Another rank of an in-process group ([`local`]) stopped before the others; the reduction
    /// this rank waited in can no longer complete.
    #[error("rank {rank}: shard {peer} stopped before the others")]
    PeerStopped {
        /// This rank.
        rank: usize,
        /// The rank that stopped.
        peer: usize,
    },
    /// The NCCL library failed.
    #[error("rank {rank}: NCCL: {msg}")]
    Nccl {
        /// This rank.
        rank: usize,
        /// The failure.
        msg: String,
    },
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A group of `world` processes that sum buffers elementwise.
pub trait AllReduce {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world(&self) -> usize;
    /// Elementwise sum over all ranks of a 1-D f32 tensor; every rank receives the same values.
    /// Every rank must call it with the same length, in the same order of calls.
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor, DistError>;
}

/// One process: the sum over one rank is the buffer itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Single;

impl AllReduce for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor, DistError> {
        Ok(flat.clone())
    }
}

/// The mean over ranks of named gradients: one flattened f32 buffer in name order, summed, then
/// scaled by `1 / world`; shapes and dtypes are restored. With one rank the map is returned as is.
pub fn mean_grads(
    comm: &mut dyn AllReduce,
    grads: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, DistError> {
    let world = comm.world();
    if world == 1 || grads.is_empty() {
        return Ok(grads);
    }
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let parts = names
        .iter()
        .map(|n| grads[*n].flatten_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flat = Tensor::cat(&parts, 0)?;
    let mean = comm
        .all_reduce_sum(&flat)?
        .affine(1.0 / world as f64, 0.0)?;
    let mut out = HashMap::with_capacity(grads.len());
    let mut off = 0;
    for n in names {
        let g = &grads[n];
        let len = g.elem_count();
        let v = mean
            .narrow(0, off, len)?
            .reshape(g.dims())?
            .to_dtype(g.dtype())?;
        off += len;
        out.insert(n.clone(), v);
    }
    Ok(out)
}

/// The mean over ranks of a few scalars (losses, monitors), computed on `dev`.
pub fn mean_scalars(
    comm: &mut dyn AllReduce,
    values: &[f32],
    dev: &Device,
) -> Result<Vec<f32>, DistError> {
    let world = comm.world();
    if world == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::from_slice(values, values.len(), dev)?;
    let sum = comm.all_reduce_sum(&t)?.to_vec1::<f32>()?;
    Ok(sum.into_iter().map(|s| s / world as f32).collect())
}

/// True on every rank when `flag` is true on at least one (e.g. "stop now": all ranks then stop
/// at the same step).
pub fn any(comm: &mut dyn AllReduce, flag: bool, dev: &Device) -> Result<bool, DistError> {
    if comm.world() == 1 {
        return Ok(flag);
    }
    let t = Tensor::from_slice(&[f32::from(u8::from(flag))], 1, dev)?;
    Ok(comm.all_reduce_sum(&t)?.to_vec1::<f32>()?[0] > 0.0)
}

/// Every rank's `(b, ...)` tensor stacked in rank order, `(world * b, ...)`, on every rank (the
/// all-gather of the official VICReg's `FullGatherLayer`), built on the all-reduce: each rank
/// contributes a zero buffer holding its rows at its own offset, so the sum is exact. Every rank
/// must pass the same shape. The result carries no gradient (see [`with_own_rows`]).
pub fn all_gather_rows(comm: &mut dyn AllReduce, t: &Tensor) -> Result<Tensor, DistError> {
    let (rank, world) = (comm.rank(), comm.world());
    if world == 1 {
        return Ok(t.detach());
    }
    let n = t.elem_count();
    let dev = t.device();
    let mut parts = Vec::with_capacity(3);
    if rank > 0 {
        parts.push(Tensor::zeros(rank * n, DType::F32, dev)?);
    }
    parts.push(t.detach().flatten_all()?.to_dtype(DType::F32)?);
    if rank + 1 < world {
        parts.push(Tensor::zeros((world - rank - 1) * n, DType::F32, dev)?);
    }
    let sum = comm.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
    let mut dims = t.dims().to_vec();
    if let Some(d0) = dims.first_mut() {
        *d0 *= world;
    }
    Ok(sum.reshape(dims)?.to_dtype(t.dtype())?)
}

/// `gathered` (from [`all_gather_rows`]) with this rank's block of rows replaced by `own`, which
/// keeps its gradient: a loss over the global batch then back-propagates into this rank's rows
/// only, the other ranks' rows being constants here.
pub fn with_own_rows(gathered: &Tensor, own: &Tensor, rank: usize) -> Result<Tensor, DistError> {
    let b = own.dim(0)?;
    let total = gathered.dim(0)?;
    if (rank + 1) * b > total {
        return Err(DistError::Protocol {
            rank,
            msg: format!("{b} own rows at rank {rank} do not fit {total} gathered rows"),
        });
    }
    let mut parts = Vec::with_capacity(3);
    if rank > 0 {
        parts.push(gathered.narrow(0, 0, rank * b)?);
    }
    parts.push(own.clone());
    if (rank + 1) * b < total {
        parts.push(gathered.narrow(0, (rank + 1) * b, total - (rank + 1) * b)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// The sum over ranks of a few scalars (counts for normalisers), computed on `dev`.
pub fn sum_scalars(
    comm: &mut dyn AllReduce,
    values: &[f32],
    dev: &Device,
) -> Result<Vec<f32>, DistError> {
    if comm.world() == 1 {
        return Ok(values.to_vec());
    }
    let t = Tensor::from_slice(values, values.len(), dev)?;
    Ok(comm.all_reduce_sum(&t)?.to_vec1::<f32>()?)
}

/// Rows `rank, rank + world, ...` of a list of per-image items: the images of a global batch
/// that a rank's sharded loader holds (see `Loader::sharded`).
pub fn shard_rows<T: Clone>(rows: &[T], rank: usize, world: usize) -> Vec<T> {
    rows.iter()
        .skip(rank)
        .step_by(world.max(1))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums by hand over a fixed set of "rank" buffers (for the helpers).
    struct Fake {
        rank: usize,
        others: Vec<Vec<f32>>,
    }

    /// Rank `rank` of two, the other rank holding `other`.
    fn fake(rank: usize, other: &[f32]) -> Fake {
        Fake {
            rank,
            others: vec![other.to_vec()],
        }
    }

    impl AllReduce for Fake {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.others.len() + 1
        }
        fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor, DistError> {
            let mut v = flat.to_vec1::<f32>()?;
            for o in &self.others {
                assert_eq!(o.len(), v.len());
                for (a, b) in v.iter_mut().zip(o) {
                    *a += b;
                }
            }
            Ok(Tensor::from_vec(v, flat.elem_count(), flat.device())?)
        }
    }

    #[test]
    fn mean_grads_flattens_in_name_order_and_restores_shapes() {
        let dev = Device::Cpu;
        let mut g = HashMap::new();
        g.insert(
            "b".to_string(),
            Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap(),
        );
        g.insert("a".to_string(), Tensor::new(&[10f32], &dev).unwrap());
        // the other rank's flat buffer, in name order: a, then b row-major
        let mut f = fake(0, &[30., 3., 2., 1., 0.]);
        let m = mean_grads(&mut f, g).unwrap();
        assert_eq!(m["a"].to_vec1::<f32>().unwrap(), vec![20.]);
        assert_eq!(
            m["b"].to_vec2::<f32>().unwrap(),
            vec![vec![2., 2.], vec![2., 2.]]
        );
    }

    #[test]
    fn single_is_the_identity() {
        let dev = Device::Cpu;
        let mut g = HashMap::new();
        g.insert("w".to_string(), Tensor::new(&[1f32, -2.], &dev).unwrap());
        let m = mean_grads(&mut Single, g).unwrap();
        assert_eq!(m["w"].to_vec1::<f32>().unwrap(), vec![1., -2.]);
        assert_eq!(mean_scalars(&mut Single, &[3.5], &dev).unwrap(), vec![3.5]);
        assert!(any(&mut Single, true, &dev).unwrap());
        assert!(!any(&mut Single, false, &dev).unwrap());
    }

    #[test]
    fn scalars_and_flags_reduce() {
        let dev = Device::Cpu;
        let mut f = fake(1, &[1.0]);
        assert_eq!(mean_scalars(&mut f, &[3.0], &dev).unwrap(), vec![2.0]);
        assert!(any(&mut f, false, &dev).unwrap(), "the other rank said yes");
        let mut f = fake(1, &[0.0]);
        assert!(!any(&mut f, false, &dev).unwrap());
    }

    #[test]
    fn all_gather_stacks_rank_blocks_and_keeps_own_gradient() {
        let dev = Device::Cpu;
        // rank 1 of 2; the other rank's buffer holds its rows at offset 0 and zeros after
        let mut f = fake(1, &[1., 2., 3., 4., 0., 0., 0., 0.]);
        let own = candle_core::Var::new(&[[5f32, 6.], [7., 8.]], &dev).unwrap();
        let all = all_gather_rows(&mut f, own.as_tensor()).unwrap();
        assert_eq!(
            all.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.], vec![5., 6.], vec![7., 8.]]
        );
        let mixed = with_own_rows(&all, own.as_tensor(), 1).unwrap();
        assert_eq!(
            mixed.to_vec2::<f32>().unwrap(),
            all.to_vec2::<f32>().unwrap()
        );
        let g = mixed.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(own.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![10., 12.], vec![14., 16.]],
            "the gradient reaches this rank's rows"
        );
        assert!(with_own_rows(&all, &all, 1).is_err());
        let mut f = fake(0, &[3.0]);
        assert_eq!(sum_scalars(&mut f, &[2.0], &dev).unwrap(), vec![5.0]);
    }

    #[test]
    fn shard_rows_interleave() {
        let rows: Vec<u32> = (0..6).collect();
        assert_eq!(shard_rows(&rows, 0, 2), vec![0, 2, 4]);
        assert_eq!(shard_rows(&rows, 1, 2), vec![1, 3, 5]);
        assert_eq!(shard_rows(&rows, 0, 1), rows);
    }
}

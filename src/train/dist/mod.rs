//! Data-parallel training: the gradient all-reduce behind one small trait.
//!
//! Every rank runs the same loop on its shard of each global batch; after the backward pass the
//! gradients of all ranks are summed (one flattened f32 buffer, parameters sorted by name) and
//! divided by the world size, so every rank applies the same optimiser step to the same weights.
//! Implementations: [`Single`] (one process, no communication), [`tcp::TcpHub`] (processes on
//! CPU, rank 0 sums in rank order over local sockets: exact and deterministic) and, with the
//! `nccl` feature, [`nccl::Nccl`] (one process per GPU). Ranks meet through files in a shared
//! folder ([`rendezvous`]).

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
        let mut f = Fake {
            rank: 0,
            others: vec![vec![30., 3., 2., 1., 0.]],
        };
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
        let mut f = Fake {
            rank: 1,
            others: vec![vec![1.0]],
        };
        assert_eq!(mean_scalars(&mut f, &[3.0], &dev).unwrap(), vec![2.0]);
        assert!(any(&mut f, false, &dev).unwrap(), "the other rank said yes");
        let mut f = Fake {
            rank: 1,
            others: vec![vec![0.0]],
        };
        assert!(!any(&mut f, false, &dev).unwrap());
    }

    #[test]
    fn shard_rows_interleave() {
        let rows: Vec<u32> = (0..6).collect();
        assert_eq!(shard_rows(&rows, 0, 2), vec![0, 2, 4]);
        assert_eq!(shard_rows(&rows, 1, 2), vec![1, 3, 5]);
        assert_eq!(shard_rows(&rows, 0, 1), rows);
    }
}

//! All-reduce between GPU processes with NCCL (`--features cuda,nccl`): one process per GPU (a
//! communicator is not `Send`). Rank 0 creates the NCCL id and publishes its 128 bytes through the
//! rendezvous folder; every rank builds its communicator on the stream of its candle device, so
//! the reduction is ordered with the rest of the step's kernels.

use std::path::Path;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CudaStorage, Device, Tensor};

use super::{rendezvous, AllReduce, DistError};
use crate::model::custom_op::{CpuArg, CpuOut, CudaArg, CudaOut, Custom, Op};

/// Rendezvous file holding rank 0's NCCL id.
pub const ID_FILE: &str = "nccl_id";

/// A member of an NCCL group.
#[derive(Debug)]
pub struct Nccl {
    comm: Comm,
    rank: usize,
    world: usize,
}

impl Nccl {
    /// Join the group on `dev` (a CUDA device), meeting the other ranks through `dir`.
    pub fn connect(
        dev: &Device,
        rank: usize,
        world: usize,
        dir: &Path,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let nccl = |e: String| DistError::Nccl { rank, msg: e };
        let Device::Cuda(cd) = dev else {
            return Err(nccl(format!(
                "the NCCL all-reduce needs a CUDA device, got {dev:?}"
            )));
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl(format!("creating the id: {e:?}")))?;
            let bytes: Vec<u8> = id.internal().iter().map(|c| *c as u8).collect();
            rendezvous::publish(dir, ID_FILE, &bytes, rank)?;
            id
        } else {
            let bytes = rendezvous::wait_for(dir, ID_FILE, timeout, rank)?;
            if bytes.len() != 128 {
                return Err(DistError::Protocol {
                    rank,
                    msg: format!(
                        "{} holds {} bytes, an NCCL id has 128",
                        dir.join(ID_FILE).display(),
                        bytes.len()
                    ),
                });
            }
            let mut internal = [0 as std::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(&bytes) {
                *d = *s as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let stream = cd.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl(format!("binding the CUDA context: {e:?}")))?;
        let comm = Comm::from_rank(stream, rank, world, id)
            .map_err(|e| nccl(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}")))?;
        Ok(Nccl { comm, rank, world })
    }
}

impl AllReduce for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor, DistError> {
        let flat = flat.to_dtype(candle_core::DType::F32)?.contiguous()?;
        Ok(flat.apply_op1_no_bwd(&Custom(SumOp { comm: &self.comm }))?)
    }
}

/// `ncclAllReduce(sum)` of a contiguous f32 CUDA tensor into a fresh buffer.
struct SumOp<'a> {
    comm: &'a Comm,
}

impl Op<1> for SumOp<'_> {
    const NAME: &'static str = "nccl-all-reduce-sum";

    fn cpu(&self, _: [CpuArg<'_>; 1]) -> CpuOut {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda(&self, [(s, l)]: [CudaArg<'_>; 1]) -> CudaOut {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        let mut dst = dev.alloc_zeros::<f32>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU check (`cargo test --features cuda,nccl --lib train::parallel::comm::nccl`): a world of one
    /// through NCCL on `cuda:0` returns its buffer, offsets of a narrowed tensor included.
    #[test]
    fn world_of_one_through_nccl_returns_the_buffer() {
        let dev = Device::new_cuda(0).unwrap();
        let d = tempfile::tempdir().unwrap();
        let mut c = Nccl::connect(&dev, 0, 1, d.path(), Duration::from_secs(60)).unwrap();
        assert_eq!((c.rank(), c.world()), (0, 1));
        assert!(d.path().join(ID_FILE).is_file(), "rank 0 published the id");
        let t = Tensor::new(&[0f32, 1.0, -2.5, 3.0], &dev).unwrap();
        let s = c.all_reduce_sum(&t.narrow(0, 1, 3).unwrap()).unwrap();
        assert_eq!(s.to_vec1::<f32>().unwrap(), vec![1.0, -2.5, 3.0]);
    }
}

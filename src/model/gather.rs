//! Row gather and row scatter-add whose backward passes stay parallel on CUDA.
//!
//! candle's `index_select` has `index_add` as its backward, and candle's CUDA `index_add` runs one
//! thread per column that walks every index in turn: for the token gathers of the masks, the
//! RoIAlign plan and the mask head that is one serial loop of up to millions of steps per
//! backward. Here both directions are custom ops: on CUDA (f32) the gather is one thread per
//! output element and the scatter-add one thread per source element with `atomicAdd` (the order
//! of the additions is not fixed there: sums agree to float rounding); elsewhere, and for other
//! dtypes, the ops are candle's own (`index_select`, `index_add`), so CPU results are unchanged.
//! The kernels are compiled once per process with NVRTC.

use candle_core::{CpuStorage, DType, Result, Shape, Tensor};

use super::custom_op::{apply, CpuArg, CpuOut, Grads, Op};
#[cfg(feature = "cuda")]
use super::custom_op::{CudaArg, CudaOut};

/// `table.index_select(idx, 0)` for a `(N, C)` table and `(M,)` u32 indices: `(M, C)`, with a
/// scatter-add backward.
pub fn gather_rows(table: &Tensor, idx: &Tensor) -> Result<Tensor> {
    if custom_applies(table, idx) {
        return apply([&table.contiguous()?, &idx.contiguous()?], GatherRows);
    }
    table.index_select(idx, 0)
}

/// `zeros((n, C)).index_add(idx, src, 0)` for `(M, C)` rows and `(M,)` u32 indices, with a
/// gather backward.
pub fn scatter_add_rows(src: &Tensor, idx: &Tensor, n: usize) -> Result<Tensor> {
    if custom_applies(src, idx) {
        return apply(
            [&src.contiguous()?, &idx.contiguous()?],
            ScatterAddRows { n },
        );
    }
    let c = src.dim(1)?;
    Tensor::zeros((n, c), src.dtype(), src.device())?.index_add(idx, src, 0)
}

fn custom_applies(t: &Tensor, idx: &Tensor) -> bool {
    t.device().is_cuda()
        && t.dtype() == DType::F32
        && idx.dtype() == DType::U32
        && t.rank() == 2
        && kernels_available()
}

/// Whether the CUDA kernels are on and compiled (`CJEPA_GATHER=candle` or `CJEPA_CUDA_KERNELS=0`
/// turn them off: candle's own ops, for comparison). Where NVRTC fails, candle's ops run instead.
pub fn kernels_available() -> bool {
    if matches!(std::env::var("CJEPA_GATHER").as_deref(), Ok("candle")) {
        return false;
    }
    #[cfg(feature = "cuda")]
    return super::cuda_kernels::available(cuda::MODULE, cuda::SRC);
    #[cfg(not(feature = "cuda"))]
    false
}

struct GatherRows;
struct ScatterAddRows {
    n: usize,
}

fn host_gather(table: &[f32], c: usize, idx: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * c);
    for &i in idx {
        out.extend_from_slice(&table[i as usize * c..(i as usize + 1) * c]);
    }
    out
}

fn host_scatter_add(src: &[f32], c: usize, idx: &[u32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * c];
    for (r, &i) in idx.iter().enumerate() {
        for (o, s) in out[i as usize * c..(i as usize + 1) * c]
            .iter_mut()
            .zip(&src[r * c..(r + 1) * c])
        {
            *o += s;
        }
    }
    out
}

/// The f32 rows, their count and width, and the u32 indices of a CPU op's arguments.
fn host_args<'a>(
    [(s1, l1), (s2, l2)]: [CpuArg<'a>; 2],
) -> Result<(&'a [f32], usize, usize, &'a [u32])> {
    let (CpuStorage::F32(a), CpuStorage::U32(i)) = (s1, s2) else {
        candle_core::bail!("row gather / scatter: f32 rows and u32 indices expected")
    };
    let (Some((a0, a1)), Some((i0, i1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
    else {
        candle_core::bail!("row gather / scatter: contiguous inputs expected")
    };
    let (rows, c) = l1.shape().dims2()?;
    Ok((&a[a0..a1], rows, c, &i[i0..i1]))
}

impl Op<2> for GatherRows {
    const NAME: &'static str = "gather-rows";

    fn cpu(&self, args: [CpuArg<'_>; 2]) -> CpuOut {
        let (table, n, c, idx) = host_args(args)?;
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= n) {
            candle_core::bail!("gather-rows: index {bad} outside a table of {n} rows")
        }
        let out = host_gather(table, c, idx);
        Ok((CpuStorage::F32(out), Shape::from((idx.len(), c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [table, idx]: [CudaArg<'_>; 2]) -> CudaOut {
        let (_, c) = table.1.shape().dims2()?;
        let m = idx.1.shape().elem_count();
        let out = cuda::launch(cuda::GATHER, table, idx, m * c, c)?;
        Ok((out, Shape::from((m, c))))
    }

    fn bwd(&self, [table, idx]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        Ok([Some(scatter_add_rows(grad, idx, table.dim(0)?)?), None])
    }
}

impl Op<2> for ScatterAddRows {
    const NAME: &'static str = "scatter-add-rows";

    fn cpu(&self, args: [CpuArg<'_>; 2]) -> CpuOut {
        let (src, m, c, idx) = host_args(args)?;
        if idx.len() != m {
            candle_core::bail!("scatter-add-rows: {m} rows but {} indices", idx.len())
        }
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= self.n) {
            candle_core::bail!("scatter-add-rows: index {bad} outside {} rows", self.n)
        }
        let out = host_scatter_add(src, c, idx, self.n);
        Ok((CpuStorage::F32(out), Shape::from((self.n, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [src, idx]: [CudaArg<'_>; 2]) -> CudaOut {
        let (m, c) = src.1.shape().dims2()?;
        let k = idx.1.shape().elem_count();
        if k != m {
            candle_core::bail!("scatter-add-rows: {m} rows but {k} indices")
        }
        let out = cuda::launch(cuda::SCATTER_ADD, src, idx, self.n * c, c)?;
        Ok((out, Shape::from((self.n, c))))
    }

    fn bwd(&self, [_, idx]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        Ok([Some(gather_rows(grad, idx)?), None])
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::{CudaStorage, Layout, Result};

    use crate::model::cuda_kernels::{launch, launch_config};

    pub const MODULE: &str = "cjepa_gather";
    pub const GATHER: &str = "cjepa_gather_rows_f32";
    pub const SCATTER_ADD: &str = "cjepa_scatter_add_rows_f32";

    pub const SRC: &str = r#"
// Element i = (r, col) of the (rows, c) side that walks the indices: with `scatter` off it reads
// row idx[r] of `a` into out[i]; with `scatter` on it adds a[i] to row idx[r] of out.
__device__ __forceinline__ void rows_by_index(
    const float* a, const unsigned int* idx, float* out,
    unsigned long long total, unsigned long long c, bool scatter) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
       i < total; i += (unsigned long long)blockDim.x * gridDim.x) {
    unsigned long long r = i / c, col = i - r * c;
    unsigned long long j = (unsigned long long)idx[r] * c + col;
    if (scatter) {
      atomicAdd(&out[j], a[i]);
    } else {
      out[i] = a[j];
    }
  }
}
extern "C" __global__ void cjepa_gather_rows_f32(
    const float* table, const unsigned int* idx, float* out,
    unsigned long long total, unsigned long long c) {
  rows_by_index(table, idx, out, total, c, false);
}
extern "C" __global__ void cjepa_scatter_add_rows_f32(
    const float* src, const unsigned int* idx, float* out,
    unsigned long long total, unsigned long long c) {
  rows_by_index(src, idx, out, total, c, true);
}
"#;

    /// Runs `kernel` over the `(rows, c)` f32 input `s1` and the u32 indices `s2` into a zeroed
    /// output of `out_len` elements. The gather walks the `out_len` outputs, the scatter-add its
    /// input rows.
    pub fn launch(
        kernel: &str,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        out_len: usize,
        c: usize,
    ) -> Result<CudaStorage> {
        let dev = s1.device().clone();
        let (Some((a0, a1)), Some((i0, i1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("{kernel}: contiguous inputs expected")
        };
        let src = s1.as_cuda_slice::<f32>()?.slice(a0..a1);
        let idx = s2.as_cuda_slice::<u32>()?.slice(i0..i1);
        let mut out = dev.alloc_zeros::<f32>(out_len)?;
        let total = if kernel == GATHER { out_len } else { a1 - a0 } as u64;
        if total > 0 {
            let c = c as u64;
            // SAFETY: the kernel reads `total` elements of `src` (gather: `total / c` indices)
            // and writes inside `out`; the indices are below the table's rows (they come from
            // validated mask lists and RoIAlign plans; the CPU op checks them).
            launch!(
                dev,
                (MODULE, SRC),
                kernel,
                launch_config(total),
                [&src, &idx, &mut out, &total, &c]
            )?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The ops' host kernels and backward wiring equal candle's index_select / index_add (the
    /// CUDA kernels compute the same sums; `scripts/gpu-check.sh` runs them).
    #[test]
    fn custom_ops_equal_index_select_and_index_add_with_gradients() {
        let dev = Device::Cpu;
        let table = Var::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
        let idx = Tensor::new(&[2u32, 0, 2, 1], &dev).unwrap();
        let ours = apply([table.as_tensor(), &idx], GatherRows).unwrap();
        let theirs = table.as_tensor().index_select(&idx, 0).unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            theirs.to_vec2::<f32>().unwrap()
        );
        let w = Tensor::new(&[[1f32, -1.0], [2.0, 0.5], [3.0, 1.0], [0.25, 4.0]], &dev).unwrap();
        let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let get = |g: &candle_core::backprop::GradStore| {
            g.get(table.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        };
        assert_eq!(get(&g_ours), get(&g_theirs));
        assert_eq!(
            get(&g_ours),
            vec![vec![2.0, 0.5], vec![0.25, 4.0], vec![4.0, 0.0]]
        );

        let src = Var::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
        let to = Tensor::new(&[1u32, 1, 0], &dev).unwrap();
        let ours = apply([src.as_tensor(), &to], ScatterAddRows { n: 3 }).unwrap();
        let theirs = Tensor::zeros((3, 2), DType::F32, &dev)
            .unwrap()
            .index_add(&to, src.as_tensor(), 0)
            .unwrap();
        assert_eq!(
            ours.to_vec2::<f32>().unwrap(),
            theirs.to_vec2::<f32>().unwrap()
        );
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
        let g = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(src.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![3.0, 4.0], vec![3.0, 4.0], vec![1.0, 2.0]]
        );
        let out_of_range = Tensor::new(&[3u32], &dev).unwrap();
        assert!(apply([table.as_tensor(), &out_of_range], GatherRows).is_err());
    }

    /// Off CUDA the public functions are candle's own ops.
    #[test]
    fn off_cuda_the_functions_are_candles_ops() {
        let dev = Device::Cpu;
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let i = Tensor::new(&[1u32, 1, 0], &dev).unwrap();
        let g = gather_rows(&t, &i).unwrap();
        assert_eq!(
            g.to_vec2::<f32>().unwrap(),
            vec![vec![3.0, 4.0], vec![3.0, 4.0], vec![1.0, 2.0]]
        );
        let s = scatter_add_rows(&g, &i, 2).unwrap();
        assert_eq!(
            s.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![6.0, 8.0]]
        );
    }
}

//! LayerNorm and softmax over the last axis as single CUDA kernels with their backward, for f32
//! tensors on CUDA (`model::cuda_kernels` on). candle composes LayerNorm from ten element-wise
//! and reduction kernels and softmax from five, each a full pass over the activations plus one
//! more per gradient in the backward; on a GPU those passes, not the matrix products, set the
//! step time (see `bench/RESULTS.md`). One kernel per direction reads and writes each element
//! once or twice.
//!
//! The ops also run on the CPU (plain loops: the CPU takes the fused kernels of `model::fused`
//! instead), which is how their backward wiring (the partial column sums of the LayerNorm
//! parameters, the softmax gradient) is tested without a GPU; the CUDA kernels compute the same
//! formulas and are checked on a GPU by the golden model tests (`scripts/gpu-check.sh`).

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};

use super::custom_op::{apply, apply_no_bwd, f32_data, CpuArg, CpuOut, Grads, Op};
#[cfg(feature = "cuda")]
use super::custom_op::{CudaArg, CudaOut};

/// Rows of one partial column sum of the LayerNorm parameter gradients: 64, more for very long
/// inputs (a launch has at most 65535 chunks).
fn param_chunk(rows: usize) -> usize {
    rows.div_ceil(65_535).max(64)
}

/// True when `x` takes these kernels: f32 on CUDA, our CUDA kernels on and compiled.
pub fn applies(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return x.device().is_cuda()
        && x.dtype() == DType::F32
        && super::cuda_kernels::available(cuda::MODULE, cuda::SRC);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// Softmax over the last axis, with its backward.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    apply([&x.contiguous()?], Softmax)
}

/// LayerNorm over the last axis (biased variance), affine when `wb` is given, with its backward.
pub fn layer_norm(x: &Tensor, wb: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let (w, b) = match wb {
        Some((w, b)) => (w.contiguous()?, b.contiguous()?),
        None => (
            Tensor::ones(d, DType::F32, x.device())?,
            Tensor::zeros(d, DType::F32, x.device())?,
        ),
    };
    apply([&x.contiguous()?, &w, &b], LayerNorm { eps: eps as f32 })
}

fn rows_of(l: &Layout) -> Result<(usize, usize)> {
    let d = *l.dims().last().unwrap_or(&1);
    if d == 0 {
        candle_core::bail!("cuda ops: empty last axis")
    }
    Ok((l.shape().elem_count() / d, d))
}

/// The last-axis width and the shape of the first argument, and the data of every argument.
fn host_rows<'a, const N: usize>(args: [CpuArg<'a>; N]) -> Result<(usize, Shape, [&'a [f32]; N])> {
    let (_, d) = rows_of(args[0].1)?;
    let shape = args[0].1.shape().clone();
    let mut data = [&[][..]; N];
    for (o, a) in data.iter_mut().zip(args) {
        *o = f32_data(a, "cuda ops")?;
    }
    Ok((d, shape, data))
}

/// Mean and reciprocal standard deviation (biased variance) of a row.
pub(crate) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

struct Softmax;
struct SoftmaxBwd;
struct LayerNorm {
    eps: f32,
}
struct LayerNormBwdX {
    eps: f32,
}
struct LayerNormBwdParams {
    eps: f32,
}

impl Op<1> for Softmax {
    const NAME: &'static str = "cuda-softmax";
    fn cpu(&self, args: [CpuArg<'_>; 1]) -> CpuOut {
        let (n, shape, [x]) = host_rows(args)?;
        let mut y = x.to_vec();
        for row in y.chunks_exact_mut(n) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
        Ok((CpuStorage::F32(y), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, x: [CudaArg<'_>; 1]) -> CudaOut {
        let (rows, n) = rows_of(x[0].1)?;
        Ok((cuda::softmax_fwd(&x, rows, n)?, x[0].1.shape().clone()))
    }
    fn bwd(&self, _: [&Tensor; 1], res: &Tensor, dy: &Tensor) -> Grads<1> {
        Ok([Some(apply_no_bwd([res, &dy.contiguous()?], SoftmaxBwd)?)])
    }
}

impl Op<2> for SoftmaxBwd {
    const NAME: &'static str = "cuda-softmax-bwd";
    fn cpu(&self, args: [CpuArg<'_>; 2]) -> CpuOut {
        let (n, shape, [y, dy]) = host_rows(args)?;
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), o) in y
            .chunks_exact(n)
            .zip(dy.chunks_exact(n))
            .zip(dx.chunks_exact_mut(n))
        {
            let c: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, p), g) in o.iter_mut().zip(yr).zip(gr) {
                *o = p * (g - c);
            }
        }
        Ok((CpuStorage::F32(dx), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, args: [CudaArg<'_>; 2]) -> CudaOut {
        let (rows, n) = rows_of(args[0].1)?;
        Ok((
            cuda::softmax_bwd(&args, rows, n)?,
            args[0].1.shape().clone(),
        ))
    }
}

/// Affine LayerNorm of the rows of `x` (`d` wide), the loop the CPU forward runs.
pub(crate) fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], d: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (mean, rstd) = row_stats(xr, eps);
        for (j, (o, v)) in yr.iter_mut().zip(xr).enumerate() {
            *o = (v - mean) * rstd * w[j] + b[j];
        }
    }
    y
}

impl Op<3> for LayerNorm {
    const NAME: &'static str = "cuda-layer-norm";
    fn cpu(&self, args: [CpuArg<'_>; 3]) -> CpuOut {
        let (d, shape, [x, w, b]) = host_rows(args)?;
        if w.len() != d || b.len() != d {
            candle_core::bail!("cuda layer_norm: weight / bias do not fit the last axis {d}")
        }
        Ok((
            CpuStorage::F32(layer_norm_rows(x, w, b, d, self.eps)),
            shape,
        ))
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w, b]: [CudaArg<'_>; 3]) -> CudaOut {
        let (rows, d) = rows_of(x.1)?;
        if w.1.shape().elem_count() != d || b.1.shape().elem_count() != d {
            candle_core::bail!("cuda layer_norm: weight / bias do not fit the last axis {d}")
        }
        let y = cuda::ln_fwd(x, w, b, rows, d, self.eps)?;
        Ok((y, x.1.shape().clone()))
    }
    fn bwd(&self, [x, w, _]: [&Tensor; 3], _res: &Tensor, dy: &Tensor) -> Grads<3> {
        let dy = dy.contiguous()?;
        let dx = apply_no_bwd([x, w, &dy], LayerNormBwdX { eps: self.eps })?;
        let d = x.dim(candle_core::D::Minus1)?;
        // (chunks, 2, d) partial sums of dy x̂ and dy, added up here
        let part = apply_no_bwd([x, &dy], LayerNormBwdParams { eps: self.eps })?;
        let sums = part.sum(0)?;
        let dw = sums.narrow(0, 0, 1)?.reshape(d)?;
        let db = sums.narrow(0, 1, 1)?.reshape(d)?;
        Ok([Some(dx), Some(dw), Some(db)])
    }
}

impl Op<3> for LayerNormBwdX {
    const NAME: &'static str = "cuda-layer-norm-bwd-x";
    fn cpu(&self, args: [CpuArg<'_>; 3]) -> CpuOut {
        let (d, shape, [x, w, dy]) = host_rows(args)?;
        let mut dx = vec![0f32; x.len()];
        for ((xr, gr), o) in x
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let (mean, rstd) = row_stats(xr, self.eps);
            let (mut a, mut c) = (0f32, 0f32);
            for j in 0..d {
                let g = gr[j] * w[j];
                a += g;
                c += g * (xr[j] - mean) * rstd;
            }
            let (a, c) = (a / d as f32, c / d as f32);
            for j in 0..d {
                let g = gr[j] * w[j];
                o[j] = rstd * (g - a - (xr[j] - mean) * rstd * c);
            }
        }
        Ok((CpuStorage::F32(dx), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, w, dy]: [CudaArg<'_>; 3]) -> CudaOut {
        let (rows, d) = rows_of(x.1)?;
        let dx = cuda::ln_bwd_x(x, w, dy, rows, d, self.eps)?;
        Ok((dx, x.1.shape().clone()))
    }
}

impl Op<2> for LayerNormBwdParams {
    const NAME: &'static str = "cuda-layer-norm-bwd-params";
    fn cpu(&self, args: [CpuArg<'_>; 2]) -> CpuOut {
        let (d, _, [x, dy]) = host_rows(args)?;
        let rows = x.len() / d;
        let chunk = param_chunk(rows);
        let chunks = rows.div_ceil(chunk);
        let mut part = vec![0f32; chunks * 2 * d];
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let (mean, rstd) = row_stats(xr, self.eps);
            let k = r / chunk;
            for j in 0..d {
                let g = dy[r * d + j];
                part[(2 * k) * d + j] += g * (xr[j] - mean) * rstd;
                part[(2 * k + 1) * d + j] += g;
            }
        }
        Ok((CpuStorage::F32(part), Shape::from((chunks, 2, d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, dy]: [CudaArg<'_>; 2]) -> CudaOut {
        let (rows, d) = rows_of(x.1)?;
        let chunk = param_chunk(rows);
        let chunks = rows.div_ceil(chunk);
        let part = cuda::ln_bwd_params(x, dy, rows, d, self.eps, chunk)?;
        Ok((part, Shape::from((chunks, 2, d))))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaStorage, Layout, Result};

    use crate::model::cuda_kernels::launch;

    pub const MODULE: &str = "cjepa_norms";
    pub const SRC: &str = r#"
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* sh) {
  int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float t = lane < nw ? sh[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) sh[0] = t;
  }
  __syncthreads();
  return sh[0];
}
// Mean and 1/std of row r (block per row).
__device__ void row_stats(const float* xr, int d, float eps, float* sh, float* mean, float* rstd) {
  float s = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) s += xr[j];
  float m = block_sum(s, sh) / d;
  float q = 0.f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) { float c = xr[j] - m; q += c * c; }
  float var = block_sum(q, sh) / d;
  *mean = m;
  *rstd = 1.f / sqrtf(var + eps);
}
extern "C" __global__ void cjepa_ln_fwd(const float* x, const float* w, const float* b, float* y,
                                        long long rows, int d, float eps) {
  __shared__ float sh[32];
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    float mean, rstd;
    row_stats(xr, d, eps, sh, &mean, &rstd);
    for (int j = threadIdx.x; j < d; j += blockDim.x) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
  }
}
extern "C" __global__ void cjepa_ln_bwd_x(const float* x, const float* w, const float* dy, float* dx,
                                          long long rows, int d, float eps) {
  __shared__ float sh[32];
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* xr = x + r * d;
    const float* gr = dy + r * d;
    float* o = dx + r * d;
    float mean, rstd;
    row_stats(xr, d, eps, sh, &mean, &rstd);
    float sa = 0.f, sc = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
      float g = gr[j] * w[j];
      sa += g;
      sc += g * (xr[j] - mean) * rstd;
    }
    float a = block_sum(sa, sh) / d;
    float c = block_sum(sc, sh) / d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
      float g = gr[j] * w[j];
      o[j] = rstd * (g - a - (xr[j] - mean) * rstd * c);
    }
  }
}
extern "C" __global__ void cjepa_ln_stats(const float* x, float* mean, float* rstd, long long rows,
                                          int d, float eps) {
  __shared__ float sh[32];
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    float m, s;
    row_stats(x + r * d, d, eps, sh, &m, &s);
    if (threadIdx.x == 0) { mean[r] = m; rstd[r] = s; }
  }
}
// part[k][0][j] = sum over rows r of chunk k of dy[r][j] * xhat[r][j]; part[k][1][j] = sum of dy.
extern "C" __global__ void cjepa_ln_bwd_params(const float* x, const float* dy, const float* mean,
                                               const float* rstd, float* part, long long rows, int d,
                                               int chunk) {
  int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  long long r0 = (long long)blockIdx.y * chunk;
  long long r1 = r0 + chunk < rows ? r0 + chunk : rows;
  float aw = 0.f, ab = 0.f;
  for (long long r = r0; r < r1; ++r) {
    float g = dy[r * d + j];
    aw += g * (x[r * d + j] - mean[r]) * rstd[r];
    ab += g;
  }
  part[(2LL * blockIdx.y) * d + j] = aw;
  part[(2LL * blockIdx.y + 1) * d + j] = ab;
}
// Softmax of each n-wide row, one warp per row.
extern "C" __global__ void cjepa_softmax_fwd(const float* x, float* y, long long rows, int n) {
  int lane = threadIdx.x & 31;
  long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  for (long long r = warp; r < rows; r += nwarps) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float m = __int_as_float(0xff800000);
    for (int j = lane; j < n; j += 32) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < n; j += 32) { float e = expf(xr[j] - m); yr[j] = e; s += e; }
    float inv = 1.f / warp_sum(s);
    for (int j = lane; j < n; j += 32) yr[j] *= inv;
  }
}
extern "C" __global__ void cjepa_softmax_bwd(const float* y, const float* dy, float* dx, long long rows,
                                             int n) {
  int lane = threadIdx.x & 31;
  long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
  for (long long r = warp; r < rows; r += nwarps) {
    const float* yr = y + r * n;
    const float* gr = dy + r * n;
    float* o = dx + r * n;
    float c = 0.f;
    for (int j = lane; j < n; j += 32) c += yr[j] * gr[j];
    c = warp_sum(c);
    for (int j = lane; j < n; j += 32) o[j] = yr[j] * (gr[j] - c);
  }
}
"#;

    type In<'a> = (&'a CudaStorage, &'a Layout);

    macro_rules! view {
        ($s:expr, $l:expr) => {{
            let Some((a, b)) = $l.contiguous_offsets() else {
                candle_core::bail!("cuda ops: contiguous input expected")
            };
            $s.as_cuda_slice::<f32>()?.slice(a..b)
        }};
    }

    fn cfg(blocks: u64, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks.clamp(1, 1 << 20) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// 256 threads per row for wide rows, fewer (a multiple of 32) for narrow ones.
    fn row_threads(d: usize) -> u32 {
        (d.div_ceil(32) * 32).clamp(32, 256) as u32
    }

    /// One warp per row (8 rows a block): `y = kernel(x)` or, for the backward, `(y, dy)`.
    fn warp_rows(name: &str, ins: &[In], rows: usize, n: usize) -> Result<CudaStorage> {
        let dev = ins[0].0.device().clone();
        let a = view!(ins[0].0, ins[0].1);
        let mut out = dev.alloc_zeros::<f32>(rows * n)?;
        let (r, n32) = (rows as i64, n as i32);
        let launch_cfg = cfg((rows as u64).div_ceil(8), 256);
        // SAFETY: one warp per row reads its `n` elements of each input and writes the same
        // `n` of the output, all `rows * n` long (the ops check the layouts).
        if let Some(b) = ins.get(1) {
            let b = view!(b.0, b.1);
            launch!(
                dev,
                (MODULE, SRC),
                name,
                launch_cfg,
                [&a, &b, &mut out, &r, &n32]
            )?;
        } else {
            launch!(
                dev,
                (MODULE, SRC),
                name,
                launch_cfg,
                [&a, &mut out, &r, &n32]
            )?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub fn softmax_fwd(x: &[In], rows: usize, n: usize) -> Result<CudaStorage> {
        warp_rows("cjepa_softmax_fwd", x, rows, n)
    }

    pub fn softmax_bwd(y_dy: &[In], rows: usize, n: usize) -> Result<CudaStorage> {
        warp_rows("cjepa_softmax_bwd", y_dy, rows, n)
    }

    /// One block per row over three `(rows, d)` / `(d)` inputs (the LayerNorm forward and the
    /// input gradient): `out = kernel(a, b, c)`.
    fn block_rows(
        name: &str,
        ins: [In; 3],
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = ins[0].0.device().clone();
        let (a, b, c) = (
            view!(ins[0].0, ins[0].1),
            view!(ins[1].0, ins[1].1),
            view!(ins[2].0, ins[2].1),
        );
        let mut out = dev.alloc_zeros::<f32>(rows * d)?;
        let (r, d32) = (rows as i64, d as i32);
        let launch_cfg = cfg(rows as u64, row_threads(d));
        // SAFETY: one block per row reads that row of the `(rows, d)` inputs and all `d` of the
        // per-column ones, and writes that row of the output.
        launch!(
            dev,
            (MODULE, SRC),
            name,
            launch_cfg,
            [&a, &b, &c, &mut out, &r, &d32, &eps]
        )?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    pub fn ln_fwd(x: In, w: In, bias: In, rows: usize, d: usize, eps: f32) -> Result<CudaStorage> {
        block_rows("cjepa_ln_fwd", [x, w, bias], rows, d, eps)
    }

    pub fn ln_bwd_x(x: In, w: In, dy: In, rows: usize, d: usize, eps: f32) -> Result<CudaStorage> {
        block_rows("cjepa_ln_bwd_x", [x, w, dy], rows, d, eps)
    }

    pub fn ln_bwd_params(
        x: In,
        dy: In,
        rows: usize,
        d: usize,
        eps: f32,
        chunk: usize,
    ) -> Result<CudaStorage> {
        let dev = x.0.device().clone();
        let (xv, gv) = (view!(x.0, x.1), view!(dy.0, dy.1));
        let mut mean = dev.alloc_zeros::<f32>(rows)?;
        let mut rstd = dev.alloc_zeros::<f32>(rows)?;
        let (r, d32) = (rows as i64, d as i32);
        // SAFETY: one block per row reads the row and writes its two statistics.
        launch!(
            dev,
            (MODULE, SRC),
            "cjepa_ln_stats",
            cfg(rows as u64, row_threads(d)),
            [&xv, &mut mean, &mut rstd, &r, &d32, &eps]
        )?;
        let chunks = rows.div_ceil(chunk);
        let mut part = dev.alloc_zeros::<f32>(chunks * 2 * d)?;
        let c32 = chunk as i32;
        let launch_cfg = LaunchConfig {
            grid_dim: (d.div_ceil(256) as u32, chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: thread (column j, chunk k) reads column j of its rows and writes part[k][0..2][j].
        launch!(
            dev,
            (MODULE, SRC),
            "cjepa_ln_bwd_params",
            launch_cfg,
            [&xv, &gv, &mean, &rstd, &mut part, &r, &d32, &c32]
        )?;
        Ok(CudaStorage::wrap_cuda_slice(part, dev))
    }
}

#[cfg(test)]
mod tests;

//! Shared pieces of the fused ops: AVX2/FMA dispatch for the elementwise loops, a vectorisable
//! `exp` and `erf` in f32, and gemm calls (the `gemm` crate candle itself uses) split over rayon.

use rayon::prelude::*;

use super::{ranges, SendConst, SendPtr};

/// True when the CPU has AVX2 and FMA (checked once).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` compiled for AVX2 when the CPU has it (the closure and the `#[inline(always)]`
/// kernels it calls are inlined into a function built with those features, so their loops are
/// vectorised 8 wide instead of the baseline's 4).
#[inline(always)]
pub fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the features were detected at run time.
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

/// Defines a kernel `fn name(args)` (no return value) whose body runs compiled for AVX2 + FMA
/// when the CPU has them, else for the baseline: the body is force-inlined into a
/// `#[target_feature]` copy. [`simd`] does the same for a closure, but only when LLVM chooses to
/// inline the closure into its AVX2 frame: a large loop body (a softmax row, a GELU with its `erf`
/// and `exp`) is left out of line and compiled for SSE2, 4 wide, which this forces.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if $crate::model::fused::kernels::has_avx2() {
                    // SAFETY: the CPU has the features (checked at run time).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// `exp(x)` in f32 (Cephes polynomial, about 2 ulp), branch-free so loops vectorise.
/// Inputs are clamped to [-87, 88]: below, the result is about 1.6e-38 instead of 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // t = MAGIC + n exactly (one ulp of t is 1), so n is the difference of their bits: integer
    // arithmetic that vectorises, where `n as i32` (saturating) compiles to scalar compares.
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let bits = ((ni + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

/// `erf(x)` in f32: a rational minimax fit on [-4, 4] (beyond, erf is +-1 in f32), branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_473_9e-2;
    p / q
}

/// Sum of a slice with 8 independent accumulators (vectorises; better rounding than one chain).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

/// Dot product with 8 independent accumulators.
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut cx = x.chunks_exact(8);
    let mut cy = y.chunks_exact(8);
    for (a, b) in (&mut cx).zip(&mut cy) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for a in acc {
        s += a;
    }
    s
}

/// Maximum of a slice (NaN-propagating like candle's reduce is not needed: inputs are finite).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for a in acc {
        m = m.max(a);
    }
    m
}

/// A strided matrix operand: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A strided destination.
#[derive(Clone, Copy)]
pub struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

/// `dst (m x n) = [dst +] scale * a (m x k) * b (k x n)` on the calling thread.
///
/// # Safety
/// The pointers with their strides must address valid, non-overlapping (dst) memory.
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    *dst.ptr.offset(i * dst.rs + j * dst.cs) = 0.0;
                }
            }
        }
        return;
    }
    ::gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        dst.cs,
        dst.rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        ::gemm::Parallelism::None,
    )
}

/// A buffer of `len` floats for a kernel that writes every element before anything reads it (a
/// gemm with `accumulate = false`, a loop over every row). `vec![0.0; len]` would zero it first:
/// a memset of every output, 3-5% of a training step's time once freed memory stays mapped
/// (`util::malloc`), where a fresh `calloc` mapping used to be zero already.
///
/// # Safety
/// The caller writes every element before reading any, and before the buffer leaves the kernel.
#[allow(clippy::uninit_vec)]
pub unsafe fn output_buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.set_len(len);
    v
}

/// Below this many multiply-adds a gemm stays on one thread.
const PAR_MIN_FLOPS: usize = 1 << 20;

/// [`gemm`] with the rows of `dst` split over the rayon threads (each thread packs its own
/// operands; no thread writes another's rows).
///
/// # Safety
/// As [`gemm`].
pub unsafe fn gemm_par_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < PAR_MIN_FLOPS || m < 32 {
        return gemm(m, n, k, dst, accumulate, a, b, scale);
    }
    let parts = ranges(m, threads * 2, 16);
    let (dp, ap, bp) = (SendPtr(dst.ptr), SendConst(a.ptr), SendConst(b.ptr));
    let (drs, dcs, ars, acs, brs, bcs) = (dst.rs, dst.cs, a.rs, a.cs, b.rs, b.cs);
    parts.into_par_iter().for_each(move |r| {
        let (dp, ap, bp) = (dp, ap, bp);
        let i0 = r.start as isize;
        gemm(
            r.len(),
            n,
            k,
            MatMut {
                ptr: dp.0.offset(i0 * drs),
                rs: drs,
                cs: dcs,
            },
            accumulate,
            Mat {
                ptr: ap.0.offset(i0 * ars),
                rs: ars,
                cs: acs,
            },
            Mat {
                ptr: bp.0,
                rs: brs,
                cs: bcs,
            },
            scale,
        );
    });
}

/// Runs `f(range)` over `0..n` split into chunks of whole rows across the rayon threads.
pub fn par_rows(n: usize, min_rows: usize, f: impl Fn(std::ops::Range<usize>) + Sync + Send) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || n <= min_rows {
        f(0..n);
        return;
    }
    let parts = ranges(n, threads * 4, min_rows.max(1));
    parts.into_par_iter().for_each(f);
}

/// Like [`par_rows`], each chunk returning a partial vector of length `len`; the sum of them.
pub fn par_rows_sum(
    n: usize,
    min_rows: usize,
    len: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let threads = rayon::current_num_threads();
    if threads <= 1 || n <= min_rows {
        let mut acc = vec![0f32; len];
        f(0..n, &mut acc);
        return acc;
    }
    let parts = ranges(n, threads * 2, min_rows.max(1));
    let partial: Vec<Vec<f32>> = parts
        .into_par_iter()
        .map(|r| {
            let mut acc = vec![0f32; len];
            f(r, &mut acc);
            acc
        })
        .collect();
    let mut out = vec![0f32; len];
    for p in partial {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_matches_f64() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let got = erf(x) as f64;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((got - want).abs());
            x += 0.00123;
        }
        assert!(worst < 1e-6, "absolute error {worst}");
    }

    #[test]
    fn reductions() {
        let v: Vec<f32> = (0..37).map(|i| i as f32 - 10.0).collect();
        assert_eq!(sum(&v), v.iter().sum::<f32>());
        assert_eq!(max(&v), 26.0);
        assert_eq!(dot(&v, &v), v.iter().map(|x| x * x).sum::<f32>());
    }

    #[test]
    fn gemm_layouts() {
        // a (3x2) row-major, b (2x4) given transposed (4x2 storage)
        let a = [1f32, 2., 3., 4., 5., 6.];
        let bt = [1f32, 0., 0., 1., 1., 1., 2., -1.];
        let mut c = vec![9f32; 12];
        unsafe {
            gemm_par_rows(
                3,
                4,
                2,
                MatMut {
                    ptr: c.as_mut_ptr(),
                    rs: 4,
                    cs: 1,
                },
                false,
                Mat {
                    ptr: a.as_ptr(),
                    rs: 2,
                    cs: 1,
                },
                Mat {
                    ptr: bt.as_ptr(),
                    rs: 1,
                    cs: 2,
                },
                1.0,
            )
        };
        assert_eq!(c, vec![1., 2., 3., 0., 3., 4., 7., 2., 5., 6., 11., 4.]);
    }
}

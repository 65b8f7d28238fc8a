//! Fused CPU kernels (f32) of the transformer layers, each a custom op
//! ([`crate::model::custom_op::Op`]) with its own backward, so a training step runs one pass per
//! op instead of candle's chain of small ops.
//!
//! - `linear`: `y = x W^T + b` with the bias folded into the matmul and a backward that hands the
//!   transposed operands to gemm as strides (no transposed copies); rows split over rayon threads.
//! - `layer_norm`: affine and affine-free LayerNorm; the forward saves mean and 1/std per row.
//! - `attention`: softmax attention of a packed `qkv` tensor per (image, head), the probabilities
//!   saved for the backward; no permuted copies of q, k, v in either direction.
//! - `softmax`: softmax over the last axis with its backward.
//! - `gelu`: GELU with the exact erf, the backward in one pass.
//! - `linear_gelu`: the MLP's `GELU(x W^T + b)` as one op; its backward forms the pre-activation
//!   gradient and the bias gradient in one pass and feeds it straight to the gemms.
//!
//! The layers in [`crate::model::layers`] take these paths for contiguous f32 tensors on the CPU
//! while [`enabled`] is true (the default; `CJEPA_FUSED=0` or [`set_enabled`] turns them off, for
//! the benchmark baseline and for debugging). Every op has a unit test against the unfused
//! composition, values and gradients.

pub mod attention;
pub mod gelu;
pub mod kernels;
pub mod layer_norm;
pub mod linear;
pub mod linear_gelu;
pub mod softmax;

use candle_core::{bail, DType, Result, Storage, Tensor};

pub use attention::attention;
pub use gelu::gelu_erf;
pub use layer_norm::{layer_norm, layer_norm_plain};
pub use linear::linear;
pub use linear_gelu::linear_gelu;
pub use softmax::softmax_last;

static SWITCH: crate::util::switch::EnvSwitch = crate::util::switch::EnvSwitch::new("CJEPA_FUSED");

/// Whether the layers use the fused kernels (first call reads `CJEPA_FUSED`: `0`/`off` = off).
pub fn enabled() -> bool {
    SWITCH.get()
}

/// Turns the fused path on or off for the whole process (read at every layer call).
pub fn set_enabled(on: bool) {
    SWITCH.set(on)
}

/// True when `t` can take the fused path: f32 on the CPU, outside bf16 autocast (the fused
/// kernels compute in f32).
pub fn applies_to(t: &Tensor) -> bool {
    enabled()
        && t.device().is_cpu()
        && t.dtype() == DType::F32
        && super::precision::current() == super::precision::Precision::F32
}

/// Runs `f` on the contiguous f32 data of `t` (copied first when `t` is strided).
pub(crate) fn with_data<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.detach().contiguous()?
    };
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) => f(super::custom_op::f32_data((cs, l), op)?),
        _ => bail!("{op}: the fused kernels run on the CPU only"),
    }
}

/// A tensor owning `v` with shape `shape`, on the CPU, without graph.
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// A raw pointer that may cross threads; every user writes disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// A raw read-only pointer that may cross threads.
#[derive(Clone, Copy)]
pub(crate) struct SendConst(pub *const f32);
unsafe impl Send for SendConst {}
unsafe impl Sync for SendConst {}

/// Splits `0..n` into at most `parts` contiguous ranges whose starts are multiples of `align`.
pub(crate) fn ranges(n: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let align = align.max(1);
    let mut chunk = n.div_ceil(parts);
    chunk = chunk.div_ceil(align) * align;
    let chunk = chunk.max(align);
    (0..n)
        .step_by(chunk)
        .map(|a| a..(a + chunk).min(n))
        .collect()
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Comparison helpers of the fused-op tests.
    use candle_core::backprop::GradStore;
    use candle_core::{Device, Tensor, Var};

    /// `x W^T (+ b)` of candle's own ops (reshape, matmul, broadcast add): the reference of the
    /// fused linear ops.
    pub fn unfused_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap();
        let rows = x.elem_count() / k;
        let y = x
            .reshape((rows, k))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap();
        let y = match b {
            Some(b) => y.broadcast_add(b).unwrap(),
            None => y,
        };
        let mut od = dims;
        *od.last_mut().unwrap() = w.dim(0).unwrap();
        y.reshape(od).unwrap()
    }

    /// The gradients of `sum(y * probe)`.
    pub fn probed_grads(y: &Tensor, probe: &Tensor) -> GradStore {
        (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// The gradients of `sum(y)`.
    pub fn grads(y: &Tensor) -> GradStore {
        y.sum_all().unwrap().backward().unwrap()
    }

    /// Seeded normal data.
    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A variable with seeded normal data times `scale` plus `shift`.
    pub fn var(shape: &[usize], seed: u64, scale: f64, shift: f64) -> Var {
        Var::from_tensor(&randn(shape, seed).affine(scale, shift).unwrap()).unwrap()
    }

    /// Backpropagates `sum(fused * probe)` and `sum(unfused * probe)` (a random upstream gradient)
    /// and compares the gradients of each named variable with [`assert_close`].
    pub fn assert_grads_close(
        op: &str,
        fused: &Tensor,
        unfused: &Tensor,
        probe: &Tensor,
        vars: &[(&str, &Var)],
        atol: f32,
        rtol: f32,
    ) {
        let (gf, gu) = (probed_grads(fused, probe), probed_grads(unfused, probe));
        for (name, v) in vars {
            assert_close(
                &format!("{op} d{name}"),
                gf.get(v.as_tensor()).unwrap(),
                gu.get(v.as_tensor()).unwrap(),
                atol,
                rtol,
            );
        }
    }

    /// Largest `|a - b| / (atol + rtol |b|)`; panics above 1 with `what` in the message.
    pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f32, rtol: f32) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let x = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = (0f32, 0usize);
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            let r = (p - q).abs() / (atol + rtol * q.abs());
            if !(r <= worst.0) {
                worst = (r, i);
            }
        }
        assert!(
            worst.0 <= 1.0,
            "{what}: element {} fused {} vs unfused {} ({}x the tolerance)",
            worst.1,
            x[worst.1],
            y[worst.1],
            worst.0
        );
    }
}

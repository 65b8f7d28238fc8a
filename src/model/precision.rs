//! Mixed precision: bf16 autocast of the matrix products with f32 master weights.
//!
//! Under [`Precision::Bf16`] every matrix product of the networks (linear layers, attention,
//! patch embedding, convolutions of the heads) takes bf16 operands and gives a bf16 result, which
//! enters the rest of the graph as f32 again; everything else (LayerNorm, softmax, GELU, the
//! residual stream, the losses, the optimiser and the EMA) stays f32, and so do the weights and
//! the Adam moments. This is what PyTorch's `autocast(dtype=torch.bfloat16)` does for the
//! official code's matmuls. `to_dtype` carries gradients, so the backward runs the same products
//! in bf16 and hands f32 gradients to the f32 weights. bf16 has f32's exponent range: no loss
//! scaling is needed.
//!
//! On CUDA the products run on the bf16 tensor cores. candle 0.11's CPU backend has no bf16
//! matmul, so on the CPU the product is computed in f32 from the bf16-rounded operands and
//! rounded to bf16: what a tensor core computes (exact products of bf16 inputs, f32
//! accumulation, a bf16 result), up to the order of the f32 sums. The same code path therefore
//! runs, and is tested, on the CPU.
//!
//! The precision of a process is set once by the stage worker ([`set_process`]); a test or a
//! benchmark can override it on one thread with [`scope`]. f32 matrix products on CUDA use TF32
//! tensor cores once [`allow_tf32`] ran (the stage worker and the benchmark turn it on).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Arithmetic of the matrix products.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere (TF32 matmuls on CUDA).
    #[default]
    F32,
    /// bf16 autocast of the matrix products, f32 master weights.
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// From `f32` / `bf16`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            o => Err(format!("precision `{o}`: use `f32` or `bf16`")),
        }
    }
}

static PROCESS: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static THREAD: Cell<Option<Precision>> = const { Cell::new(None) };
}

fn code(p: Precision) -> u8 {
    match p {
        Precision::F32 => 0,
        Precision::Bf16 => 1,
    }
}

/// Sets the precision of the whole process (every thread without a [`scope`]).
pub fn set_process(p: Precision) {
    PROCESS.store(code(p), Ordering::Relaxed);
}

/// The precision in force on this thread.
pub fn current() -> Precision {
    THREAD.with(|t| t.get()).unwrap_or_else(|| {
        if PROCESS.load(Ordering::Relaxed) == 1 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    })
}

/// Restores the thread's previous precision when dropped.
#[must_use = "the precision holds while the guard lives"]
pub struct Scope(Option<Precision>);

impl Drop for Scope {
    fn drop(&mut self) {
        let prev = self.0;
        THREAD.with(|t| t.set(prev));
    }
}

/// Sets this thread's precision until the guard is dropped.
pub fn scope(p: Precision) -> Scope {
    Scope(THREAD.with(|t| t.replace(Some(p))))
}

/// Whether products of `t` are autocast on this thread: bf16 in force and `t` is f32.
pub fn autocast(t: &Tensor) -> bool {
    current() == Precision::Bf16 && t.dtype() == DType::F32
}

/// Whether `dev` multiplies bf16 matrices natively (candle's CPU backend does not).
fn native_bf16(dev: &Device) -> bool {
    !dev.is_cpu()
}

/// `t` rounded to bf16: a bf16 tensor on a device with bf16 kernels, else f32 holding bf16 values.
fn round_operand(t: &Tensor) -> Result<Tensor> {
    let r = t.to_dtype(DType::BF16)?;
    if native_bf16(t.device()) {
        Ok(r)
    } else {
        r.to_dtype(DType::F32)
    }
}

/// The product's result as f32 holding bf16 values (the output of a bf16 product).
fn finish(y: Tensor) -> Result<Tensor> {
    if y.dtype() == DType::BF16 {
        y.to_dtype(DType::F32)
    } else {
        y.to_dtype(DType::BF16)?.to_dtype(DType::F32)
    }
}

/// `a.matmul(b)`, in bf16 under autocast.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !autocast(a) {
        return a.matmul(b);
    }
    finish(round_operand(a)?.matmul(&round_operand(b)?)?)
}

/// `a.broadcast_matmul(b)`, in bf16 under autocast.
pub fn broadcast_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !autocast(a) {
        return a.broadcast_matmul(b);
    }
    finish(round_operand(a)?.broadcast_matmul(&round_operand(b)?)?)
}

/// `x.conv2d(w, padding, stride, dilation, groups)`, in bf16 under autocast.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if !autocast(x) {
        return x.conv2d(w, padding, stride, dilation, groups);
    }
    finish(round_operand(x)?.conv2d(&round_operand(w)?, padding, stride, dilation, groups)?)
}

/// Lets f32 matrix products on CUDA devices use TF32 tensor cores (10-bit mantissa products,
/// f32 accumulation; PyTorch's `allow_tf32`), for the whole process; no effect on the CPU. The
/// stage worker and `bench train-step` turn it on unless `CJEPA_TF32=0`; the golden tests keep
/// exact f32.
pub fn allow_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

/// [`allow_tf32`] as `CJEPA_TF32` says (`0` / `off` / `false`: exact f32; default on).
pub fn allow_tf32_from_env() -> bool {
    let on = !matches!(
        std::env::var("CJEPA_TF32").as_deref(),
        Ok("0") | Ok("off") | Ok("false")
    );
    allow_tf32(on);
    on
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Round to nearest even at bf16's 8-bit mantissa (finite values).
    fn bf16_round(v: f32) -> f32 {
        let b = v.to_bits();
        f32::from_bits(((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16)
    }

    #[test]
    fn scope_overrides_the_process_and_restores() {
        assert_eq!(current(), Precision::F32);
        {
            let _g = scope(Precision::Bf16);
            assert_eq!(current(), Precision::Bf16);
            {
                let _h = scope(Precision::F32);
                assert_eq!(current(), Precision::F32);
            }
            assert_eq!(current(), Precision::Bf16);
        }
        assert_eq!(current(), Precision::F32);
        assert_eq!(Precision::parse("bf16"), Ok(Precision::Bf16));
        assert!(Precision::parse("fp16").unwrap_err().contains("bf16"));
    }

    /// The product of bf16-rounded operands, rounded to bf16; f32 outside autocast.
    #[test]
    fn matmul_rounds_operands_and_result_to_bf16() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.001f32, 3.3], [0.1, -2.7]], &dev).unwrap();
        let b = Tensor::new(&[[0.37f32], [1.0001]], &dev).unwrap();
        let f32_y = matmul(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(f32_y, a.matmul(&b).unwrap().to_vec2::<f32>().unwrap());
        let _g = scope(Precision::Bf16);
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let y = y.to_vec2::<f32>().unwrap();
        let av = a.to_vec2::<f32>().unwrap();
        let bv = b.to_vec2::<f32>().unwrap();
        for i in 0..2 {
            let want = bf16_round(
                bf16_round(av[i][0]) * bf16_round(bv[0][0])
                    + bf16_round(av[i][1]) * bf16_round(bv[1][0]),
            );
            assert_eq!(y[i][0], want, "row {i}");
            assert_ne!(y[i][0], f32_y[i][0], "row {i} is rounded");
        }
    }

    /// Gradients reach the f32 weight through the casts, rounded as a bf16 backward rounds them.
    #[test]
    fn gradients_reach_f32_weights_under_autocast() {
        let dev = Device::Cpu;
        let w = Var::new(&[[0.5f32, -1.25], [2.0, 0.75]], &dev).unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0]], &dev).unwrap();
        let _g = scope(Precision::Bf16);
        let y = matmul(&x, &w.as_tensor().t().unwrap()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gw = grads.get(w.as_tensor()).expect("a gradient for w");
        assert_eq!(gw.dtype(), DType::F32);
        assert_eq!(
            gw.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![1.0, 2.0]]
        );
    }
}

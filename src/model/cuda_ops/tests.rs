//! Unit tests of `cuda_ops`.

use super::*;
use crate::model::fused::testutil::probed_grads;
use crate::model::layers::{layer_norm_plain_unfused, softmax_last_unfused};
use candle_core::{Device, Var};

fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < tol, "max difference {d}");
}

/// The ops' formulas and backward wiring (run here by their host loops) equal candle's
/// composition, values and gradients; 150 rows cover three partial chunks of the LayerNorm
/// parameter sums.
#[test]
fn layer_norm_and_softmax_match_the_composition_with_gradients() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 50, 24), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 24, &dev).unwrap()).unwrap();
    let probe = Tensor::randn(0f32, 1.0, (3, 50, 24), &dev).unwrap();
    let ours = layer_norm(x.as_tensor(), Some((w.as_tensor(), b.as_tensor())), 1e-6).unwrap();
    let theirs = layer_norm_plain_unfused(x.as_tensor(), 1e-6)
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    close(&ours, &theirs, 1e-5);
    let g1 = probed_grads(&ours, &probe);
    let g2 = probed_grads(&theirs, &probe);
    for v in [&x, &w, &b] {
        close(
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
            1e-4,
        );
    }
    let plain = layer_norm(x.as_tensor(), None, 1e-6).unwrap();
    close(
        &plain,
        &layer_norm_plain_unfused(x.as_tensor(), 1e-6).unwrap(),
        1e-5,
    );

    let s1 = softmax_last(x.as_tensor()).unwrap();
    let s2 = softmax_last_unfused(x.as_tensor()).unwrap();
    close(&s1, &s2, 1e-6);
    let g1 = probed_grads(&s1, &probe);
    let g2 = probed_grads(&s2, &probe);
    close(
        g1.get(x.as_tensor()).unwrap(),
        g2.get(x.as_tensor()).unwrap(),
        1e-5,
    );
}

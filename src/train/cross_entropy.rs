//! Cross-entropy losses of the heads trained on frozen or fine-tuned features: soft-target
//! cross-entropy of a bank of classifier heads (the linear probes, fine-tuning with Mixup /
//! label smoothing) and per-pixel cross-entropy with mmseg's ignore index 255 (segmentation).

use candle_core::{Tensor, D};

use crate::error::Result;

/// `log_softmax` over dimension `dim`, shifted by the (detached) max as PyTorch's kernel is.
fn log_softmax(logits: &Tensor, dim: usize) -> Result<Tensor> {
    let max = logits.max_keepdim(dim)?.detach();
    let z = logits.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(dim)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// Cross-entropy of `(H, B, C)` logits against `(B, C)` targets (one-hot or soft): `(H,)`, mean
/// over the batch.
pub fn cross_entropy(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits, logits.rank() - 1)?;
    let nll = logp.broadcast_mul(target)?.sum(D::Minus1)?.neg()?;
    Ok(nll.mean(D::Minus1)?)
}

/// Cross-entropy with ignore index 255 over `(B, K, H, W)` logits, averaged over all `B*H*W`
/// pixels (mmseg `CrossEntropyLoss`, `avg_non_ignore=False`).
pub fn cross_entropy_ignore(logits: &Tensor, labels: &[u8]) -> Result<Tensor> {
    let (b, k, h, w) = logits.dims4()?;
    let logp = log_softmax(logits, 1)?;
    let idx: Vec<u32> = labels
        .iter()
        .map(|&l| if (l as usize) < k { l as u32 } else { 0 })
        .collect();
    let valid: Vec<f32> = labels
        .iter()
        .map(|&l| if (l as usize) < k { 1.0 } else { 0.0 })
        .collect();
    let dev = logits.device();
    let idx = Tensor::from_vec(idx, (b, 1, h, w), dev)?;
    let valid = Tensor::from_vec(valid, (b, 1, h, w), dev)?;
    let picked = logp.contiguous()?.gather(&idx, 1)?;
    let n = (b * h * w) as f64;
    Ok(((picked * valid)?.sum_all()? * (-1.0 / n))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_ignores_255() {
        let dev = Device::Cpu;
        // 2 classes, 3 pixels: logits favour class 0 everywhere
        let l = Tensor::new(&[2f32, 2.0, 2.0, 0.0, 0.0, 0.0], &dev)
            .unwrap()
            .reshape((1, 2, 1, 3))
            .unwrap();
        let loss = cross_entropy_ignore(&l, &[0, 1, 255]).unwrap();
        let lse = (2f64.exp() + 1.0).ln();
        let want = ((lse - 2.0) + lse) / 3.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}

//! The k largest entries of each row of a similarity matrix, on the device that holds it: `k`
//! rounds of a row-wise argmax, each taking the winner out (set to -inf), so only the `(rows, k)`
//! values and indices are read back instead of the whole matrix (a k-NN chunk over ImageNet's
//! 1.28M training images is 5 GB). Ties go to the lowest index.

use candle_core::{DType, Result, Tensor, D};

use crate::util::host_read;

/// Per row, the `k` largest values in descending order and their column indices.
pub type TopK = (Vec<Vec<f32>>, Vec<Vec<u32>>);

/// The top `k` of each row of `sim` `(rows, n)` (f32), computed where `sim` lives.
pub fn topk_rows(sim: &Tensor, k: usize) -> Result<TopK> {
    let (rows, n) = sim.dims2()?;
    let k = k.min(n);
    let dev = sim.device();
    let cols = Tensor::arange(0u32, n as u32, dev)?.reshape((1, n))?;
    let neg = Tensor::full(f32::NEG_INFINITY, (rows, n), dev)?;
    let mut s = sim.to_dtype(DType::F32)?.contiguous()?;
    let mut vals = Vec::with_capacity(k);
    let mut idxs = Vec::with_capacity(k);
    for round in 0..k {
        let idx = s.argmax_keepdim(D::Minus1)?; // (rows, 1) u32
        vals.push(s.gather(&idx, 1)?);
        if round + 1 < k {
            let hit = cols.broadcast_eq(&idx)?;
            s = hit.where_cond(&neg, &s)?;
        }
        idxs.push(idx);
    }
    if k == 0 {
        return Ok((vec![Vec::new(); rows], vec![Vec::new(); rows]));
    }
    let vals = host_read::vec2::<f32>(&Tensor::cat(&vals, 1)?)?;
    let idxs = host_read::vec2::<u32>(&Tensor::cat(&idxs, 1)?)?;
    Ok((vals, idxs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_give_their_k_largest_in_order() {
        let sim = Tensor::new(
            &[[0.1f32, 0.9, 0.3, 0.9, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap();
        let (v, i) = topk_rows(&sim, 3).unwrap();
        assert_eq!(v, vec![vec![0.9, 0.9, 0.3], vec![5.0, 4.0, 3.0]]);
        assert_eq!(i, vec![vec![1, 3, 2], vec![0, 1, 2]]);
        let (v, _) = topk_rows(&sim, 9).unwrap();
        assert_eq!(
            v[1],
            vec![5.0, 4.0, 3.0, 2.0, 1.0],
            "k is capped at the row length"
        );
    }
}

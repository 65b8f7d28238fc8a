//! A guard on the size of one kernel launch. candle's CUDA kernels take the element count as a
//! `u32` and launch one thread per element without a grid-stride loop: a tensor op over more
//! than 2^32 elements silently leaves part of its output unwritten. Work whose intermediate
//! grows with the batch (the column buffer of a convolution) runs in chunks of images small
//! enough that no buffer reaches [`MAX_LAUNCH_ELEMS`].

use candle_core::Tensor;

use super::error::{ModelError, Result};

/// The most elements one intermediate tensor may hold (2^31 - 1: a margin below `u32::MAX` for
/// kernels that index in `i32`).
pub const MAX_LAUNCH_ELEMS: usize = (1 << 31) - 1;

/// `(start, len)` runs of rows so that `len * elems_per_row <= limit` for each; an error when one
/// row alone exceeds the limit.
pub fn row_chunks(rows: usize, elems_per_row: usize, limit: usize) -> Result<Vec<(usize, usize)>> {
    if elems_per_row > limit {
        return Err(ModelError::Input {
            what: "launch size",
            msg: format!(
                "one image needs a buffer of {elems_per_row} elements, over the {limit} one \
                 kernel launch can address; use a smaller input size or fewer channels"
            ),
        });
    }
    let per = (limit / elems_per_row.max(1)).max(1);
    Ok((0..rows)
        .step_by(per)
        .map(|s| (s, per.min(rows - s)))
        .collect())
}

/// `f` applied to runs of rows (axis 0) of `x`, concatenated: one call when all rows fit.
pub fn map_row_chunks(
    x: &Tensor,
    elems_per_row: usize,
    limit: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let chunks = row_chunks(x.dim(0)?, elems_per_row, limit)?;
    if chunks.len() <= 1 {
        return f(x);
    }
    let parts = chunks
        .iter()
        .map(|&(s, n)| f(&x.narrow(0, s, n)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunks_cover_every_row_within_the_limit() {
        assert_eq!(row_chunks(5, 10, 25).unwrap(), vec![(0, 2), (2, 2), (4, 1)]);
        assert_eq!(row_chunks(3, 10, 100).unwrap(), vec![(0, 3)]);
        assert_eq!(row_chunks(0, 10, 100).unwrap(), vec![]);
        let e = row_chunks(2, 11, 10).unwrap_err().to_string();
        assert!(e.contains("11 elements"), "{e}");
    }

    #[test]
    fn chunked_map_equals_one_call() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((6, 4))
            .unwrap();
        let f = |t: &Tensor| -> Result<Tensor> { Ok(t.sqr()?.sum_keepdim(1)?) };
        let whole = f(&x).unwrap().to_vec2::<f32>().unwrap();
        let chunked = map_row_chunks(&x, 4, 9, f).unwrap();
        assert_eq!(chunked.to_vec2::<f32>().unwrap(), whole);
    }
}

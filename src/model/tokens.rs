//! Token selection of I-JEPA: `apply_masks` (mask-major concatenation along the batch) and
//! `repeat_interleave_batch` (golden README §5.5, §5.6), as index-selects that carry gradients.

use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};
use super::gather::gather_rows;
use crate::util::host_read;

/// Validated index lists: one `(B, K)` list per mask, flattened row-major, all with the same K.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskIndices {
    /// Images per mask.
    pub batch: usize,
    /// Indices per image and mask.
    pub keep: usize,
    /// `rows[i][b * keep + k]` = token index of mask i, image b, position k.
    pub rows: Vec<Vec<u32>>,
}

impl MaskIndices {
    /// Reads masks given as integer tensors of shape `(B, K)` and checks `0 <= idx < n_tokens`.
    pub fn from_tensors(
        masks: &[Tensor],
        batch: usize,
        n_tokens: usize,
        what: &'static str,
    ) -> Result<Self> {
        let bad = |msg: String| ModelError::Input { what, msg };
        if masks.is_empty() {
            return Err(bad("no masks given; pass None for the full sequence".into()));
        }
        let mut rows = Vec::with_capacity(masks.len());
        let mut keep = None;
        for (i, m) in masks.iter().enumerate() {
            let (mb, mk) = m.dims2().map_err(|_| {
                bad(format!(
                    "mask {i} has shape {:?}, expected (batch, K)",
                    m.dims()
                ))
            })?;
            if mb != batch {
                return Err(bad(format!(
                    "mask {i} has {mb} rows but the batch has {batch} images"
                )));
            }
            if *keep.get_or_insert(mk) != mk || mk == 0 {
                return Err(bad(format!(
                    "mask {i} keeps {mk} tokens; every mask must keep the same K > 0"
                )));
            }
            if m.dtype().is_float() {
                return Err(bad(format!(
                    "mask {i} has dtype {:?}, expected an integer dtype",
                    m.dtype()
                )));
            }
            // Masks are host data (the sampler builds them on the CPU): reading one waits for no
            // device. A mask given on a device costs a counted device-to-host read.
            let flat = m.to_dtype(DType::I64)?.flatten_all()?;
            let v = if host_read::is_host(&flat) {
                flat.to_vec1::<i64>()?
            } else {
                host_read::vec1::<i64>(&flat)?
            };
            let mut out = Vec::with_capacity(v.len());
            for x in v {
                if x < 0 || x as usize >= n_tokens {
                    return Err(bad(format!(
                        "mask {i} holds index {x}, outside 0..{n_tokens}"
                    )));
                }
                out.push(x as u32);
            }
            rows.push(out);
        }
        Ok(Self {
            batch,
            keep: keep.unwrap_or(0),
            rows,
        })
    }

    /// Number of masks M.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there is no mask.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Index tensor into a flattened `(B*N, E)` sequence batch, mask-major (`i*B + b`).
    fn flat_batch_index(&self, n_tokens: usize, device: &Device) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(self.len() * self.batch * self.keep);
        for r in &self.rows {
            for b in 0..self.batch {
                let off = (b * n_tokens) as u32;
                idx.extend(
                    r[b * self.keep..(b + 1) * self.keep]
                        .iter()
                        .map(|&t| t + off),
                );
            }
        }
        Ok(Tensor::from_vec(
            idx,
            self.len() * self.batch * self.keep,
            device,
        )?)
    }

    /// Index tensor into a single `(N, E)` table (the same table for every image), mask-major.
    fn flat_table_index(&self, device: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = self.rows.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            idx,
            self.len() * self.batch * self.keep,
            device,
        )?)
    }
}

/// `apply_masks`: `x (B, N, E)` -> `(M*B, K, E)`, output row `i*B + b` = mask i of image b.
pub fn apply_masks(x: &Tensor, masks: &MaskIndices) -> Result<Tensor> {
    let (b, n, e) = x.dims3()?;
    if b != masks.batch {
        return Err(ModelError::Input {
            what: "masks",
            msg: format!(
                "masks are for {} images, the sequences for {b}",
                masks.batch
            ),
        });
    }
    let idx = masks.flat_batch_index(n, x.device())?;
    let flat = x.reshape((b * n, e))?;
    Ok(gather_rows(&flat, &idx)?.reshape((masks.len() * b, masks.keep, e))?)
}

/// `apply_masks` on a table shared by all images: `table (N, E)` -> `(M*B, K, E)`.
pub fn gather_table(table: &Tensor, masks: &MaskIndices) -> Result<Tensor> {
    let (_, e) = table.dims2()?;
    let idx = masks.flat_table_index(table.device())?;
    Ok(gather_rows(table, &idx)?.reshape((masks.len() * masks.batch, masks.keep, e))?)
}

/// `repeat_interleave_batch(x, B, repeat)`: each chunk of B rows is written `repeat` times in a row.
pub fn repeat_interleave_batch(x: &Tensor, batch: usize, repeat: usize) -> Result<Tensor> {
    if repeat == 1 {
        return Ok(x.clone());
    }
    let rows = x.dim(0)?;
    if batch == 0 || rows % batch != 0 {
        return Err(ModelError::Input {
            what: "repeat_interleave_batch",
            msg: format!("{rows} rows are not a multiple of the batch {batch}"),
        });
    }
    let mut idx = Vec::with_capacity(rows * repeat);
    for i in 0..rows / batch {
        for _ in 0..repeat {
            idx.extend((0..batch).map(|b| (i * batch + b) as u32));
        }
    }
    let n = idx.len();
    let idx = Tensor::from_vec(idx, n, x.device())?;
    let mut dims = x.dims().to_vec();
    let inner: usize = dims[1..].iter().product();
    let y = gather_rows(&x.reshape((rows, inner))?, &idx)?;
    dims[0] = n;
    Ok(y.reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_masks_is_mask_major() {
        let dev = Device::Cpu;
        // B=2, N=3, E=1: value = 10*b + n
        let x = Tensor::from_vec(vec![0f32, 1., 2., 10., 11., 12.], (2, 3, 1), &dev).unwrap();
        let m0 = Tensor::from_vec(vec![2i64, 0], (2, 1), &dev).unwrap();
        let m1 = Tensor::from_vec(vec![1i64, 1], (2, 1), &dev).unwrap();
        let mi = MaskIndices::from_tensors(&[m0, m1], 2, 3, "t").unwrap();
        let y = apply_masks(&x, &mi)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, vec![2., 10., 1., 11.]);
    }

    #[test]
    fn repeat_interleave_chunks() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(vec![0f32, 1., 2., 3.], (4, 1), &dev).unwrap();
        let y = repeat_interleave_batch(&x, 2, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, vec![0., 1., 0., 1., 2., 3., 2., 3.]);
    }

    #[test]
    fn bad_masks_are_errors() {
        let dev = Device::Cpu;
        let m = Tensor::from_vec(vec![5i64, 0], (2, 1), &dev).unwrap();
        assert!(MaskIndices::from_tensors(&[m], 2, 3, "t").is_err());
        let m = Tensor::from_vec(vec![-1i64, 0], (2, 1), &dev).unwrap();
        assert!(MaskIndices::from_tensors(&[m], 2, 3, "t").is_err());
        let m = Tensor::from_vec(vec![0i64, 0], (1, 2), &dev).unwrap();
        assert!(MaskIndices::from_tensors(&[m], 2, 3, "t").is_err());
    }
}

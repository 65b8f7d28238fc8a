//! Mask R-CNN's mask head (He et al., arXiv 1703.06870; detectron2 `MaskRCNNConvUpsampleHead`
//! with ViTDet's LN): RoIAlign `P x P` features -> `num_convs` x (conv 3x3 -> LN -> ReLU) ->
//! deconv 2x2 s2 -> ReLU -> conv 1x1 to one `2P x 2P` logit map per class; the map of the
//! box's class is used (class-specific masks). Maps are channels-last.
//!
//! Training targets follow detectron2 (`BitMasks.crop_and_resize`): the instance's binary mask at
//! input resolution is RoIAligned into the box (`aligned`, adaptive sampling) and thresholded at
//! 0.5; the loss is the mean per-pixel BCE. At test time [`paste`] puts the `M x M` probabilities
//! back into the image like detectron2's `paste_masks_in_image` (bilinear `grid_sample`,
//! `align_corners = False`, zero padding) and thresholds them at 0.5.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::box_coding::BoxXyxy;
use super::init::MSRA_FILL;
use super::nn::{bce_with_logits, Conv2d, Deconv2x2, LayerNorm2d};
use super::roi_align::{roi_align_with, RoiAlignConfig};
use crate::model::error::{ModelError, Result};

/// The mask head.
#[derive(Debug, Clone)]
pub struct MaskHead {
    convs: Vec<(Conv2d, LayerNorm2d)>,
    deconv: Deconv2x2,
    predictor: Conv2d,
    num_classes: usize,
}

impl MaskHead {
    /// Head on `dim`-channel RoI features for `num_classes` classes.
    pub fn new(dim: usize, num_convs: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        let convs = (0..num_convs)
            .map(|i| {
                let v = vb.pp("convs").pp(i);
                Ok((
                    Conv2d::new(dim, dim, 3, MSRA_FILL, None, v.pp("conv"))?,
                    LayerNorm2d::new(dim, v.pp("norm"))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            convs,
            deconv: Deconv2x2::new(dim, dim, MSRA_FILL, vb.pp("deconv"))?,
            predictor: Conv2d::new(
                dim,
                num_classes,
                1,
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.001,
                },
                Some(0.0),
                vb.pp("predictor"),
            )?,
            num_classes,
        })
    }

    /// `(R, P, P, C)` -> logits `(R, 2P, 2P, K)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (conv, norm) in &self.convs {
            h = norm.forward(&conv.forward(&h)?)?.relu()?;
        }
        let h = self.deconv.forward(&h)?.relu()?;
        self.predictor.forward(&h)
    }

    /// The logit map of each RoI's class: `(R, M, M, K)` -> `(R, M, M)`.
    pub fn select_class(&self, logits: &Tensor, classes: &[usize]) -> Result<Tensor> {
        let (r, m, m2, k) = logits.dims4()?;
        if classes.len() != r || classes.iter().any(|&c| c >= k) || k != self.num_classes {
            return Err(ModelError::Input {
                what: "mask classes",
                msg: format!("{} classes for {r} rois of {k} maps", classes.len()),
            });
        }
        let idx: Vec<u32> = classes
            .iter()
            .enumerate()
            .flat_map(|(i, &c)| (0..m * m2).map(move |j| ((i * m * m2 + j) * k + c) as u32))
            .collect();
        let idx = Tensor::from_vec(idx, r * m * m2, logits.device())?;
        let n = logits.elem_count();
        Ok(
            crate::model::gather::gather_rows(&logits.flatten_all()?.reshape((n, 1))?, &idx)?
                .reshape((r, m, m2))?,
        )
    }

    /// Mean BCE of the class maps against `targets` (`R * M * M` values in {0, 1}).
    pub fn loss(&self, logits: &Tensor, classes: &[usize], targets: Vec<f32>) -> Result<Tensor> {
        Ok(self.pixel_losses(logits, classes, targets)?.mean_all()?)
    }

    /// Per-pixel BCE `(R, M, M)` of the class maps against `targets`.
    pub fn pixel_losses(
        &self,
        logits: &Tensor,
        classes: &[usize],
        targets: Vec<f32>,
    ) -> Result<Tensor> {
        let sel = self.select_class(logits, classes)?;
        let t = Tensor::from_vec(targets, sel.shape().clone(), sel.device())?;
        Ok(bce_with_logits(&sel, &t)?)
    }
}

/// Training target of one RoI: the binary `mask` (`h x w`, row-major, input resolution) cropped to
/// `bbox` and resampled to `m x m` with RoIAlign (aligned, adaptive sampling), `>= 0.5`.
pub fn mask_target(mask: &[u8], (h, w): (usize, usize), bbox: &BoxXyxy, m: usize) -> Vec<f32> {
    assert_eq!(mask.len(), h * w, "mask size");
    let cfg = RoiAlignConfig {
        output: m,
        sampling_ratio: 0,
        aligned: true,
    };
    let at = |_: usize, _: usize, y: usize, x: usize| {
        if mask[y * w + x] != 0 {
            1.0
        } else {
            0.0
        }
    };
    roi_align_with(at, (1, h, w), &[(0, *bbox)], 1.0, &cfg)
        .into_iter()
        .map(|v| if v >= 0.5 { 1.0 } else { 0.0 })
        .collect()
}

/// A binary mask that is zero outside a rectangle of an `h x w` image.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxMask {
    /// Image `(height, width)`.
    pub size: (usize, usize),
    /// First column and row of the rectangle.
    pub origin: (usize, usize),
    /// Rectangle `(height, width)`.
    pub rect: (usize, usize),
    /// Row-major 0/1 values of the rectangle.
    pub data: Vec<u8>,
}

impl BoxMask {
    /// The full-image row-major mask.
    pub fn to_full(&self) -> Vec<u8> {
        let (h, w) = self.size;
        let (x0, y0) = self.origin;
        let (rh, rw) = self.rect;
        let mut out = vec![0u8; h * w];
        for r in 0..rh {
            out[(y0 + r) * w + x0..(y0 + r) * w + x0 + rw]
                .copy_from_slice(&self.data[r * rw..(r + 1) * rw]);
        }
        out
    }

    /// COCO RLE (column-major runs) of the full-image mask, visiting only the rectangle.
    pub fn to_rle(&self) -> crate::data::mask::Rle {
        let (h, w) = self.size;
        let (x0, y0) = self.origin;
        let (rh, rw) = self.rect;
        let mut counts: Vec<u32> = Vec::new();
        let (mut cur, mut run) = (0u8, 0u64);
        let mut push = |v: u8, n: u64| {
            if n == 0 {
                return;
            }
            if v != cur {
                counts.push(run as u32);
                cur = v;
                run = 0;
            }
            run += n;
        };
        // column-major: the columns left of the rectangle, its columns, the columns right of it
        push(0, (x0 * h) as u64);
        for c in 0..rw {
            push(0, y0 as u64);
            for r in 0..rh {
                push(self.data[r * rw + c], 1);
            }
            push(0, (h - y0 - rh) as u64);
        }
        push(0, ((w - x0 - rw) * h) as u64);
        counts.push(run as u32);
        crate::data::mask::Rle { h, w, counts }
    }
}

/// Paste `m x m` mask probabilities predicted for `bbox` into an `h x w` image, thresholded.
/// Only the box's pixels (plus one) can be set: outside it every bilinear sample is below 0.5.
pub fn paste(
    probs: &[f32],
    m: usize,
    bbox: &BoxXyxy,
    (h, w): (usize, usize),
    threshold: f32,
) -> BoxMask {
    let (x0, y0, x1, y1) = (bbox[0], bbox[1], bbox[2], bbox[3]);
    let (bw, bh) = (x1 - x0, y1 - y0);
    let clampi = |v: f32, hi: usize| (v.max(0.0) as usize).min(hi);
    let (cx0, cx1) = (clampi(x0.floor() - 1.0, w), clampi(x1.ceil() + 1.0, w));
    let (cy0, cy1) = (clampi(y0.floor() - 1.0, h), clampi(y1.ceil() + 1.0, h));
    let valid = bw > 0.0 && bh > 0.0 && m > 0 && cx1 > cx0 && cy1 > cy0;
    let (rw, rh) = if valid {
        (cx1 - cx0, cy1 - cy0)
    } else {
        (0, 0)
    };
    let mut data = vec![0u8; rw * rh];
    let val = |r: i64, c: i64| -> f32 {
        if r < 0 || c < 0 || r >= m as i64 || c >= m as i64 {
            0.0
        } else {
            probs[r as usize * m + c as usize]
        }
    };
    // grid_sample, align_corners = False: pixel `i` of a box from `lo` of `size` samples the
    // mask at `((g + 1) * m - 1) / 2` with `g = ((i + 0.5 - lo) / size) * 2 - 1`: its cell and
    // the fraction past it
    let source = |i: usize, lo: f32, size: f32| {
        let g = ((i as f32 + 0.5 - lo) / size) * 2.0 - 1.0;
        let s = ((g + 1.0) * m as f32 - 1.0) / 2.0;
        (s.floor() as i64, s - s.floor())
    };
    for yi in 0..rh {
        let (r, ly) = source(cy0 + yi, y0, bh);
        for xi in 0..rw {
            let (c, lx) = source(cx0 + xi, x0, bw);
            let v = (1.0 - ly) * (1.0 - lx) * val(r, c)
                + (1.0 - ly) * lx * val(r, c + 1)
                + ly * (1.0 - lx) * val(r + 1, c)
                + ly * lx * val(r + 1, c + 1);
            if v >= threshold {
                data[yi * rw + xi] = 1;
            }
        }
    }
    BoxMask {
        size: (h, w),
        origin: (cx0, cy0),
        rect: (rh, rw),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn target_of_a_rectangle_mask() {
        // 20x20 image, object = rows 4..12, cols 6..14 (8x8 block)
        let (h, w) = (20, 20);
        let mut mask = vec![0u8; h * w];
        for y in 4..12 {
            for x in 6..14 {
                mask[y * w + x] = 1;
            }
        }
        // box = left half of the object plus the same width of background to its left
        let t = mask_target(&mask, (h, w), &[2.0, 4.0, 10.0, 12.0], 4);
        for r in 0..4 {
            assert_eq!(&t[r * 4..r * 4 + 4], &[0.0, 0.0, 1.0, 1.0], "row {r}");
        }
        // The tight box: border samples fall 0.36 px outside the object (bilinear 0.64 >= 0.5),
        // except at the four corners where the weights multiply (0.64^2 < 0.5), as in detectron2.
        let full = mask_target(&mask, (h, w), &[6.0, 4.0, 14.0, 12.0], 28);
        let zeros: Vec<usize> = (0..28 * 28).filter(|&i| full[i] == 0.0).collect();
        assert_eq!(zeros, vec![0, 27, 27 * 28, 28 * 28 - 1]);
    }

    #[test]
    fn paste_inverts_target_for_a_full_box() {
        let probs = vec![0.9f32; 28 * 28];
        let bm = paste(&probs, 28, &[3.0, 2.0, 9.0, 7.0], (10, 12), 0.5);
        let out = bm.to_full();
        let rle = crate::data::mask::Rle::encode_row_major(&out, 10, 12).unwrap();
        assert_eq!(bm.to_rle(), rle, "rectangle RLE = full-image RLE");
        let on: Vec<(usize, usize)> = (0..10)
            .flat_map(|y| (0..12).map(move |x| (y, x)))
            .filter(|&(y, x)| out[y * 12 + x] == 1)
            .collect();
        assert_eq!(on.len(), 6 * 5, "exactly the box's pixels");
        assert!(on
            .iter()
            .all(|&(y, x)| (2..7).contains(&y) && (3..9).contains(&x)));
        // left half only
        let mut half = vec![0f32; 4 * 4];
        for r in 0..4 {
            half[r * 4] = 1.0;
            half[r * 4 + 1] = 1.0;
        }
        let bm = paste(&half, 4, &[0.0, 0.0, 8.0, 8.0], (8, 8), 0.5);
        let out = bm.to_full();
        let rle = crate::data::mask::Rle::encode_row_major(&out, 8, 8).unwrap();
        assert_eq!(bm.to_rle(), rle);
        // degenerate and off-image boxes give empty masks with valid RLEs
        for b in [
            [5.0, 5.0, 5.0, 9.0],
            [20.0, 20.0, 30.0, 30.0],
            [-9.0, -9.0, -1.5, -2.0],
        ] {
            let bm = paste(&half, 4, &b, (8, 8), 0.5);
            assert_eq!(bm.to_rle(), crate::data::mask::Rle::empty(8, 8), "{b:?}");
        }
        for y in 0..8 {
            assert_eq!(&out[y * 8..y * 8 + 8], &[1, 1, 1, 1, 0, 0, 0, 0], "row {y}");
        }
    }

    #[test]
    fn box_mask_rle_equals_full_image_encoding() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for _ in 0..200 {
            let (h, w) = (rng.gen_range(1..9), rng.gen_range(1..9));
            let (y0, x0) = (rng.gen_range(0..h), rng.gen_range(0..w));
            let (rh, rw) = (rng.gen_range(0..=h - y0), rng.gen_range(0..=w - x0));
            let data = (0..rh * rw).map(|_| rng.gen_range(0..2u8)).collect();
            let bm = BoxMask {
                size: (h, w),
                origin: (x0, y0),
                rect: (rh, rw),
                data,
            };
            let want = crate::data::mask::Rle::encode_row_major(&bm.to_full(), h, w).unwrap();
            assert_eq!(bm.to_rle(), want, "{bm:?}");
        }
    }

    #[test]
    fn head_shapes_and_loss_gradient() {
        let dev = Device::Cpu;
        let (vm, vb) = crate::model::detect::init::SeededInit::cpu_vars(0);
        let head = MaskHead::new(4, 2, 3, vb).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 7, 4), &dev).unwrap()).unwrap();
        let logits = head.forward(x.as_tensor()).unwrap();
        assert_eq!(logits.dims(), &[2, 14, 14, 3]);
        // the selected map is channel `class` of each roi
        let sel = head.select_class(&logits, &[2, 0]).unwrap();
        let at = |t: &Tensor, idx: &[usize]| {
            let mut t = t.clone();
            for &i in idx {
                t = t.get(i).unwrap();
            }
            t.to_scalar::<f32>().unwrap()
        };
        assert_eq!(at(&sel, &[0, 3, 5]), at(&logits, &[0, 3, 5, 2]));
        assert_eq!(at(&sel, &[1, 7, 1]), at(&logits, &[1, 7, 1, 0]));
        let l = head.loss(&logits, &[2, 0], vec![1.0; 2 * 14 * 14]).unwrap();
        let v = l.to_scalar::<f32>().unwrap();
        assert!((v - 2f32.ln()).abs() < 0.05, "near log 2 at init: {v}");
        let g = l.backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            assert!(g.get(var.as_tensor()).is_some(), "{name}");
        }
        assert!(head.select_class(&logits, &[3, 0]).is_err());
    }
}

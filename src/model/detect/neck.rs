//! ViTDet's simple feature pyramid (Li et al., "Exploring Plain Vision Transformer Backbones for
//! Object Detection", arXiv 2203.16527; detectron2 `SimpleFeaturePyramid`), built from the last
//! feature map of the ViT only (stride = patch size `p`):
//!
//! - scale 4: deconv 2x2 s2 (D -> D/2) -> LN -> GELU -> deconv 2x2 s2 (D/2 -> D/4), stride p/4;
//! - scale 2: deconv 2x2 s2 (D -> D/2), stride p/2;
//! - scale 1: identity, stride p;
//! - scale 0.5: max-pool 2x2, stride 2p;
//!
//! each followed by conv 1x1 (no bias) -> LN -> conv 3x3 (no bias) -> LN to `out_dim` channels.
//! With `p = 16` the strides are 4, 8, 16, 32 (ViTDet's extra stride-64 level is left out: the
//! FCOS head here uses four levels). Deconvs are matmuls and the pool has kernel = stride, so the
//! whole neck has a backward. Maps are channels-last `(B, H, W, C)`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::init::MSRA_FILL;
use super::nn::{max_pool2x2, Conv2d, Deconv2x2, LayerNorm2d};
use crate::model::error::{ModelError, Result};

/// The scale factors of the four levels, finest first.
pub const SCALES: [f32; 4] = [4.0, 2.0, 1.0, 0.5];

#[derive(Debug, Clone)]
enum Up {
    X4(Deconv2x2, LayerNorm2d, Deconv2x2),
    X2(Deconv2x2),
    Id,
    Pool,
}

#[derive(Debug, Clone)]
struct Level {
    up: Up,
    lateral: Conv2d,
    lateral_norm: LayerNorm2d,
    output: Conv2d,
    output_norm: LayerNorm2d,
}

/// The pyramid.
#[derive(Debug, Clone)]
pub struct SimpleFeaturePyramid {
    levels: Vec<Level>,
    strides: Vec<usize>,
}

impl SimpleFeaturePyramid {
    /// From a ViT of width `embed_dim` and patch size `patch` (a multiple of 4) to `out_dim` channels.
    pub fn new(embed_dim: usize, patch: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        if patch % 4 != 0 || embed_dim % 4 != 0 {
            return Err(ModelError::Config {
                field: "patch_size",
                msg: format!(
                    "the simple feature pyramid needs patch_size and embed_dim divisible by 4 (got {patch}, {embed_dim})"
                ),
            });
        }
        let d = embed_dim;
        let mut levels = Vec::new();
        let mut strides = Vec::new();
        for (i, &s) in SCALES.iter().enumerate() {
            let v = vb.pp(format!("p{i}"));
            let (up, dim) = match i {
                0 => (
                    Up::X4(
                        Deconv2x2::new(d, d / 2, MSRA_FILL, v.pp("up0"))?,
                        LayerNorm2d::new(d / 2, v.pp("up_norm"))?,
                        Deconv2x2::new(d / 2, d / 4, MSRA_FILL, v.pp("up1"))?,
                    ),
                    d / 4,
                ),
                1 => (
                    Up::X2(Deconv2x2::new(d, d / 2, MSRA_FILL, v.pp("up0"))?),
                    d / 2,
                ),
                2 => (Up::Id, d),
                _ => (Up::Pool, d),
            };
            levels.push(Level {
                up,
                lateral: Conv2d::new(dim, out_dim, 1, MSRA_FILL, None, v.pp("lateral"))?,
                lateral_norm: LayerNorm2d::new(out_dim, v.pp("lateral_norm"))?,
                output: Conv2d::new(out_dim, out_dim, 3, MSRA_FILL, None, v.pp("output"))?,
                output_norm: LayerNorm2d::new(out_dim, v.pp("output_norm"))?,
            });
            strides.push((patch as f32 / s) as usize);
        }
        Ok(Self { levels, strides })
    }

    /// Strides of the levels, finest first.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// `(B, G_h, G_w, D)` -> four maps `(B, G_h * s, G_w * s, out_dim)` for s in 4, 2, 1, 0.5
    /// (G even).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, gh, gw, _) = x.dims4()?;
        if gh % 2 != 0 || gw % 2 != 0 {
            return Err(ModelError::Input {
                what: "images",
                msg: format!(
                    "the patch grid {gh}x{gw} must be even for the stride-2p level; use an input size that is a multiple of 2 * patch_size"
                ),
            });
        }
        self.levels
            .iter()
            .map(|l| {
                let y = match &l.up {
                    Up::X4(a, n, b) => b.forward(&n.forward(&a.forward(x)?)?.gelu_erf()?)?,
                    Up::X2(a) => a.forward(x)?,
                    Up::Id => x.clone(),
                    Up::Pool => max_pool2x2(x)?,
                };
                let y = l.lateral_norm.forward(&l.lateral.forward(&y)?)?;
                l.output_norm.forward(&l.output.forward(&y)?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn shapes_strides_and_gradients() {
        let dev = Device::Cpu;
        let (vm, vb) = crate::model::detect::init::SeededInit::cpu_vars(0);
        let fp = SimpleFeaturePyramid::new(16, 16, 8, vb).unwrap();
        assert_eq!(fp.strides(), &[4, 8, 16, 32]);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 6, 16), &dev).unwrap()).unwrap();
        let outs = fp.forward(x.as_tensor()).unwrap();
        let shapes: Vec<Vec<usize>> = outs.iter().map(|o| o.dims().to_vec()).collect();
        assert_eq!(
            shapes,
            vec![
                vec![2, 16, 24, 8],
                vec![2, 8, 12, 8],
                vec![2, 4, 6, 8],
                vec![2, 2, 3, 8]
            ]
        );
        let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
        for o in &outs {
            loss = (loss + o.sqr().unwrap().mean_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        for (name, v) in vm.data().lock().unwrap().iter() {
            assert!(g.get(v.as_tensor()).is_some(), "{name} has no gradient");
        }
        assert!(fp
            .forward(&Tensor::zeros((1, 3, 4, 16), DType::F32, &dev).unwrap())
            .is_err());
    }
}

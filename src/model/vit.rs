//! ViT encoder of I-JEPA (Assran et al., arXiv 2301.08243; official `vision_transformer.py`).
//!
//! No class token. `x = patch_embed(img) + pos_embed` over all N tokens (fixed 2-D sin-cos,
//! row-major tokens `n = r*G + c`), optionally `apply_masks` (keep the given token indices, the
//! positions travel with the tokens), then pre-norm blocks and the final affine `norm`.
//! The patch-embedding conv (kernel = stride = patch, no padding) is computed as a matmul of the
//! flattened `(ch, i, j)` patches with the `(D, C*P*P)` view of `patch_embed.proj.weight`; the image
//! needs no gradient, so the backward is a single matmul for the weight.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::{Init, VarBuilder};

use super::config::VitConfig;
use super::error::{ModelError, Result};
use super::layers::{Block, LayerNorm};
use super::pos_embed::sincos_2d_tensor;
use super::tokens::{apply_masks, MaskIndices};
use super::{fused, precision};

/// The context / target encoder.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: VitConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// `(N, D)` for the configured grid; other grids are recomputed on the fly.
    pos_embed: Arc<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    device: Device,
}

impl VisionTransformer {
    /// Builds the encoder from `vb` (already scoped, e.g. `vb.pp("encoder")`); weight names are the
    /// official ones: `patch_embed.proj.{weight,bias}`, `blocks.{i}.*`, `norm.*`.
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, c, p) = (cfg.embed_dim, cfg.in_chans, cfg.patch_size);
        let pe = vb.pp("patch_embed").pp("proj");
        let patch_weight = pe.get_with_hints(
            (d, c, p, p),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: cfg.init_std,
            },
        )?;
        let patch_bias = pe.get_with_hints(d, "bias", Init::Const(0.0))?;
        let vbb = vb.pp("blocks");
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(d, cfg.num_heads, cfg, vbb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, cfg.ln_eps, vb.pp("norm"))?;
        let g = cfg.grid_size();
        let pos_embed = Arc::new(sincos_2d_tensor(d, g, g, vb.device())?);
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias,
            pos_embed,
            blocks,
            norm,
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Tokens per image for an input of `h x w` pixels.
    pub fn grid_for(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let p = self.cfg.patch_size;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) || h == 0 || w == 0 {
            return Err(ModelError::Input {
                what: "images",
                msg: format!("image size {h}x{w} is not a positive multiple of the patch size {p}"),
            });
        }
        Ok((h / p, w / p))
    }

    /// Patch embedding + position embedding of `(B, C, H, W)` images: `(B, N, D)`, no masking.
    pub fn patch_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4().map_err(|_| ModelError::Input {
            what: "images",
            msg: format!(
                "shape {:?}, expected (batch, channels, height, width)",
                x.dims()
            ),
        })?;
        if c != self.cfg.in_chans {
            return Err(ModelError::Input {
                what: "images",
                msg: format!(
                    "{c} channels, the model expects in_chans = {}",
                    self.cfg.in_chans
                ),
            });
        }
        let (gh, gw) = self.grid_for(h, w)?;
        let (p, d) = (self.cfg.patch_size, self.cfg.embed_dim);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let wmat = self.patch_weight.reshape((d, c * p * p))?;
        let tok = if fused::applies_to(&patches) {
            fused::linear(&patches, &wmat, Some(&self.patch_bias))?
        } else {
            precision::matmul(&patches, &wmat.t()?)?.broadcast_add(&self.patch_bias)?
        };
        let tok = tok.reshape((b, gh * gw, d))?;
        let g = self.cfg.grid_size();
        let pos = if (gh, gw) == (g, g) {
            self.pos_embed.as_ref().clone()
        } else {
            sincos_2d_tensor(d, gh, gw, &self.device)?
        };
        Ok(tok.broadcast_add(&pos)?)
    }

    /// The sequence entering block 0: patch tokens + pos-embed, then `apply_masks` if masks are given
    /// (`(M*B, K, D)`, row `i*B + b` = mask i of image b).
    pub fn embed(&self, x: &Tensor, masks: Option<&[Tensor]>) -> Result<Tensor> {
        let tok = self.patch_tokens(x)?;
        match masks {
            None => Ok(tok),
            Some(m) => {
                let (b, n, _) = tok.dims3()?;
                let mi = MaskIndices::from_tensors(m, b, n, "masks_enc")?;
                apply_masks(&tok, &mi)
            }
        }
    }

    /// Encoder output after the final norm: `(B, N, D)` without masks, `(M*B, K, D)` with masks.
    pub fn forward_features(&self, x: &Tensor, masks: Option<&[Tensor]>) -> Result<Tensor> {
        let mut h = self.embed(x, masks)?;
        for blk in &self.blocks {
            h = blk.forward(&h)?;
        }
        self.norm.forward(&h)
    }

    /// `forward_features` without masks, with stochastic depth for fine-tuning: `scales[i]` holds
    /// the per-sample `(B, 1, 1)` scales of block `i`'s attention and MLP branches (see
    /// [`Block::forward_drop_path`]); a missing entry means no drop path for that block.
    pub fn forward_features_drop_path(
        &self,
        x: &Tensor,
        scales: &[(Option<Tensor>, Option<Tensor>)],
    ) -> Result<Tensor> {
        let mut h = self.embed(x, None)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            h = match scales.get(i) {
                Some((a, m)) => blk.forward_drop_path(&h, a.as_ref(), m.as_ref())?,
                None => blk.forward(&h)?,
            };
        }
        self.norm.forward(&h)
    }

    /// Like `forward_features`, also returning the output of every block (before the final norm).
    pub fn forward_hidden(
        &self,
        x: &Tensor,
        masks: Option<&[Tensor]>,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let mut h = self.embed(x, masks)?;
        let mut outs = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            h = blk.forward(&h)?;
            outs.push(h.clone());
        }
        let y = self.norm.forward(&h)?;
        Ok((outs, y))
    }

    /// Outputs of the selected blocks (0-based; negative counts from the end, -1 = last), each passed
    /// through the final `norm`, in the order asked. Blocks after the deepest one asked are skipped.
    /// For linear probes: `&[-1]` (last layer) or `&[-4, -3, -2, -1]` (last four).
    pub fn forward_layers(
        &self,
        x: &Tensor,
        masks: Option<&[Tensor]>,
        layers: &[i64],
    ) -> Result<Vec<Tensor>> {
        let depth = self.blocks.len() as i64;
        let mut want = Vec::with_capacity(layers.len());
        for &l in layers {
            let i = if l < 0 { depth + l } else { l };
            if i < 0 || i >= depth {
                return Err(ModelError::Input {
                    what: "layers",
                    msg: format!("block {l} does not exist; the encoder has {depth} blocks"),
                });
            }
            want.push(i as usize);
        }
        let last = want.iter().copied().max().unwrap_or(0);
        let mut h = self.embed(x, masks)?;
        let mut kept: Vec<Option<Tensor>> = vec![None; self.blocks.len()];
        for (i, blk) in self.blocks.iter().enumerate().take(last + 1) {
            h = blk.forward(&h)?;
            if want.contains(&i) {
                kept[i] = Some(self.norm.forward(&h)?);
            }
        }
        want.iter()
            .map(|&i| {
                kept[i].clone().ok_or_else(|| ModelError::Input {
                    what: "layers",
                    msg: format!("block {i} not computed"),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pos_embed::sincos_2d;
    use candle_core::DType;

    fn cfg() -> VitConfig {
        VitConfig {
            depth: 2,
            ..VitConfig::toy()
        }
    }

    #[test]
    fn other_image_size_recomputes_pos_embed() {
        let dev = Device::Cpu;
        let vit = VisionTransformer::new(&cfg(), VarBuilder::zeros(DType::F32, &dev)).unwrap();
        // 48 x 32 pixels -> 3 x 2 grid; zero weights, so the tokens are the pos-embed alone.
        let img = Tensor::ones((1, 3, 48, 32), DType::F32, &dev).unwrap();
        let tok = vit.patch_tokens(&img).unwrap();
        assert_eq!(tok.dims(), &[1, 6, 8]);
        let got = tok.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, sincos_2d(8, 3, 2).unwrap());
        let outs = vit.forward_layers(&img, None, &[0, -1]).unwrap();
        assert_eq!(outs.len(), 2);
        assert!(vit.forward_layers(&img, None, &[2]).is_err());
        assert!(vit
            .patch_tokens(&Tensor::ones((1, 3, 40, 32), DType::F32, &dev).unwrap())
            .is_err());
        assert!(vit
            .patch_tokens(&Tensor::ones((1, 1, 32, 32), DType::F32, &dev).unwrap())
            .is_err());
    }
}

//! I-JEPA predictor (official `VisionTransformerPredictor`): a narrow ViT that predicts the target
//! encoder's features at the target positions from the context tokens.
//!
//! For every target mask i and context mask j (golden README §5.7): the sequence is the Ke context
//! tokens `predictor_embed(ctx) + ppos[ctx idx]` followed by the Kp tokens `mask_token + ppos[target
//! idx]`; blocks, `predictor_norm`, keep the mask-token positions, `predictor_proj` back to D.
//! Sequences are stacked target-mask-major: output row `i*nenc*B + j*B + b`.

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::config::VitConfig;
use super::error::{ModelError, Result};
use super::layers::{Block, LayerNorm, Linear, Sequence};
use super::pos_embed::sincos_2d_tensor;
use super::tokens::{gather_table, repeat_interleave_batch, MaskIndices};

/// Intermediate tensors of one predictor pass (for debugging and golden tests).
#[derive(Debug, Clone)]
pub struct PredictorTrace {
    /// The sequence entering block 0, `(npred*nenc*B, Ke+Kp, Dp)`.
    pub tokens_in: Tensor,
    /// Output of every block.
    pub blocks: Vec<Tensor>,
    /// Final predictions, `(npred*nenc*B, Kp, D)`.
    pub pred: Tensor,
}

/// The predictor network.
#[derive(Debug, Clone)]
pub struct Predictor {
    cfg: VitConfig,
    embed: Linear,
    mask_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    proj: Linear,
}

impl Predictor {
    /// Builds the predictor from `vb` (already scoped, e.g. `vb.pp("predictor")`); weight names:
    /// `predictor_embed`, `mask_token`, `predictor_blocks.{i}.*`, `predictor_norm`, `predictor_proj`.
    pub fn new(cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, dp) = (cfg.embed_dim, cfg.pred_embed_dim);
        let embed = Linear::new(d, dp, true, cfg.init_std, vb.pp("predictor_embed"))?;
        let mask_token = vb.get_with_hints(
            (1, 1, dp),
            "mask_token",
            Init::Randn {
                mean: 0.0,
                stdev: cfg.init_std,
            },
        )?;
        let vbb = vb.pp("predictor_blocks");
        let blocks = (0..cfg.pred_depth)
            .map(|i| Block::new(dp, cfg.pred_num_heads, cfg, vbb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(dp, cfg.ln_eps, vb.pp("predictor_norm"))?;
        let proj = Linear::new(dp, d, true, cfg.init_std, vb.pp("predictor_proj"))?;
        let g = cfg.grid_size();
        let pos_embed = sincos_2d_tensor(dp, g, g, vb.device())?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            mask_token,
            pos_embed,
            blocks,
            norm,
            proj,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Predictions `(npred*nenc*B, Kp, D)` from the context encoder output `ctx (nenc*B, Ke, D)`.
    pub fn forward(
        &self,
        ctx: &Tensor,
        masks_enc: &[Tensor],
        masks_pred: &[Tensor],
    ) -> Result<Tensor> {
        Ok(self.forward_trace(ctx, masks_enc, masks_pred, false)?.pred)
    }

    /// `forward` that also returns the block inputs/outputs when `keep` is true (then by the
    /// literal computation; without `keep`, by the cheaper one of the same values).
    pub fn forward_trace(
        &self,
        ctx: &Tensor,
        masks_enc: &[Tensor],
        masks_pred: &[Tensor],
        keep: bool,
    ) -> Result<PredictorTrace> {
        let (rows, ke, d) = ctx.dims3()?;
        let nenc = masks_enc.len();
        if nenc == 0 || rows % nenc != 0 || d != self.cfg.embed_dim {
            return Err(ModelError::Input {
                what: "predictor context",
                msg: format!(
                    "context of shape {:?} does not fit {nenc} context masks and width {}",
                    ctx.dims(),
                    self.cfg.embed_dim
                ),
            });
        }
        let b = rows / nenc;
        let n = self.pos_embed.dim(0)?;
        let me = MaskIndices::from_tensors(masks_enc, b, n, "masks_enc")?;
        let mp = MaskIndices::from_tensors(masks_pred, b, n, "masks_pred")?;
        if me.keep != ke {
            return Err(ModelError::Input {
                what: "masks_enc",
                msg: format!("masks keep {} tokens but the context has {ke}", me.keep),
            });
        }
        let npred = mp.len();
        // 1-2: embed the context and add the position of each context token.
        let x = self.embed.forward(ctx)?;
        let x = (x + gather_table(&self.pos_embed, &me)?)?;
        // 3: one mask token per target index, at that index's position.
        let pos_t = repeat_interleave_batch(&gather_table(&self.pos_embed, &mp)?, b, nenc)?;
        let tok = pos_t.broadcast_add(&self.mask_token)?;
        // 4-6: tile the context stack npred times, append the mask tokens, run the blocks.
        if keep {
            // The literal computation, every block's output whole (golden tests compare them).
            let x = if npred == 1 {
                x
            } else {
                Tensor::cat(&vec![x; npred], 0)?
            };
            let mut h = Tensor::cat(&[x, tok], 1)?;
            let tokens_in = h.clone();
            let mut outs = Vec::new();
            for blk in &self.blocks {
                h = blk.forward(&h)?;
                outs.push(h.clone());
            }
            let pred = self.head(&h.narrow(D::Minus2, ke, mp.keep)?)?;
            return Ok(PredictorTrace {
                tokens_in,
                blocks: outs,
                pred,
            });
        }
        // The same values with less work: block 0 takes the untiled context (its per-token work
        // on the context is the same for every target mask), and the last block computes its
        // per-token work after the attention for the mask tokens only, the outputs kept.
        let last = self.blocks.len() - 1;
        let from = |i: usize| if i == last { ke } else { 0 };
        let shared = Sequence::SharedContext {
            ctx: &x,
            tok: &tok,
            copies: npred,
        };
        let mut h = self.blocks[0].forward_tokens_from(shared, from(0))?;
        for (i, blk) in self.blocks.iter().enumerate().skip(1) {
            h = blk.forward_tokens_from(Sequence::Full(&h), from(i))?;
        }
        Ok(PredictorTrace {
            tokens_in: Tensor::zeros(0, h.dtype(), h.device())?,
            blocks: Vec::new(),
            pred: self.head(&h)?,
        })
    }

    /// `predictor_norm` and `predictor_proj` of the mask-token outputs.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.norm.forward(h)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::model::fused::testutil::{assert_close, randn};
    use crate::model::jepa::{parameter_shapes, JepaNetworks};

    /// A 4x4-token ViT of width 12 with a predictor of width 16.
    fn cfg(pred_depth: usize) -> VitConfig {
        VitConfig {
            img_size: 32,
            patch_size: 8,
            embed_dim: 12,
            depth: 1,
            mlp_ratio: 2.0,
            pred_embed_dim: 16,
            pred_depth,
            pred_num_heads: 2,
            ..VitConfig::vit_tiny()
        }
    }

    /// Index masks `(b, k)` of distinct tokens of a 16-token grid.
    fn masks(b: usize, k: usize, count: usize, seed: i64) -> Vec<Tensor> {
        (0..count as i64)
            .map(|m| {
                let v: Vec<i64> = (0..b as i64)
                    .flat_map(|r| (0..k as i64).map(move |j| (5 * j + 3 * r + 7 * m + seed) % 16))
                    .collect();
                Tensor::from_vec(v, (b, k), &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// The cheaper predictor pass (shared context in block 0, mask tokens only after the
    /// attention of the last block) gives the literal computation's predictions and gradients.
    #[test]
    fn the_cheap_pass_matches_the_literal_one_in_values_and_gradients() {
        for (depth, nenc, npred) in [(2, 1, 4), (1, 2, 3), (3, 1, 1)] {
            let c = cfg(depth);
            let shapes = parameter_shapes(&c).unwrap();
            let tensors = shapes
                .iter()
                .enumerate()
                .map(|(i, (name, shape))| {
                    let t = randn(shape, 100 + i as u64).affine(0.3, 0.0).unwrap();
                    (name.clone(), t)
                })
                .collect();
            let nets = JepaNetworks::from_tensors(&c, &tensors, &Device::Cpu).unwrap();
            let vars: Vec<(String, Var)> = nets
                .online_vars()
                .into_iter()
                .filter(|(n, _)| n.starts_with("predictor."))
                .collect();
            let b = 2;
            let ctx = Var::from_tensor(&randn(&[nenc * b, 5, 12], 7)).unwrap();
            let (me, mp) = (masks(b, 5, nenc, 0), masks(b, 4, npred, 1));
            let p = &nets.predictor;
            let cheap = p.forward(ctx.as_tensor(), &me, &mp).unwrap();
            let literal = p
                .forward_trace(ctx.as_tensor(), &me, &mp, true)
                .unwrap()
                .pred;
            let what = format!("depth {depth}, nenc {nenc}, npred {npred}");
            assert_close(&format!("{what}: pred"), &cheap, &literal, 1e-5, 1e-4);

            let probe = randn(cheap.dims(), 9);
            let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (gc, gl) = (grads(&cheap), grads(&literal));
            assert!(!vars.is_empty());
            for (name, v) in vars
                .iter()
                .map(|(n, v)| (n.as_str(), v))
                .chain([("ctx", &ctx)])
            {
                let (a, l) = (gc.get(v.as_tensor()), gl.get(v.as_tensor()));
                let l = l.unwrap_or_else(|| panic!("{what}: no gradient of {name}"));
                let a = a.unwrap_or_else(|| panic!("{what}: the cheap pass lost d{name}"));
                assert_close(&format!("{what}: d{name}"), a, l, 1e-5, 1e-4);
                assert_eq!(a.dtype(), DType::F32);
            }
        }
    }
}

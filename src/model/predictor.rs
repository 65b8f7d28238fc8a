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
use super::layers::{Block, LayerNorm, Linear};
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

    /// `forward` that also returns the block inputs/outputs when `keep` is true.
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
        // 4-5: tile the context stack npred times and append the mask tokens.
        let x = if npred == 1 {
            x
        } else {
            Tensor::cat(&vec![x; npred], 0)?
        };
        let mut h = Tensor::cat(&[x, tok], 1)?;
        let tokens_in = if keep {
            h.clone()
        } else {
            Tensor::zeros(0, h.dtype(), h.device())?
        };
        let mut outs = Vec::new();
        // 6: blocks, norm, keep the mask-token positions, project back to D.
        for blk in &self.blocks {
            h = blk.forward(&h)?;
            if keep {
                outs.push(h.clone());
            }
        }
        let h = self.norm.forward(&h)?;
        let h = h.narrow(D::Minus2, ke, mp.keep)?;
        let pred = self.proj.forward(&h)?;
        Ok(PredictorTrace {
            tokens_in,
            blocks: outs,
            pred,
        })
    }
}

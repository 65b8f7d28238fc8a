//! Building blocks of the ViT encoder and the predictor, all with a working backward pass.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` (also used by `candle_nn::LayerNorm`) record
//! no backward op, so gradients would silently stop there (CANDLE.md). For f32 tensors on the CPU
//! every layer takes the fused kernels of [`super::fused`] (each a `CustomOp` with its backward)
//! while `fused::enabled()`; otherwise, and on other devices, it is composed of differentiable
//! candle primitives (the `*_unfused` functions). Weight names follow the official I-JEPA
//! `state_dict` (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`).

use candle_core::{Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::config::VitConfig;
use super::error::Result;
use super::{cuda_ops, fused, precision};

/// The `k x k` taps of a "same" convolution (stride 1, zero padding `k / 2`) of `x` over its
/// axes `(ah, aw)`: tap `(i, j)` (row-major) is `x` shifted by `(i - k/2, j - k/2)`, a view of
/// the padded map with `x`'s shape.
pub fn shifted_taps(x: &Tensor, k: usize, (ah, aw): (usize, usize)) -> Result<Vec<Tensor>> {
    let (h, w) = (x.dim(ah)?, x.dim(aw)?);
    let p = k / 2;
    let xp = x.pad_with_zeros(ah, p, p)?.pad_with_zeros(aw, p, p)?;
    let mut taps = Vec::with_capacity(k * k);
    for i in 0..k {
        for j in 0..k {
            taps.push(xp.narrow(ah, i, h)?.narrow(aw, j, w)?);
        }
    }
    Ok(taps)
}

/// Softmax over the last axis (fused kernel on the CPU, else [`softmax_last_unfused`]).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused::applies_to(x) {
        return Ok(fused::softmax_last(x)?);
    }
    if cuda_ops::applies(x) {
        return Ok(cuda_ops::softmax_last(x)?);
    }
    softmax_last_unfused(x)
}

/// Softmax over the last axis from candle primitives. The row max is detached (softmax is shift
/// invariant), which keeps the backward graph small without changing the gradient.
pub fn softmax_last_unfused(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// LayerNorm over the last axis (biased variance) without affine parameters.
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::applies_to(x) {
        return Ok(fused::layer_norm_plain(x, eps)?);
    }
    if cuda_ops::applies(x) {
        return Ok(cuda_ops::layer_norm(x, None, eps)?);
    }
    layer_norm_plain_unfused(x, eps)
}

/// [`layer_norm_plain`] from candle primitives.
pub fn layer_norm_plain_unfused(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok(xc.broadcast_mul(&rstd)?)
}

/// Affine LayerNorm (`weight`, `bias`) with a backward pass.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Weight 1, bias 0 at init.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// Normalises the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::applies_to(x) {
            return Ok(fused::layer_norm(x, &self.weight, &self.bias, self.eps)?);
        }
        if cuda_ops::applies(x) {
            return Ok(cuda_ops::layer_norm(
                x,
                Some((&self.weight, &self.bias)),
                self.eps,
            )?);
        }
        let xn = layer_norm_plain_unfused(x, self.eps)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// `y = x W^T + b` over the last axis, PyTorch layout `weight = (out, in)`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Weight N(0, init_std^2) (the official trunc-normal at +-2 absolute), bias 0.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init_std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: init_std,
            },
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Applies the layer to `(..., in)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::applies_to(x) {
            return Ok(fused::linear(x, &self.weight, self.bias.as_ref())?);
        }
        let dims = x.dims().to_vec();
        let in_dim = dims.last().copied().unwrap_or(1);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let y = precision::matmul(&x.reshape((rows, in_dim))?, &self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = y.dim(1)?;
        }
        Ok(y.reshape(out_dims)?)
    }
}

/// Multi-head self-attention without mask; `qkv` channels are (3, heads, head_dim).
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    /// `attn.qkv` (dim -> 3 dim) and `attn.proj` (dim -> dim).
    pub fn new(dim: usize, num_heads: usize, cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let qkv = Linear::new(dim, 3 * dim, cfg.qkv_bias, cfg.init_std, vb.pp("qkv"))?;
        let proj = Linear::new(dim, dim, true, cfg.init_std, vb.pp("proj"))?;
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv,
            proj,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `(B, T, E) -> (B, T, E)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.attend(&self.qkv(x)?)
    }

    /// The `qkv` projection `(B, T, E) -> (B, T, 3E)`, per token.
    pub fn qkv(&self, x: &Tensor) -> Result<Tensor> {
        self.qkv.forward(x)
    }

    /// [`Self::attend`] for the query tokens from position `from` on: `(B, T, 3E) -> (B, T -
    /// from, E)`; `proj`, per token, runs on those tokens only.
    pub fn attend_from(&self, qkv: &Tensor, from: usize) -> Result<Tensor> {
        if from == 0 {
            return self.attend(qkv);
        }
        let out = self.attend_heads(qkv)?;
        let t = out.dim(1)?;
        self.proj
            .forward(&out.narrow(1, from, t - from)?.contiguous()?)
    }

    /// Attention and `proj` from the `qkv` projection: `(B, T, 3E) -> (B, T, E)`.
    pub fn attend(&self, qkv: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.attend_heads(qkv)?)
    }

    /// The heads' attention outputs, concatenated, before `proj`: `(B, T, 3E) -> (B, T, E)`.
    fn attend_heads(&self, qkv: &Tensor) -> Result<Tensor> {
        let (b, t, e3) = qkv.dims3()?;
        let e = e3 / 3;
        let h = self.num_heads;
        let hd = e / h;
        if fused::applies_to(qkv) {
            return Ok(fused::attention(qkv, h, self.scale)?);
        }
        let qkv = qkv.reshape((b, t, 3, h, hd))?.permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let attn = precision::matmul(&q, &k.t()?)?.affine(self.scale, 0.0)?;
        let attn = softmax_last(&attn)?;
        Ok(precision::matmul(&attn, &v)?
            .transpose(1, 2)?
            .reshape((b, t, e))?)
    }
}

/// `fc2(GELU_erf(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// `mlp.fc1` (dim -> hidden) and `mlp.fc2` (hidden -> dim).
    pub fn new(dim: usize, hidden: usize, init_std: f64, vb: VarBuilder) -> Result<Self> {
        let fc1 = Linear::new(dim, hidden, true, init_std, vb.pp("fc1"))?;
        let fc2 = Linear::new(hidden, dim, true, init_std, vb.pp("fc2"))?;
        Ok(Self { fc1, fc2 })
    }

    /// Applies the MLP to the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::applies_to(x) {
            if let Some(b) = &self.fc1.bias {
                let h = fused::linear_gelu(x, &self.fc1.weight, b)?;
                return self.fc2.forward(&h);
            }
        }
        let h = self.fc1.forward(x)?;
        let h = if fused::applies_to(&h) {
            fused::gelu_erf(&h)?
        } else {
            h.gelu_erf()?
        };
        self.fc2.forward(&h)
    }
}

/// The input sequence of [`Block::forward_tokens_from`].
#[derive(Debug, Clone, Copy)]
pub enum Sequence<'a> {
    /// `(B, T, E)`.
    Full(&'a Tensor),
    /// The sequences `cat([ctx, tok_i], 1)` for the `copies` blocks of rows `tok_i` of `tok`
    /// (`tok` is `(copies * B, Kt, E)`, `ctx` is `(B, Kc, E)`): every copy starts with the same
    /// context tokens, as in the I-JEPA predictor's first block, where the sequences of the
    /// target masks share the context. The context's `norm1` and `qkv`, per token, run once
    /// instead of `copies` times (and their backward once, on the gradient summed over the
    /// copies); the attention, which mixes the tokens, runs per sequence.
    SharedContext {
        ctx: &'a Tensor,
        tok: &'a Tensor,
        copies: usize,
    },
}

/// Pre-norm transformer block: `x += attn(norm1(x)); x += mlp(norm2(x))`.
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// One block of width `dim` (encoder: D, predictor: Dp).
    pub fn new(dim: usize, num_heads: usize, cfg: &VitConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, cfg.ln_eps, vb.pp("norm1"))?,
            attn: Attention::new(dim, num_heads, cfg, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, cfg.ln_eps, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, cfg.mlp_hidden(dim), cfg.init_std, vb.pp("mlp"))?,
        })
    }

    /// `(B, T, E) -> (B, T, E)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_tokens_from(Sequence::Full(x), 0)
    }

    /// [`Self::forward`] of `seq`, returning only the output tokens from position `from` on.
    /// Every token still enters the attention as key and value; the `proj` and the MLP, per
    /// token, skip the tokens before `from`. Same values as `forward(..).narrow(1, from, ..)`
    /// of the whole sequence, up to float summation order (tested against it).
    pub fn forward_tokens_from(&self, seq: Sequence, from: usize) -> Result<Tensor> {
        let (x, qkv) = match seq {
            Sequence::Full(x) => (x.clone(), self.attn.qkv(&self.norm1.forward(x)?)?),
            Sequence::SharedContext { ctx, tok, copies } => {
                let tile = |t: &Tensor| -> Result<Tensor> {
                    Ok(if copies == 1 {
                        t.clone()
                    } else {
                        Tensor::cat(&vec![t; copies], 0)?
                    })
                };
                let qkv_ctx = self.attn.qkv(&self.norm1.forward(ctx)?)?;
                let qkv_tok = self.attn.qkv(&self.norm1.forward(tok)?)?;
                (
                    Tensor::cat(&[tile(ctx)?, tok.clone()], 1)?,
                    Tensor::cat(&[tile(&qkv_ctx)?, qkv_tok], 1)?,
                )
            }
        };
        let t = x.dim(1)?;
        let x = if from == 0 {
            x
        } else {
            x.narrow(1, from, t - from)?
        };
        let x = (x + self.attn.attend_from(&qkv, from)?)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        Ok((x + y)?)
    }

    /// Forward with stochastic depth (timm `DropPath`): each residual branch is multiplied by its
    /// per-sample `(B, 1, 1)` scale (0 for a dropped sample, `1 / keep_prob` otherwise); `None`
    /// keeps the branch as is.
    pub fn forward_drop_path(
        &self,
        x: &Tensor,
        attn_scale: Option<&Tensor>,
        mlp_scale: Option<&Tensor>,
    ) -> Result<Tensor> {
        let a = self.attn.forward(&self.norm1.forward(x)?)?;
        let a = match attn_scale {
            Some(s) => a.broadcast_mul(s)?,
            None => a,
        };
        let x = (x + a)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        let y = match mlp_scale {
            Some(s) => y.broadcast_mul(s)?,
            None => y,
        };
        Ok((x + y)?)
    }
}

//! Semantic-segmentation heads on plain-ViT features (EVALS.md §3).
//!
//! - [`LinearSegHead`]: the cheap protocol of iBOT (`configs/linear/vit_base_512_ade20k_160k.py`):
//!   features of several blocks (each after the final norm), resized to one size and
//!   concatenated, then a 1×1 convolution (`FCNHead`, `num_convs=0`, no dropout) to the classes.
//! - [`UperNet`]: a compact copy of mmseg's `upernet_mae.py`: `Feature2Pyramid` (rescales 4, 2,
//!   1, 0.5 with 2×2 transposed convolutions and a 2×2 max-pool), `UPerHead` (pyramid pooling
//!   1, 2, 3, 6 on the coarsest level, lateral 1×1 and FPN 3×3 ConvModules, top-down fusion,
//!   3×3 bottleneck, Dropout2d, 1×1 classifier) and the auxiliary `FCNHead` (one 3×3 ConvModule
//!   on level 2). ConvModule = conv (no bias) + BatchNorm + ReLU.
//!
//! Every op records a backward: resizing and adaptive pooling are matmuls ([`super::resize`]),
//! the transposed 2×2/stride-2 convolutions are a matmul plus a pixel shuffle, max-pooling a
//! reshape plus `max`. BatchNorm keeps its running statistics as variables named
//! `*.running_mean` / `*.running_var` (not trained, but saved with the weights). Random init and
//! dropout draw from explicit ChaCha8 generators, so runs are reproducible.

use candle_core::{Tensor, Var, D};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::{ModelError, Result};
use super::resize::{adaptive_avg_pool, resize_bilinear};
use super::{launch, precision};

/// BatchNorm epsilon and momentum (PyTorch defaults, as mmseg's `SyncBN`).
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Fill every variable of `varmap` from a ChaCha8 generator seeded with `seed`, visiting names in
/// sorted order: `*.running_var` and 1-D `*.weight` (BatchNorm) = 1, biases and running means = 0,
/// `*conv_seg.weight` ~ N(0, 0.01²) (mmseg `normal_init`), transposed-conv weights of the neck
/// ~ N(0, 0.02²), other conv weights Kaiming-normal with fan-out (mmseg ConvModule).
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let konst = |c: f32| vec![c; n];
        let v = if name.ends_with("running_var") || (dims.len() == 1 && name.ends_with("weight")) {
            konst(1.0)
        } else if name.ends_with("bias") || name.ends_with("running_mean") {
            konst(0.0)
        } else if name.ends_with("conv_seg.weight") {
            normal(&mut rng, n, 0.01)
        } else if name.contains("upsample_") {
            normal(&mut rng, n, 0.02)
        } else {
            let fan_out = dims[0] * dims[2..].iter().product::<usize>();
            normal(&mut rng, n, (2.0 / fan_out as f64).sqrt())
        };
        var.set(&Tensor::from_vec(v, dims, var.device())?)?;
    }
    Ok(())
}

/// `n` draws of N(0, std²) (Box-Muller).
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        out.push((r * (std::f64::consts::TAU * u2).cos() * std) as f32);
        out.push((r * (std::f64::consts::TAU * u2).sin() * std) as f32);
    }
    out.truncate(n);
    out
}

/// `nn.Dropout2d(p)` in training: whole channels of each sample are zeroed, the rest scaled by
/// `1/(1-p)`; the mask comes from `rng`.
pub fn dropout2d(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let (b, c, _, _) = x.dims4()?;
    let keep = 1.0 / (1.0 - p);
    let m: Vec<f32> = (0..b * c)
        .map(|_| {
            if rng.gen::<f64>() < p {
                0.0
            } else {
                keep as f32
            }
        })
        .collect();
    let m = Tensor::from_vec(m, (b, c, 1, 1), x.device())?;
    Ok(x.broadcast_mul(&m)?)
}

/// `(B, N, D)` tokens of a `gh × gw` grid to a `(B, D, gh, gw)` map.
pub fn tokens_to_map(t: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
    let (b, n, d) = t.dims3()?;
    if n != gh * gw {
        return Err(ModelError::Input {
            what: "features",
            msg: format!("{n} tokens for a {gh}x{gw} grid"),
        });
    }
    Ok(t.transpose(1, 2)?.contiguous()?.reshape((b, d, gh, gw))?)
}

/// BatchNorm2d with running statistics kept as variables.
#[derive(Debug, Clone)]
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm2d {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(c, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(c, "running_var", Init::Const(1.0))?,
        })
    }

    /// Training: batch statistics (biased variance), running statistics updated with the
    /// unbiased variance; evaluation: running statistics.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = self.weight.dim(0)?;
        let shape = (1, c, 1, 1);
        let (mean, var) = if train {
            let (b, _, h, w) = x.dims4()?;
            let n = b * h * w;
            let mean = x.mean_keepdim((0, 2, 3))?;
            let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
            let unbiased = (var.detach() * (n as f64 / (n.max(2) - 1) as f64))?;
            let m = BN_MOMENTUM;
            let rm =
                ((self.running_mean.detach() * (1.0 - m))? + (mean.detach().reshape(c)? * m)?)?;
            let rv = ((self.running_var.detach() * (1.0 - m))? + (unbiased.reshape(c)? * m)?)?;
            Var::from_tensor(&self.running_mean)?.set(&rm)?;
            Var::from_tensor(&self.running_var)?.set(&rv)?;
            (mean, var)
        } else {
            (
                self.running_mean.detach().reshape(shape)?,
                self.running_var.detach().reshape(shape)?,
            )
        };
        let xn = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        Ok(xn
            .broadcast_mul(&self.weight.reshape(shape)?)?
            .broadcast_add(&self.bias.reshape(shape)?)?)
    }
}

/// mmcv `ConvModule`: k×k conv (padding k/2, no bias) + BatchNorm + ReLU.
#[derive(Debug, Clone)]
struct ConvModule {
    weight: Tensor,
    bn: BatchNorm2d,
}

impl ConvModule {
    fn new(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb
            .pp("conv")
            .get_with_hints((cout, cin, k, k), "weight", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bn: BatchNorm2d::new(cout, vb.pp("bn"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = conv_same(x, &self.weight)?;
        Ok(self.bn.forward(&y, train)?.relu()?)
    }
}

/// Stride-1 convolution with `k/2` zero padding (odd `k`), no bias, as an im2col (shifted views
/// stacked) times the `(out, in*k*k)` weight matrix, on every device: candle's `conv2d` backward
/// goes through a direct `conv_transpose2d` loop (orders of magnitude slower on the CPU, naive on
/// CUDA), and its CUDA im2col of a batch of 10+ UperNet maps passes 2^32 elements. The column
/// buffer is bounded by [`launch::MAX_LAUNCH_ELEMS`]: larger batches run in chunks of images.
pub fn conv_same(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    conv_same_limited(x, weight, launch::MAX_LAUNCH_ELEMS)
}

/// [`conv_same`] with no intermediate over `limit` elements (tests lower the limit).
pub fn conv_same_limited(x: &Tensor, weight: &Tensor, limit: usize) -> Result<Tensor> {
    let (cout, cin, k, _) = weight.dims4()?;
    let (_, c, h, w) = x.dims4()?;
    if c != cin {
        return Err(ModelError::Input {
            what: "conv",
            msg: format!("{c} input channels, the weight expects {cin}"),
        });
    }
    let per_image = (cin * k * k).max(cout) * h * w;
    launch::map_row_chunks(x, per_image, limit, |x| conv_cols(x, weight))
}

fn conv_cols(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (cout, cin, k, _) = weight.dims4()?;
    let (b, c, h, w) = x.dims4()?;
    let cols = if k == 1 {
        x.reshape((b, c, h * w))?
    } else {
        let taps = super::layers::shifted_taps(x, k, (2, 3))?;
        // (B, C, k*k, H, W): column index c*k*k + i*k + j, the order of the weight's flattening.
        Tensor::stack(&taps, 2)?.reshape((b, c * k * k, h * w))?
    };
    let wm = weight.reshape((cout, cin * k * k))?;
    Ok(precision::broadcast_matmul(&wm, &cols)?.reshape((b, cout, h, w))?)
}

/// 1×1 convolution with bias (`conv_seg`), as a matmul over channels.
#[derive(Debug, Clone)]
struct Conv1x1 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1x1 {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((cout, cin, 1, 1), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(cout, "bias", Init::Const(0.0))?,
        })
    }

    /// `(B, N, Cin)` tokens to `(B, N, Cout)`.
    fn forward_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (cout, cin, _, _) = self.weight.dims4()?;
        let w = self.weight.reshape((cout, cin))?.t()?;
        Ok(precision::broadcast_matmul(x, &w)?.broadcast_add(&self.bias)?)
    }

    /// `(B, Cin, H, W)` to `(B, Cout, H, W)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let t = x.reshape((b, cin, h * w))?.transpose(1, 2)?.contiguous()?;
        let y = self.forward_tokens(&t)?;
        let cout = y.dim(2)?;
        Ok(y.transpose(1, 2)?.contiguous()?.reshape((b, cout, h, w))?)
    }
}

/// The linear protocol's classifier: concat of block features (each after the final norm) →
/// 1×1 conv to the classes.
#[derive(Debug, Clone)]
pub struct LinearSegHead {
    conv_seg: Conv1x1,
    n_layers: usize,
}

impl LinearSegHead {
    /// `n_layers` feature maps of width `dim` each, `classes` outputs; weights `conv_seg.*`.
    pub fn new(dim: usize, n_layers: usize, classes: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv_seg: Conv1x1::new(dim * n_layers, classes, vb.pp("conv_seg"))?,
            n_layers,
        })
    }

    /// Logits `(B, classes, gh, gw)` from `n_layers` token tensors `(B, gh*gw, D)` of one grid
    /// (for a plain ViT all blocks share the grid, so the "resize to a common size" of
    /// `resize_concat` is the identity).
    pub fn forward(&self, feats: &[Tensor], gh: usize, gw: usize) -> Result<Tensor> {
        if feats.len() != self.n_layers {
            return Err(ModelError::Input {
                what: "features",
                msg: format!(
                    "{} feature maps, the head takes {}",
                    feats.len(),
                    self.n_layers
                ),
            });
        }
        let x = Tensor::cat(feats, D::Minus1)?;
        let y = self.conv_seg.forward_tokens(&x)?;
        tokens_to_map(&y, gh, gw)
    }
}

/// 2×2 / stride-2 `ConvTranspose2d` with bias, weight `(in, out, 2, 2)` as in PyTorch.
#[derive(Debug, Clone)]
struct Deconv2x2 {
    weight: Tensor,
    bias: Tensor,
}

impl Deconv2x2 {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((cin, cout, 2, 2), "weight", Init::Const(0.0))?,
            bias: vb.get_with_hints(cout, "bias", Init::Const(0.0))?,
        })
    }

    /// `out[b, o, 2i+ki, 2j+kj] = Σ_c x[b, c, i, j] W[c, o, ki, kj] + bias[o]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let cout = self.weight.dim(1)?;
        let t = x
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((b * h * w, cin))?;
        let wm = self.weight.reshape((cin, cout * 4))?;
        let bias = self
            .bias
            .reshape((cout, 1))?
            .broadcast_as((cout, 4))?
            .contiguous()?
            .reshape(cout * 4)?;
        let y = precision::matmul(&t, &wm)?.broadcast_add(&bias)?;
        Ok(y.reshape((b, h, w, cout, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))?
            .contiguous()?
            .reshape((b, cout, 2 * h, 2 * w))?)
    }
}

/// `nn.MaxPool2d(2, 2)` (odd sizes floored).
fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    if h2 == 0 || w2 == 0 {
        return Err(ModelError::Input {
            what: "features",
            msg: format!(
                "a {h}x{w} map is too small for the 0.5 level of the pyramid; use larger crops"
            ),
        });
    }
    let x = x.narrow(2, 0, h2 * 2)?.narrow(3, 0, w2 * 2)?.contiguous()?;
    Ok(x.reshape((b, c, h2, 2, w2, 2))?.max(5)?.max(3)?)
}

/// Hyper-parameters of [`UperNet`].
#[derive(Debug, Clone, PartialEq)]
pub struct UperNetConfig {
    /// Backbone width D.
    pub in_dim: usize,
    /// Width of the decode head (mmseg: 768).
    pub channels: usize,
    /// Width of the auxiliary FCN head (mmseg: 256; 0 = no auxiliary head).
    pub aux_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Dropout2d before the classifiers (mmseg: 0.1).
    pub dropout: f64,
}

/// Pyramid pooling scales.
const POOL_SCALES: [usize; 4] = [1, 2, 3, 6];

/// Feature2Pyramid + UPerHead + auxiliary FCNHead.
#[derive(Debug, Clone)]
pub struct UperNet {
    cfg: UperNetConfig,
    up4: (Deconv2x2, BatchNorm2d, Deconv2x2),
    up2: Deconv2x2,
    psp: Vec<ConvModule>,
    bottleneck: ConvModule,
    lateral: Vec<ConvModule>,
    fpn: Vec<ConvModule>,
    fpn_bottleneck: ConvModule,
    conv_seg: Conv1x1,
    aux: Option<(ConvModule, Conv1x1)>,
}

impl UperNet {
    /// Weight names follow mmseg: `neck.*`, `decode_head.*`, `auxiliary_head.*`.
    pub fn new(cfg: &UperNetConfig, vb: VarBuilder) -> Result<Self> {
        let (d, c) = (cfg.in_dim, cfg.channels);
        let neck = vb.pp("neck");
        let u4 = neck.pp("upsample_4x");
        let up4 = (
            Deconv2x2::new(d, d, u4.pp("0"))?,
            BatchNorm2d::new(d, u4.pp("1"))?,
            Deconv2x2::new(d, d, u4.pp("3"))?,
        );
        let up2 = Deconv2x2::new(d, d, neck.pp("upsample_2x").pp("0"))?;
        let dh = vb.pp("decode_head");
        let psp = (0..POOL_SCALES.len())
            .map(|i| ConvModule::new(d, c, 1, dh.pp("psp_modules").pp(i).pp("1")))
            .collect::<Result<Vec<_>>>()?;
        let bottleneck = ConvModule::new(d + POOL_SCALES.len() * c, c, 3, dh.pp("bottleneck"))?;
        let lateral = (0..3)
            .map(|i| ConvModule::new(d, c, 1, dh.pp("lateral_convs").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let fpn = (0..3)
            .map(|i| ConvModule::new(c, c, 3, dh.pp("fpn_convs").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let fpn_bottleneck = ConvModule::new(4 * c, c, 3, dh.pp("fpn_bottleneck"))?;
        let conv_seg = Conv1x1::new(c, cfg.classes, dh.pp("conv_seg"))?;
        let aux = if cfg.aux_channels > 0 {
            let ah = vb.pp("auxiliary_head");
            Some((
                ConvModule::new(d, cfg.aux_channels, 3, ah.pp("convs").pp("0"))?,
                Conv1x1::new(cfg.aux_channels, cfg.classes, ah.pp("conv_seg"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            up4,
            up2,
            psp,
            bottleneck,
            lateral,
            fpn,
            fpn_bottleneck,
            conv_seg,
            aux,
        })
    }

    /// Logits at 4× the feature grid `(B, classes, 4gh, 4gw)` from four `(B, D, gh, gw)` maps
    /// (shallow to deep), plus the auxiliary logits `(B, classes, gh, gw)` in training.
    /// `rng` drives Dropout2d (training only).
    pub fn forward(
        &self,
        feats: &[Tensor],
        train: bool,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if feats.len() != 4 {
            return Err(ModelError::Input {
                what: "features",
                msg: format!("UperNet takes 4 feature maps, got {}", feats.len()),
            });
        }
        // Feature2Pyramid: rescales 4, 2, 1, 0.5.
        let (a, bn, b) = &self.up4;
        let l0 = bn.forward(&a.forward(&feats[0])?, train)?.gelu_erf()?;
        let l0 = b.forward(&l0)?;
        let l1 = self.up2.forward(&feats[1])?;
        let l2 = feats[2].clone();
        let l3 = max_pool_2x2(&feats[3])?;
        let inputs = [l0, l1, l2, l3];
        // UPerHead.
        let mut laterals: Vec<Tensor> = (0..3)
            .map(|i| self.lateral[i].forward(&inputs[i], train))
            .collect::<Result<Vec<_>>>()?;
        laterals.push(self.psp_forward(&inputs[3], train)?);
        for i in (1..4).rev() {
            let (_, _, h, w) = laterals[i - 1].dims4()?;
            let up = resize_bilinear(&laterals[i], h, w)?;
            laterals[i - 1] = (&laterals[i - 1] + up)?;
        }
        let mut outs: Vec<Tensor> = (0..3)
            .map(|i| self.fpn[i].forward(&laterals[i], train))
            .collect::<Result<Vec<_>>>()?;
        outs.push(laterals[3].clone());
        let (_, _, h0, w0) = outs[0].dims4()?;
        for o in outs.iter_mut().skip(1) {
            *o = resize_bilinear(o, h0, w0)?;
        }
        let fused = self
            .fpn_bottleneck
            .forward(&Tensor::cat(&outs, 1)?, train)?;
        let fused = match (train, rng.as_deref_mut()) {
            (true, Some(r)) => dropout2d(&fused, self.cfg.dropout, r)?,
            _ => fused,
        };
        let logits = self.conv_seg.forward(&fused)?;
        let aux = match (&self.aux, train) {
            (Some((conv, seg)), true) => {
                let a = conv.forward(&inputs[2], train)?;
                let a = match rng.as_deref_mut() {
                    Some(r) => dropout2d(&a, self.cfg.dropout, r)?,
                    None => a,
                };
                Some(seg.forward(&a)?)
            }
            _ => None,
        };
        Ok((logits, aux))
    }

    /// The same architecture with variables from another builder (e.g. frozen tensors).
    pub fn rebuild(&self, vb: VarBuilder) -> Result<Self> {
        Self::new(&self.cfg, vb)
    }

    fn psp_forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut outs = vec![x.clone()];
        for (m, &s) in self.psp.iter().zip(POOL_SCALES.iter()) {
            let p = m.forward(&adaptive_avg_pool(x, s, s)?, train)?;
            outs.push(resize_bilinear(&p, h, w)?);
        }
        self.bottleneck.forward(&Tensor::cat(&outs, 1)?, train)
    }
}

/// Names of trainable variables (running statistics excluded), sorted.
pub fn trainable(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests;

//! The network of the `ade20k_segmentation` stage: backbone + head (linear or UperNet) with their
//! variables, the loss, the learning-rate schedule and the layer-wise lr decay (mmseg recipes).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{Params, Protocol, CLASSES};
use crate::error::{Error, Result};
use crate::model::resize::resize_bilinear;
use crate::model::seg_heads::{self, tokens_to_map, LinearSegHead, UperNet, UperNetConfig};
use crate::model::{VisionTransformer, VitConfig};
use crate::stages::backbone;

/// mmseg poly schedule with linear warmup: `lr * (1e-6 + (1 - 1e-6) * t / W)` during warmup, then
/// `lr * (1 - (t - W) / (T - W))`.
pub fn lr_at(base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        let start = 1e-6;
        return base * (start + (1.0 - start) * step as f64 / warmup as f64);
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    base * (1.0 - (step - warmup) as f64 / span).max(0.0)
}

/// mmseg `LayerDecayOptimizerConstructor` scale of a parameter of the segmentation network:
/// the backbone's (`backbone.*`) by [`crate::train::layer_decay`], the head's 1.
pub fn layer_scale(name: &str, depth: usize, decay: f64) -> f64 {
    name.strip_prefix("backbone.").map_or(1.0, |r| {
        crate::train::layer_decay::layer_scale(r, depth, decay)
    })
}

/// Model-layer errors (shapes, configs) as data errors of the stage.
pub(super) fn merr(e: crate::model::ModelError) -> Error {
    Error::Data(format!("model: {e}"))
}

/// The network being trained: head (and for UperNet the backbone) with their variables.
pub(super) struct Model {
    pub(super) protocol: Protocol,
    pub(super) cfg: VitConfig,
    pub(super) layers: Vec<i64>,
    /// Trainable backbone (UperNet) or a frozen copy without variables (linear).
    pub(super) encoder: VisionTransformer,
    /// Backbone variables (UperNet only: saved in checkpoints, trained).
    pub(super) backbone_vars: Option<VarMap>,
    pub(super) head_vars: VarMap,
    pub(super) linear: Option<LinearSegHead>,
    pub(super) upernet: Option<UperNet>,
}

/// A detached, variable-free copy of a VarMap's tensors (inference; frozen features).
pub(super) fn frozen_tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect()
}

impl Model {
    pub(super) fn new(
        p: &Params,
        bb: backbone::Backbone,
        layers: Vec<i64>,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let head_vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&head_vars, DType::F32, dev);
        let d = bb.cfg.embed_dim;
        let (linear, upernet) = match p.protocol {
            Protocol::Linear => (
                Some(LinearSegHead::new(d, layers.len(), CLASSES, vb).map_err(merr)?),
                None,
            ),
            Protocol::Upernet => {
                let cfg = UperNetConfig {
                    in_dim: d,
                    channels: p.channels,
                    aux_channels: p.aux_channels,
                    classes: CLASSES,
                    dropout: p.dropout,
                };
                (None, Some(UperNet::new(&cfg, vb).map_err(merr)?))
            }
        };
        seg_heads::seeded_init(&head_vars, seed).map_err(merr)?;
        let (encoder, backbone_vars) = match p.protocol {
            Protocol::Linear => {
                let t = frozen_tensors(&bb.varmap);
                let vb = VarBuilder::from_tensors(t, DType::F32, dev);
                (VisionTransformer::new(&bb.cfg, vb).map_err(merr)?, None)
            }
            Protocol::Upernet => (bb.encoder, Some(bb.varmap)),
        };
        Ok(Self {
            protocol: p.protocol,
            cfg: bb.cfg,
            layers,
            encoder,
            backbone_vars,
            head_vars,
            linear,
            upernet,
        })
    }

    /// Named trainable variables: `head.*` and (UperNet) `backbone.*`.
    pub(super) fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        let mut v: Vec<(String, candle_core::Var)> = seg_heads::trainable(&self.head_vars)
            .into_iter()
            .map(|(k, v)| (format!("head.{k}"), v))
            .collect();
        if let Some(bv) = &self.backbone_vars {
            v.extend(
                seg_heads::trainable(bv)
                    .into_iter()
                    .map(|(k, v)| (format!("backbone.{k}"), v)),
            );
        }
        v
    }

    /// Logits resized to the input size, plus auxiliary logits (training, UperNet).
    pub(super) fn forward(
        &self,
        encoder: &VisionTransformer,
        head: Heads<'_>,
        x: &Tensor,
        train: bool,
        rng: Option<&mut rand_chacha::ChaCha8Rng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let feats = encoder
            .forward_layers(x, None, &self.layers)
            .map_err(merr)?;
        let (logits, aux) = match head {
            Heads::Linear(l) => {
                let feats: Vec<Tensor> = feats.iter().map(|f| f.detach()).collect();
                (l.forward(&feats, gh, gw).map_err(merr)?, None)
            }
            Heads::Upernet(u) => {
                let maps = feats
                    .iter()
                    .map(|f| tokens_to_map(f, gh, gw))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(merr)?;
                u.forward(&maps, train, rng).map_err(merr)?
            }
        };
        let logits = resize_bilinear(&logits, h, w).map_err(merr)?;
        let aux = aux
            .map(|a| resize_bilinear(&a, h, w))
            .transpose()
            .map_err(merr)?;
        Ok((logits, aux))
    }

    pub(super) fn heads(&self) -> Heads<'_> {
        match (&self.linear, &self.upernet) {
            (Some(l), _) => Heads::Linear(l),
            (_, Some(u)) => Heads::Upernet(u),
            _ => unreachable!("one head is always built"),
        }
    }

    /// Frozen (variable-free) copies of the encoder and head for inference.
    pub(super) fn frozen(&self, dev: &Device) -> Result<(VisionTransformer, OwnedHead)> {
        let enc = match &self.backbone_vars {
            Some(bv) => {
                let vb = VarBuilder::from_tensors(frozen_tensors(bv), DType::F32, dev);
                VisionTransformer::new(&self.cfg, vb).map_err(merr)?
            }
            None => self.encoder.clone(),
        };
        let vb = VarBuilder::from_tensors(frozen_tensors(&self.head_vars), DType::F32, dev);
        let head = match self.protocol {
            Protocol::Linear => OwnedHead::Linear(
                LinearSegHead::new(self.cfg.embed_dim, self.layers.len(), CLASSES, vb)
                    .map_err(merr)?,
            ),
            Protocol::Upernet => {
                let u = self.upernet.as_ref().expect("upernet head");
                OwnedHead::Upernet(u.rebuild(vb).map_err(merr)?)
            }
        };
        Ok((enc, head))
    }

    pub(super) fn save(&self, dir: &Path) -> Result<()> {
        self.head_vars.save(dir.join("head.safetensors"))?;
        if let Some(bv) = &self.backbone_vars {
            bv.save(dir.join("backbone.safetensors"))?;
        }
        Ok(())
    }

    pub(super) fn load(&mut self, dir: &Path) -> Result<()> {
        self.head_vars.load(dir.join("head.safetensors"))?;
        if let Some(bv) = &mut self.backbone_vars {
            bv.load(dir.join("backbone.safetensors"))?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
pub(super) enum Heads<'a> {
    Linear(&'a LinearSegHead),
    Upernet(&'a UperNet),
}

pub(super) enum OwnedHead {
    Linear(LinearSegHead),
    Upernet(UperNet),
}

impl OwnedHead {
    pub(super) fn as_ref(&self) -> Heads<'_> {
        match self {
            OwnedHead::Linear(l) => Heads::Linear(l),
            OwnedHead::Upernet(u) => Heads::Upernet(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_schedule_with_warmup() {
        assert!((lr_at(1.0, 0, 10, 110) - 1e-6).abs() < 1e-12);
        assert!((lr_at(1.0, 5, 10, 110) - (1e-6 + (1.0 - 1e-6) * 0.5)).abs() < 1e-12);
        assert_eq!(lr_at(1.0, 10, 10, 110), 1.0);
        assert!((lr_at(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1.0, 110, 10, 110), 0.0);
    }

    #[test]
    fn layer_decay_like_mmseg() {
        let d = 0.65f64;
        // ViT-B: 14 layer ids; the head and the final norm get 1, block 11 gets d, patch embed d^13
        assert_eq!(layer_scale("head.decode_head.conv_seg.weight", 12, d), 1.0);
        assert_eq!(layer_scale("backbone.norm.weight", 12, d), 1.0);
        let near = |a: f64, b: f64| assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        near(layer_scale("backbone.blocks.11.attn.qkv.weight", 12, d), d);
        near(
            layer_scale("backbone.blocks.0.mlp.fc1.bias", 12, d),
            d.powi(12),
        );
        near(
            layer_scale("backbone.patch_embed.proj.weight", 12, d),
            d.powi(13),
        );
    }
}

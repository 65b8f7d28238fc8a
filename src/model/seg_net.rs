//! The segmentation network of the ADE20K protocols: a ViT backbone with a linear head on the
//! patch features of a few blocks (frozen backbone) or UperNet with its auxiliary head
//! (backbone trained), with their variables (mmseg recipes; heads in [`super::seg_heads`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::error::Result;
use super::resize::resize_bilinear;
use super::seg_heads::{self, tokens_to_map, LinearSegHead, UperNet, UperNetConfig};
use super::{VisionTransformer, VitConfig};

/// Which head a [`SegNet`] carries.
#[derive(Debug, Clone)]
pub enum SegHeadConfig {
    /// A linear classifier (1x1 conv) on the concatenated block features.
    Linear {
        /// Classes of the logits.
        classes: usize,
    },
    /// UperNet with its auxiliary FCN head.
    Upernet(UperNetConfig),
}

/// The network being trained: head (and for UperNet the backbone) with their variables.
pub struct SegNet {
    /// Classes of the logits.
    pub classes: usize,
    pub cfg: VitConfig,
    pub layers: Vec<i64>,
    /// Trainable backbone (UperNet) or a frozen copy without variables (linear).
    pub encoder: VisionTransformer,
    /// Backbone variables (UperNet only: saved in checkpoints, trained).
    pub backbone_vars: Option<VarMap>,
    pub head_vars: VarMap,
    pub linear: Option<LinearSegHead>,
    pub upernet: Option<UperNet>,
}

/// A detached, variable-free copy of a VarMap's tensors (inference; frozen features).
pub fn frozen_tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect()
}

impl SegNet {
    /// The network on the encoder `encoder` (with its variables `vars`, architecture `cfg`):
    /// a linear head on blocks `layers` (the encoder frozen) or UperNet (the encoder trained);
    /// the head's weights are drawn from `seed`.
    pub fn new(
        head: SegHeadConfig,
        (cfg, encoder, vars): (VitConfig, VisionTransformer, VarMap),
        layers: Vec<i64>,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        let head_vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&head_vars, DType::F32, dev);
        let (linear, upernet, classes) = match &head {
            SegHeadConfig::Linear { classes } => (
                Some(LinearSegHead::new(
                    cfg.embed_dim,
                    layers.len(),
                    *classes,
                    vb,
                )?),
                None,
                *classes,
            ),
            SegHeadConfig::Upernet(u) => (None, Some(UperNet::new(u, vb)?), u.classes),
        };
        seg_heads::seeded_init(&head_vars, seed)?;
        let (encoder, backbone_vars) = match head {
            SegHeadConfig::Linear { .. } => {
                let vb = VarBuilder::from_tensors(frozen_tensors(&vars), DType::F32, dev);
                (VisionTransformer::new(&cfg, vb)?, None)
            }
            SegHeadConfig::Upernet(_) => (encoder, Some(vars)),
        };
        Ok(Self {
            classes,
            cfg,
            layers,
            encoder,
            backbone_vars,
            head_vars,
            linear,
            upernet,
        })
    }

    /// Named trainable variables: `head.*` and (UperNet) `backbone.*`.
    pub fn trainable(&self) -> Vec<(String, candle_core::Var)> {
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
    pub fn forward(
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
        let feats = encoder.forward_layers(x, None, &self.layers)?;
        let (logits, aux) = match head {
            Heads::Linear(l) => {
                let feats: Vec<Tensor> = feats.iter().map(|f| f.detach()).collect();
                (l.forward(&feats, gh, gw)?, None)
            }
            Heads::Upernet(u) => {
                let maps = feats
                    .iter()
                    .map(|f| tokens_to_map(f, gh, gw))
                    .collect::<Result<Vec<_>>>()?;
                u.forward(&maps, train, rng)?
            }
        };
        let logits = resize_bilinear(&logits, h, w)?;
        let aux = aux.map(|a| resize_bilinear(&a, h, w)).transpose()?;
        Ok((logits, aux))
    }

    pub fn heads(&self) -> Heads<'_> {
        match (&self.linear, &self.upernet) {
            (Some(l), _) => Heads::Linear(l),
            (_, Some(u)) => Heads::Upernet(u),
            _ => unreachable!("one head is always built"),
        }
    }

    /// Frozen (variable-free) copies of the encoder and head for inference.
    pub fn frozen(&self, dev: &Device) -> Result<(VisionTransformer, OwnedHead)> {
        let enc = match &self.backbone_vars {
            Some(bv) => {
                let vb = VarBuilder::from_tensors(frozen_tensors(bv), DType::F32, dev);
                VisionTransformer::new(&self.cfg, vb)?
            }
            None => self.encoder.clone(),
        };
        let vb = VarBuilder::from_tensors(frozen_tensors(&self.head_vars), DType::F32, dev);
        let head = match &self.upernet {
            None => OwnedHead::Linear(LinearSegHead::new(
                self.cfg.embed_dim,
                self.layers.len(),
                self.classes,
                vb,
            )?),
            Some(_) => {
                let u = self.upernet.as_ref().expect("upernet head");
                OwnedHead::Upernet(u.rebuild(vb)?)
            }
        };
        Ok((enc, head))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        self.head_vars.save(dir.join("head.safetensors"))?;
        if let Some(bv) = &self.backbone_vars {
            bv.save(dir.join("backbone.safetensors"))?;
        }
        Ok(())
    }

    pub fn load(&mut self, dir: &Path) -> Result<()> {
        self.head_vars.load(dir.join("head.safetensors"))?;
        if let Some(bv) = &mut self.backbone_vars {
            bv.load(dir.join("backbone.safetensors"))?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
pub enum Heads<'a> {
    Linear(&'a LinearSegHead),
    Upernet(&'a UperNet),
}

pub enum OwnedHead {
    Linear(LinearSegHead),
    Upernet(UperNet),
}

impl OwnedHead {
    pub fn as_ref(&self) -> Heads<'_> {
        match self {
            OwnedHead::Linear(l) => Heads::Linear(l),
            OwnedHead::Upernet(u) => Heads::Upernet(u),
        }
    }
}

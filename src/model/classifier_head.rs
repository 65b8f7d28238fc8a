//! The fine-tuning classifier (MAE `global_pool`): mean of the encoder's normed patch tokens,
//! `fc_norm` LayerNorm (eps 1e-6), then `head` Linear with weights N(0, std^2) truncated at +-2
//! and zero bias. Its variables are named `fc_norm.*`, `head.weight`, `head.bias`.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand_chacha::ChaCha8Rng;

use super::error::Result;
use super::layers::LayerNorm;

/// The classifier on top of the encoder.
pub struct ClassifierHead {
    /// Its variables by name.
    pub varmap: VarMap,
    fc_norm: LayerNorm,
    weight: Var,
    bias: Var,
}

impl ClassifierHead {
    /// A fresh head from `d` features to `classes` logits, weights drawn from `rng`.
    pub fn new(
        d: usize,
        classes: usize,
        std: f64,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let fc_norm = LayerNorm::new(d, 1e-6, vb.pp("fc_norm"))?;
        let w = super::init::trunc_normal(rng, classes * d, std);
        let weight = Var::from_tensor(&Tensor::from_vec(w, (classes, d), dev)?)?;
        let bias = Var::zeros(classes, DType::F32, dev)?;
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            data.insert("head.weight".into(), weight.clone());
            data.insert("head.bias".into(), bias.clone());
        }
        Ok(Self {
            varmap,
            fc_norm,
            weight,
            bias,
        })
    }

    /// `(B, N, D)` normed tokens -> `(B, C)` logits.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let pooled = tokens.mean(1)?;
        let x = self.fc_norm.forward(&pooled)?;
        Ok(super::precision::matmul(&x, &self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

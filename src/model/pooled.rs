//! Pooled frozen features of a ViT encoder, as the evaluation protocols read them (I-JEPA /
//! VISSL `lastPOOL` and `concatPOOL4`, EVALS.md §1.3): the outputs of the last `min(4, depth)`
//! blocks, each through the encoder's final norm and averaged over the patch tokens.

use candle_core::Tensor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::VisionTransformer;
use crate::error::{Error, Result};

/// The pooled features a head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSet {
    /// `lastPOOL`: patch-mean of the last block (through the final norm), `D` values.
    Last,
    /// `concatPOOL4`: patch-means of the last 4 blocks concatenated, `4 D` values.
    Last4,
}

impl FeatureSet {
    /// Name used in head names and logs.
    pub fn name(self) -> &'static str {
        match self {
            FeatureSet::Last => "last",
            FeatureSet::Last4 => "last4",
        }
    }

    /// Select from `(L, N, D)` extracted layers: `(N, D)` or `(N, L D)`.
    pub fn select(self, all: &Tensor) -> Result<Tensor> {
        let (l, n, d) = all.dims3()?;
        Ok(match self {
            FeatureSet::Last => all.get(l - 1)?,
            FeatureSet::Last4 => all.permute((1, 0, 2))?.contiguous()?.reshape((n, l * d))?,
        })
    }
}

/// The blocks extracted for an encoder of `depth` blocks: the last `min(4, depth)`, oldest first.
pub fn extract_layers(depth: usize) -> Vec<i64> {
    let n = depth.clamp(1, 4) as i64;
    (-n..0).collect()
}

/// Patch-mean of the selected blocks (each through the final norm): `(L, B, D)`.
pub fn pooled(encoder: &VisionTransformer, x: &Tensor, layers: &[i64]) -> Result<Tensor> {
    let outs = encoder
        .forward_layers(x, None, layers)
        .map_err(|e| Error::Data(format!("encoder forward: {e}")))?;
    let means = outs
        .iter()
        .map(|t| t.mean(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&means, 0)?)
}

//! Architecture of the I-JEPA / C-JEPA networks: the ViT encoder and the narrow predictor.
//!
//! Presets follow METHOD.md §1/§2 (I-JEPA, arXiv 2301.08243): the encoder sizes of ViT-T/S/B/L/H,
//! a predictor of width 384 with the encoder's head count, depth 6 for T/S/B and 12 for L/H.
//! `registry/models/<name>.yaml` is the source of truth; each preset mirrors its file exactly.

use serde::{Deserialize, Serialize};

use super::error::ModelError;

fn default_in_chans() -> usize {
    3
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_true() -> bool {
    true
}
fn default_ln_eps() -> f64 {
    1e-6
}
fn default_init_std() -> f64 {
    0.02
}

/// Encoder + predictor architecture (field names follow the official `init_model` arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Side of the (square) training image in pixels.
    pub img_size: usize,
    /// Side of a square patch; the patch-embedding conv has kernel = stride = patch.
    pub patch_size: usize,
    /// Input channels.
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    /// Encoder width D (a multiple of 4 and of `num_heads`).
    pub embed_dim: usize,
    /// Number of encoder blocks.
    pub depth: usize,
    /// Encoder attention heads.
    pub num_heads: usize,
    /// MLP hidden width = `mlp_ratio * width` (encoder and predictor).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Bias on the qkv projection.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Epsilon of every affine LayerNorm in the networks.
    #[serde(default = "default_ln_eps")]
    pub ln_eps: f64,
    /// Predictor width Dp (a multiple of 4 and of `pred_num_heads`).
    pub pred_embed_dim: usize,
    /// Number of predictor blocks.
    pub pred_depth: usize,
    /// Predictor attention heads (the official code uses the encoder's head count).
    pub pred_num_heads: usize,
    /// Std of the normal init of Linear/conv weights and the mask token.
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

impl VitConfig {
    fn preset(
        embed_dim: usize,
        depth: usize,
        num_heads: usize,
        patch: usize,
        pred_depth: usize,
    ) -> Self {
        Self {
            img_size: 224,
            patch_size: patch,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            ln_eps: 1e-6,
            pred_embed_dim: 384,
            pred_depth,
            pred_num_heads: num_heads,
            init_std: 0.02,
        }
    }

    /// A toy architecture for tests: 32 px in 16 px patches (a 2x2 grid), width 8, one block
    /// of 2 heads with MLP ratio 2; predictor 8 wide, one block of 2 heads. Too small to learn
    /// anything; a test changes the fields it needs with `..VitConfig::toy()`.
    pub fn toy() -> Self {
        Self {
            img_size: 32,
            mlp_ratio: 2.0,
            pred_embed_dim: 8,
            pred_num_heads: 2,
            ..Self::preset(8, 1, 2, 16, 1)
        }
    }

    /// ViT-Tiny/16: D 192, depth 12, 3 heads; predictor 384 x 6.
    pub fn vit_tiny() -> Self {
        Self::preset(192, 12, 3, 16, 6)
    }
    /// ViT-Small/16: D 384, depth 12, 6 heads; predictor 384 x 6.
    pub fn vit_small() -> Self {
        Self::preset(384, 12, 6, 16, 6)
    }
    /// ViT-Base/16: D 768, depth 12, 12 heads; predictor 384 x 6.
    pub fn vit_base() -> Self {
        Self::preset(768, 12, 12, 16, 6)
    }
    /// ViT-Large/16: D 1024, depth 24, 16 heads; predictor 384 x 12.
    pub fn vit_large() -> Self {
        Self::preset(1024, 24, 16, 16, 12)
    }
    /// ViT-Huge/14: D 1280, depth 32, 16 heads; predictor 384 x 12.
    pub fn vit_huge() -> Self {
        Self::preset(1280, 32, 16, 14, 12)
    }

    /// The preset of that registry name (`vit_tiny` ... `vit_huge`), if any.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "vit_tiny" => Some(Self::vit_tiny()),
            "vit_small" => Some(Self::vit_small()),
            "vit_base" => Some(Self::vit_base()),
            "vit_large" => Some(Self::vit_large()),
            "vit_huge" => Some(Self::vit_huge()),
            _ => None,
        }
    }

    /// Grid side G = img_size / patch_size.
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size.max(1)
    }

    /// Tokens per training image, G * G.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Hidden width of the MLP of a block of width `dim`.
    pub fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks that the numbers fit together; the error names the field and the fix.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, msg: String| Err(ModelError::Config { field, msg });
        if self.patch_size == 0
            || self.img_size == 0
            || !self.img_size.is_multiple_of(self.patch_size)
        {
            return bad(
                "img_size",
                format!(
                    "img_size {} must be a positive multiple of patch_size {}",
                    self.img_size, self.patch_size
                ),
            );
        }
        if self.in_chans == 0 || self.depth == 0 || self.pred_depth == 0 {
            return bad(
                "depth",
                "in_chans, depth and pred_depth must be positive".into(),
            );
        }
        for (field, dim, heads) in [
            ("embed_dim", self.embed_dim, self.num_heads),
            ("pred_embed_dim", self.pred_embed_dim, self.pred_num_heads),
        ] {
            if dim == 0 || dim % 4 != 0 {
                return bad(
                    field,
                    format!(
                        "{field} {dim} must be a positive multiple of 4 (2-D sin-cos pos-embed)"
                    ),
                );
            }
            if heads == 0 || dim % heads != 0 {
                return bad(
                    field,
                    format!("{field} {dim} must be divisible by its head count {heads}"),
                );
            }
        }
        if !pos(self.mlp_ratio) || self.mlp_hidden(self.pred_embed_dim.min(self.embed_dim)) == 0 {
            return bad(
                "mlp_ratio",
                format!("mlp_ratio {} must be positive", self.mlp_ratio),
            );
        }
        if !pos(self.ln_eps) || self.init_std.is_nan() || self.init_std < 0.0 {
            return bad("ln_eps", "ln_eps must be > 0 and init_std >= 0".into());
        }
        Ok(())
    }
}

/// True for a finite or infinite value > 0 (false for NaN).
fn pos(x: f64) -> bool {
    x > 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_yaml_matches_presets() {
        let cases = [
            (
                include_str!("../../registry/models/vit_tiny.yaml"),
                VitConfig::vit_tiny(),
            ),
            (
                include_str!("../../registry/models/vit_small.yaml"),
                VitConfig::vit_small(),
            ),
            (
                include_str!("../../registry/models/vit_base.yaml"),
                VitConfig::vit_base(),
            ),
            (
                include_str!("../../registry/models/vit_large.yaml"),
                VitConfig::vit_large(),
            ),
            (
                include_str!("../../registry/models/vit_huge.yaml"),
                VitConfig::vit_huge(),
            ),
        ];
        for (yaml, preset) in cases {
            let parsed: VitConfig = serde_yaml::from_str(yaml).expect("registry yaml parses");
            assert_eq!(parsed, preset);
            preset.validate().expect("preset is valid");
        }
    }

    #[test]
    fn unknown_field_is_rejected() {
        let y = "img_size: 64\npatch_size: 8\nembed_dim: 48\ndepth: 2\nnum_heads: 3\npred_embed_dim: 24\npred_depth: 1\npred_num_heads: 3\nwidth: 3\n";
        assert!(serde_yaml::from_str::<VitConfig>(y).is_err());
    }

    #[test]
    fn validate_rejects_bad_numbers() {
        let mut c = VitConfig::vit_tiny();
        c.img_size = 100;
        assert!(c.validate().is_err());
        let mut c = VitConfig::vit_tiny();
        c.num_heads = 5;
        assert!(c.validate().is_err());
        assert_eq!(VitConfig::vit_huge().grid_size(), 16);
        assert_eq!(VitConfig::vit_base().num_patches(), 196);
    }
}

//! Layer-wise learning-rate decay over a ViT's parameters, as BEiT / MAE (`param_groups_lrd`),
//! ViTDet (`get_vit_lr_decay_rate`) and mmseg (`LayerDecayOptimizerConstructor`) define it on the
//! official parameter names: the patch embedding is layer 0, block `i` is layer `i + 1`, and
//! everything after the blocks (final norm, heads) is layer `depth + 1`; a parameter's learning
//! rate is scaled by `decay^(depth + 1 - layer)`.

/// The layer of an encoder parameter named as in the official code (`patch_embed.*`,
/// `blocks.{i}.*`, `norm.*`, ...), for an encoder of `depth` blocks.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if name.starts_with("patch_embed") || name.starts_with("pos_embed") || name == "cls_token" {
        return 0;
    }
    name.strip_prefix("blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .map_or(depth + 1, |i| i + 1)
}

/// The learning-rate scale of parameter `name`: `decay^(depth + 1 - layer_id)`.
pub fn layer_scale(name: &str, depth: usize, decay: f64) -> f64 {
    decay.powi((depth + 1 - layer_id(name, depth).min(depth + 1)) as i32)
}

/// mmseg `LayerDecayOptimizerConstructor` scale of a parameter of the segmentation network:
/// the backbone's (`backbone.*`) by [`layer_scale`], the head's 1.
pub fn prefixed_layer_scale(name: &str, depth: usize, decay: f64) -> f64 {
    name.strip_prefix("backbone.")
        .map_or(1.0, |r| layer_scale(r, depth, decay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_layer_decay_like_mmseg() {
        let d = 0.65f64;
        // ViT-B: 14 layer ids; the head and the final norm get 1, block 11 gets d, patch embed d^13
        assert_eq!(
            prefixed_layer_scale("head.decode_head.conv_seg.weight", 12, d),
            1.0
        );
        assert_eq!(prefixed_layer_scale("backbone.norm.weight", 12, d), 1.0);
        let near = |a: f64, b: f64| assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        near(
            prefixed_layer_scale("backbone.blocks.11.attn.qkv.weight", 12, d),
            d,
        );
        near(
            prefixed_layer_scale("backbone.blocks.0.mlp.fc1.bias", 12, d),
            d.powi(12),
        );
        near(
            prefixed_layer_scale("backbone.patch_embed.proj.weight", 12, d),
            d.powi(13),
        );
    }

    #[test]
    fn layer_ids_follow_beit() {
        assert_eq!(layer_id("patch_embed.proj.weight", 12), 0);
        assert_eq!(layer_id("pos_embed", 12), 0);
        assert_eq!(layer_id("cls_token", 12), 0);
        assert_eq!(layer_id("blocks.0.attn.qkv.weight", 12), 1);
        assert_eq!(layer_id("blocks.11.mlp.fc2.bias", 12), 12);
        assert_eq!(layer_id("norm.weight", 12), 13);
        assert_eq!(layer_id("head.weight", 12), 13);
        assert_eq!(layer_id("fc_norm.bias", 12), 13);
    }

    #[test]
    fn scales_decay_towards_the_input() {
        let near = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} {b}");
        near(layer_scale("norm.weight", 12, 0.65), 1.0);
        near(layer_scale("blocks.11.attn.qkv.weight", 12, 0.65), 0.65);
        near(
            layer_scale("blocks.0.mlp.fc1.bias", 12, 0.65),
            0.65f64.powi(12),
        );
        near(
            layer_scale("patch_embed.proj.weight", 12, 0.65),
            0.65f64.powi(13),
        );
    }
}

//! Shared setup of the training-step tests: a tiny ViT and mask tensors from the sampler, built
//! on the host as the pretrain stage builds them.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::masks::{MaskConfig, MaskSampler};
use crate::model::VitConfig;

/// A 4x4-token ViT of width 16, two blocks, predictor of width 16.
pub fn tiny_vit() -> VitConfig {
    VitConfig {
        img_size: 32,
        patch_size: 8,
        embed_dim: 16,
        depth: 2,
        num_heads: 2,
        mlp_ratio: 2.0,
        pred_embed_dim: 16,
        pred_depth: 1,
        pred_num_heads: 2,
        ..VitConfig::vit_tiny()
    }
}

/// The context and target masks of `batch` images for `cfg`'s grid, as `(B, K)` host tensors.
pub fn host_masks(cfg: &VitConfig, batch: usize, seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    let g = cfg.grid_size();
    let sampler =
        MaskSampler::new(MaskConfig::default().scaled_for_grid(g, g).unwrap(), g, g).unwrap();
    let m = sampler.sample(&mut ChaCha8Rng::seed_from_u64(seed), batch);
    let t = |lists: &[Vec<Vec<u32>>]| -> Vec<Tensor> {
        lists
            .iter()
            .map(|per_image| {
                let flat: Vec<u32> = per_image.iter().flatten().copied().collect();
                Tensor::from_vec(flat, (per_image.len(), per_image[0].len()), &Device::Cpu).unwrap()
            })
            .collect()
    };
    (t(&m.enc), t(&m.pred))
}

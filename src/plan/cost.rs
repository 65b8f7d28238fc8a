//! GPU-hour estimates for `cjepa run --dry-run`: pure arithmetic over the ViT config, the number
//! of images, epochs and image size.
//!
//! Model: a transformer block of width `D`, MLP ratio `r` holds `(4 + 2r)·D²` weights; a forward
//! pass over `T` tokens costs `2·weights·T` FLOPs plus `4·T²·D` for the attention products
//! (QKᵀ and AV); forward + backward is 3x the forward. Biases, LayerNorms and softmax are ignored.
//!
//! * `pretrain` (I-JEPA / C-JEPA, METHOD.md §2-§4), per image per epoch: context encoder forward +
//!   backward on the context tokens; target encoder forward (no gradient) on all tokens; predictor
//!   forward + backward once per target block on context + target tokens. Token fractions are the
//!   official collator's means on 14x14 (`golden/model/mask_stats.json`: 50.1 context tokens after
//!   truncation, 33.4 per target block, 4 blocks). The VICReg term and the EMA update are noise.
//! * `linear_probe`, `clevr_count`, `clevr_dist`, `knn`: frozen encoder forward per image per
//!   epoch (features recomputed every epoch under augmentation; `knn` is one pass).
//! * `finetune`: encoder forward + backward per image per epoch.
//! * `coco_detection`, `ade20k_segmentation`: encoder forward + backward at the stage's resolution
//!   (default 1024 px and 512 px); the detection / segmentation heads are not counted, so these
//!   are lower bounds.
//! * `davis_vos`: encoder forward per frame at 480 px (square approximation of 480x832).
//! * `dataset`, `command`: no GPU work.
//!
//! FLOPs are turned into hours at [`ASSUMED_UTILISATION`] of one H100's dense bf16 peak
//! ([`H100_BF16_PEAK_FLOPS`]) for stages at `precision: bf16`, of its TF32 peak (half that) for
//! stages at `f32`. Plausibility (checked in the tests: 20-200 H100-hours): ViT-B/16,
//! 600 epochs on ImageNet-1K comes to 6.4e19 FLOPs, about 52 H100-hours; ViT-L/16 600 epochs ~160;
//! ViT-H/14 300 epochs 2.5e20 FLOPs, ~200. The I-JEPA paper trained ViT-H/14 for 300 epochs in
//! under 72 hours on 16 A100s, which by this count is at least 19% of the A100 bf16 peak, so 35%
//! on an H100 is what a well-tuned trainer reaches, not a floor; a slower trainer takes longer in
//! proportion. Treat the numbers as order-of-magnitude planning aids.

use std::collections::VecDeque;

use super::Plan;
use crate::kind::{Pass, Schedule};
use crate::model::VitConfig;

/// Dense bf16 peak of one H100 SXM, FLOP/s.
pub const H100_BF16_PEAK_FLOPS: f64 = 989.4e12;
/// Dense TF32 peak of one H100 SXM, FLOP/s: what a stage at `precision: f32` multiplies with.
pub const H100_TF32_PEAK_FLOPS: f64 = 494.7e12;
/// Fraction of the peak a training run sustains (model FLOPs utilisation).
pub const ASSUMED_UTILISATION: f64 = 0.35;
/// Context tokens kept after truncation, as a fraction of the grid (50.11 / 196).
pub const CONTEXT_FRACTION: f64 = 50.11 / 196.0;
/// Tokens of one target block, as a fraction of the grid (33.37 / 196).
pub const TARGET_BLOCK_FRACTION: f64 = 33.374 / 196.0;
/// Target blocks per image.
pub const TARGET_BLOCKS: f64 = 4.0;

/// Forward FLOPs of `depth` pre-norm blocks of `width` over `tokens` tokens.
pub fn blocks_forward_flops(width: f64, depth: f64, mlp_ratio: f64, tokens: f64) -> f64 {
    let weights = (4.0 + 2.0 * mlp_ratio) * width * width;
    depth * (2.0 * weights * tokens + 4.0 * tokens * tokens * width)
}

/// Forward FLOPs of the encoder over `tokens` tokens (patch embedding included).
pub fn encoder_forward_flops(m: &VitConfig, tokens: f64) -> f64 {
    let d = m.embed_dim as f64;
    let patch = 2.0 * (m.in_chans * m.patch_size * m.patch_size) as f64 * d * tokens;
    patch + blocks_forward_flops(d, m.depth as f64, m.mlp_ratio, tokens)
}

/// Forward FLOPs of the predictor for one target block (`ctx` context + `tgt` mask tokens).
pub fn predictor_forward_flops(m: &VitConfig, ctx: f64, tgt: f64) -> f64 {
    let (d, dp) = (m.embed_dim as f64, m.pred_embed_dim as f64);
    2.0 * d * dp * ctx
        + blocks_forward_flops(dp, m.pred_depth as f64, m.mlp_ratio, ctx + tgt)
        + 2.0 * dp * d * tgt
}

/// FLOPs of one image in one epoch of a stage whose work per image is `pass`, at `img` px.
pub fn flops_per_image(pass: Pass, m: &VitConfig, img: usize) -> f64 {
    let side = (img / m.patch_size.max(1)) as f64;
    let n = side * side;
    let fwd = encoder_forward_flops(m, n);
    match pass {
        Pass::None => 0.0,
        Pass::Jepa => {
            let (ctx, tgt) = (CONTEXT_FRACTION * n, TARGET_BLOCK_FRACTION * n);
            3.0 * encoder_forward_flops(m, ctx)
                + fwd
                + TARGET_BLOCKS * 3.0 * predictor_forward_flops(m, ctx, tgt)
        }
        Pass::Forward => fwd,
        Pass::Train => 3.0 * fwd,
    }
}

/// Estimated H100 GPU-hours of a stage whose work per image is `pass`, with encoder `model`,
/// over `images` images for `epochs` epochs at `img` px (see the module doc for the model and
/// its assumptions).
pub fn estimate_gpu_hours(
    pass: Pass,
    model: &VitConfig,
    images: u64,
    epochs: f64,
    img: usize,
) -> f64 {
    let f = flops_per_image(pass, model, img) * images as f64 * epochs;
    f / (H100_BF16_PEAK_FLOPS * ASSUMED_UTILISATION) / 3600.0
}

/// The estimate of every planned stage (`None` where a number is missing: dataset size, model
/// or schedule).
pub fn plan_estimates(plan: &Plan) -> Vec<Option<f64>> {
    let nearest = |i: usize, pred: &dyn Fn(usize) -> bool| -> Option<usize> {
        let mut q: VecDeque<usize> = plan.stages[i]
            .inst
            .upstream
            .iter()
            .map(|(_, u)| *u)
            .collect();
        while let Some(u) = q.pop_front() {
            if pred(u) {
                return Some(u);
            }
            q.extend(plan.stages[u].inst.upstream.iter().map(|(_, v)| *v));
        }
        None
    };
    let hooks = |i: usize| (plan.kinds)(plan.stages[i].kind);
    (0..plan.stages.len())
        .map(|i| {
            let s = &plan.stages[i];
            let params = &s.config["params"];
            let cost = hooks(i).cost(params);
            if cost.pass == Pass::None {
                return Some(0.0);
            }
            let model_at = if s.config.get("model").is_some() {
                i
            } else {
                nearest(i, &|u| plan.stages[u].config.get("model").is_some())?
            };
            let mcfg = &plan.stages[model_at].config;
            // the encoder as the stage that defines it trains it (pretraining's `img_size` applied)
            let model =
                hooks(model_at).planned_model(mcfg["model"].as_object()?, &mcfg["params"])?;
            let img = cost.img_size.unwrap_or(model.img_size);
            let data = nearest(i, &|u| plan.stages[u].kind.provides_data())?;
            let mut images = hooks(data)
                .train_images(&plan.stages[data].config["params"], &plan.pipeline.dir)?;
            let epochs = match cost.schedule? {
                Schedule::Epochs(e) => e,
                Schedule::Iters { iters, batch } => {
                    images = iters * batch;
                    1.0
                }
                Schedule::OnePass => 1.0,
            };
            let hours = estimate_gpu_hours(cost.pass, &model, images, epochs, img);
            // `precision: bf16` is written into the config; f32 runs at the TF32 peak
            Some(if s.config.get("precision").is_some() {
                hours
            } else {
                hours * H100_BF16_PEAK_FLOPS / H100_TF32_PEAK_FLOPS
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IN1K: u64 = 1_281_167;

    #[test]
    fn vit_b_600_epochs_is_tens_of_h100_hours() {
        let h = estimate_gpu_hours(Pass::Jepa, &VitConfig::vit_base(), IN1K, 600.0, 224);
        assert!((20.0..200.0).contains(&h), "{h}");
        let f = flops_per_image(Pass::Jepa, &VitConfig::vit_base(), 224);
        assert!((6e10..1.2e11).contains(&f), "{f}");
    }

    #[test]
    fn no_gpu_work() {
        let m = VitConfig::vit_base();
        assert_eq!(estimate_gpu_hours(Pass::None, &m, IN1K, 1.0, 224), 0.0);
    }
}

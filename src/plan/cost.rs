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

use serde_json::Value;

use super::Plan;
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

/// FLOPs of one image in one epoch of a stage of `kind` at `img` px; `None` for an unknown kind.
pub fn flops_per_image(kind: &str, m: &VitConfig, img: usize) -> Option<f64> {
    let side = (img / m.patch_size.max(1)) as f64;
    let n = side * side;
    let fwd = encoder_forward_flops(m, n);
    Some(match kind {
        "dataset" | "command" | "counter" => 0.0,
        "pretrain" => {
            let (ctx, tgt) = (CONTEXT_FRACTION * n, TARGET_BLOCK_FRACTION * n);
            3.0 * encoder_forward_flops(m, ctx)
                + fwd
                + TARGET_BLOCKS * 3.0 * predictor_forward_flops(m, ctx, tgt)
        }
        "linear_probe" | "clevr_count" | "clevr_dist" | "knn" | "davis_vos" => fwd,
        "finetune" | "coco_detection" | "ade20k_segmentation" => 3.0 * fwd,
        _ => return None,
    })
}

/// Estimated H100 GPU-hours of a stage of `kind` with encoder `model` over `images` images for
/// `epochs` epochs at `img` px (see the module doc for the model and its assumptions).
pub fn estimate_gpu_hours(
    kind: &str,
    model: &VitConfig,
    images: u64,
    epochs: f64,
    img: usize,
) -> Option<f64> {
    let f = flops_per_image(kind, model, img)? * images as f64 * epochs;
    Some(f / (H100_BF16_PEAK_FLOPS * ASSUMED_UTILISATION) / 3600.0)
}

/// Default evaluation resolution of a kind when its params give none.
fn default_img(kind: &str) -> Option<usize> {
    match kind {
        "coco_detection" => Some(1024),
        "ade20k_segmentation" => Some(512),
        "davis_vos" => Some(480),
        _ => None,
    }
}

/// Training images of a dataset stage's resolved params: synthetic sizes from the generator
/// params, real datasets from `registry/datasets/` (recognised by their folder name).
pub fn dataset_images(params: &Value, pipeline_dir: &std::path::Path) -> Option<u64> {
    let fmt = params["format"].as_str()?;
    let g = |k: &str| params[k].as_u64();
    if params["source"].as_str() == Some("synth") {
        return match fmt {
            "imagefolder" => Some(g("classes")? * g("train_per_class")?),
            "davis" => Some(g("train_sequences")? * g("frames")?),
            _ => g("train_images"),
        };
    }
    let path = params["path"].as_str()?;
    crate::spec::datasets::recognise(path, fmt, pipeline_dir)?.train_images()
}

/// The estimate of every planned stage (`None` where a number is missing: unknown kind, dataset
/// size, model or schedule).
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
    (0..plan.stages.len())
        .map(|i| {
            let s = &plan.stages[i];
            let kind = s.kind.name();
            if flops_per_image(kind, &VitConfig::vit_tiny(), 224)? == 0.0 {
                return Some(0.0);
            }
            let params = &s.config["params"];
            let model_at = if s.config.get("model").is_some() {
                i
            } else {
                nearest(i, &|u| plan.stages[u].config.get("model").is_some())?
            };
            let mcfg = &plan.stages[model_at].config;
            let model: VitConfig = serde_json::from_value(mcfg["model"].clone()).ok()?;
            let img = params["img"]
                .as_u64()
                .or(params["img_size"].as_u64())
                .map(|v| v as usize)
                .or_else(|| default_img(kind))
                .or_else(|| mcfg["params"]["img"].as_u64().map(|v| v as usize))
                .unwrap_or(model.img_size);
            let data = nearest(i, &|u| plan.stages[u].kind.name() == "dataset")?;
            let mut images =
                dataset_images(&plan.stages[data].config["params"], &plan.pipeline.dir)?;
            let epochs = if let Some(e) = params["epochs"].as_f64() {
                e
            } else if let (Some(it), Some(b)) = (
                params["iters"].as_u64().or(params["steps"].as_u64()),
                params["batch"].as_u64().or(params["batch_size"].as_u64()),
            ) {
                images = it * b;
                1.0
            } else if matches!(kind, "knn" | "davis_vos") {
                1.0
            } else {
                return None;
            };
            let hours = estimate_gpu_hours(kind, &model, images, epochs, img)?;
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
        let h = estimate_gpu_hours("pretrain", &VitConfig::vit_base(), IN1K, 600.0, 224).unwrap();
        assert!((20.0..200.0).contains(&h), "{h}");
        let f = flops_per_image("pretrain", &VitConfig::vit_base(), 224).unwrap();
        assert!((6e10..1.2e11).contains(&f), "{f}");
    }

    #[test]
    fn dataset_sizes_from_generator_params_and_the_registry() {
        let here = std::path::Path::new("/nonexistent");
        let synth = serde_json::json!({"source": "synth", "format": "imagefolder",
            "classes": 10, "train_per_class": 60});
        assert_eq!(dataset_images(&synth, here), Some(600));
        let davis = serde_json::json!({"source": "synth", "format": "davis",
            "train_sequences": 3, "frames": 8});
        assert_eq!(dataset_images(&davis, here), Some(24));
        let inet = serde_json::json!({"source": "path", "format": "imagefolder",
            "path": "${CJEPA_DATA:-/data}/imagenet"});
        assert_eq!(dataset_images(&inet, here), Some(IN1K));
        let coco = serde_json::json!({"source": "path", "format": "coco", "path": "/x/coco2017"});
        assert_eq!(dataset_images(&coco, here), Some(118_287));
        let unknown =
            serde_json::json!({"source": "path", "format": "imagefolder", "path": "/x/mine"});
        assert_eq!(dataset_images(&unknown, here), None);
    }

    #[test]
    fn no_gpu_work_and_unknown_kinds() {
        let m = VitConfig::vit_base();
        assert_eq!(estimate_gpu_hours("dataset", &m, IN1K, 1.0, 224), Some(0.0));
        assert_eq!(estimate_gpu_hours("nope", &m, IN1K, 1.0, 224), None);
    }
}

//! Unit tests of `coco_detection`.

use super::*;
use crate::train::layer_decay::layer_scale;

#[test]
fn params_defaults_and_rejections() {
    let p = Params::default();
    assert_eq!(p.checkpoint, "upstream");
    assert_eq!(p.img_size, 512);
    let bad = serde_json::json!({"img_sise": 3});
    assert!(resolve(bad.as_object().unwrap())
        .unwrap_err()
        .contains("img_sise"));
    let bad = serde_json::json!({"scale_range": [2.0, 1.0]});
    assert!(resolve(bad.as_object().unwrap()).is_err());
    let ok = serde_json::json!({"head": {"fpn_dim": 32}, "backbone": "frozen"});
    let v = resolve(ok.as_object().unwrap()).unwrap();
    assert_eq!(v["head"]["fpn_dim"], 32);
    assert_eq!(v["head"]["roi_size"], 14);
}

#[test]
fn lr_schedule_warmup_cosine_and_step() {
    let mut p = Params {
        steps: 100,
        warmup_steps: 10,
        warmup_factor: 0.001,
        ..Default::default()
    };
    assert!((p.lr_factor(0) - 0.001).abs() < 1e-12);
    let end = p.lr_factor(10);
    assert!((p.lr_factor(5) - (0.001 + (end - 0.001) * 0.5)).abs() < 1e-12);
    assert!((p.lr_factor(50) - 0.5).abs() < 1e-12);
    assert!(p.lr_factor(99) < 0.01);
    p.schedule = LrSchedule::Step;
    p.milestones = vec![0.5, 0.9];
    assert_eq!(p.lr_factor(20), 1.0);
    assert!((p.lr_factor(50) - 0.1).abs() < 1e-12);
    assert!((p.lr_factor(95) - 0.01).abs() < 1e-12);
}

#[test]
fn layer_decay_follows_vitdet() {
    // depth 12, rate 0.7: patch embed 0.7^13, block 11 0.7^1, final norm 1
    let r = |n| layer_scale(n, 12, 0.7);
    assert!((r("patch_embed.proj.weight") - 0.7f64.powi(13)).abs() < 1e-15);
    assert!((r("blocks.0.attn.qkv.weight") - 0.7f64.powi(12)).abs() < 1e-15);
    assert!((r("blocks.11.mlp.fc1.bias") - 0.7).abs() < 1e-15);
    assert_eq!(r("norm.weight"), 1.0);
}

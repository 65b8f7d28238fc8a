//! Unit tests of `finetune`.

use super::step::{
    accumulate, apply, drop_path_scales, layer_groups, named_vars, shard_positions, soft_ce,
};
use super::*;
use crate::kind::checkpoint::Cadence;

#[test]
fn schedule_is_mae() {
    let p = Params {
        epochs: 10,
        warmup_epochs: 2.0,
        min_lr: 0.0,
        ..Params::default()
    };
    assert_eq!(p.lr_at(0.0, 1.0), 0.0);
    assert!((p.lr_at(1.0, 1.0) - 0.5).abs() < 1e-12);
    assert!((p.lr_at(2.0, 1.0) - 1.0).abs() < 1e-12);
    assert!((p.lr_at(6.0, 1.0) - 0.5).abs() < 1e-12);
    assert!(p.lr_at(10.0, 1.0).abs() < 1e-12);
    let bad = Params {
        accum_iter: 3,
        batch_size: 8,
        ..Params::default()
    };
    assert!(bad.validate().unwrap_err().contains("accum_iter"));
}

/// Encoder + head with layer-decayed AdamW groups and drop path fit a fixed batch: the
/// gradients reach every group and the loss falls.
#[test]
fn fits_a_fixed_batch() {
    let dev = Device::Cpu;
    let cfg = crate::model::VitConfig {
        img_size: 16,
        patch_size: 8,
        embed_dim: 16,
        depth: 2,
        pred_embed_dim: 16,
        ..crate::model::VitConfig::toy()
    };
    let nets = crate::model::JepaNetworks::new_random(&cfg, 1, &dev).unwrap();
    let enc: HashMap<String, Tensor> = nets.target_encoder_tensors();
    let bb = super::super::backbone::build("t", cfg, &enc, &dev, "t".into()).unwrap();
    let mut rng = crate::util::rng::stage_rng("t", 0, "t");
    let head = ClassifierHead::new(16, 2, 2e-5, &mut rng, &dev).unwrap();
    let vars: Vec<(String, Var)> = named_vars(&bb.varmap)
        .into_iter()
        .chain(named_vars(&head.varmap))
        .collect();
    let mut opts = layer_groups(&vars, 2, 0.75).unwrap();
    assert_eq!(opts.len(), 4, "patch_embed, 2 blocks, top");
    assert!((opts[0].0 - 0.75f64.powi(3)).abs() < 1e-12 && opts[3].0 == 1.0);
    let x = Tensor::from_vec(
        crate::model::init::trunc_normal(&mut rng, 4 * 3 * 16 * 16, 1.0),
        (4, 3, 16, 16),
        &dev,
    )
    .unwrap();
    let y = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 0.], [0., 1.]], &dev).unwrap();
    let before: Vec<f32> = enc["blocks.0.attn.qkv.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..60 {
        let scales = drop_path_scales(2, 0.1, 4, &mut rng, &dev).unwrap();
        let mut g = HashMap::new();
        last = accumulate(&bb.encoder, &head, &vars, &x, &y, &scales, 1, &mut g)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        first.get_or_insert(last);
        assert_eq!(g.len(), vars.len(), "every parameter gets a gradient");
        apply(&mut opts, &g, 3e-3, 0.05).unwrap();
    }
    let first = first.unwrap();
    assert!((first - 2f64.ln()).abs() < 1e-3, "{first}");
    assert!(last < 0.3 * first, "{first} -> {last}");
    let after: Vec<f32> = bb.varmap.data().lock().unwrap()["blocks.0.attn.qkv.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(before, after, "the encoder is trained");
}

#[test]
fn shards_hold_whole_mixup_pairs() {
    let (m, world) = (8, 2);
    let mut seen = Vec::new();
    for r in 0..world {
        let pos = shard_positions(m, r, world);
        let l = pos.len();
        for (i, &g) in pos.iter().enumerate() {
            // the rank's mirror partner is the micro-batch's mirror partner
            assert_eq!(pos[l - 1 - i], m - 1 - g, "rank {r}: {pos:?}");
        }
        seen.extend(pos);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..m).collect::<Vec<_>>(), "every image once");
    assert_eq!(shard_positions(6, 1, 2), vec![1, 3, 5]);
    assert_eq!(shard_positions(5, 0, 1), vec![0, 1, 2, 3, 4]);
}

#[test]
fn soft_ce_matches_hard_ce() {
    let dev = Device::Cpu;
    let logits = Tensor::new(&[[2f32, 0.0, -1.0], [0.0, 1.0, 0.0]], &dev).unwrap();
    let t = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev).unwrap();
    let a = soft_ce(&logits, &t).unwrap().to_scalar::<f32>().unwrap();
    let lse0 = (2f32.exp() + 1.0 + (-1f32).exp()).ln();
    let lse1 = (2.0 + 1f32.exp()).ln();
    let want = ((lse0 - 2.0) + (lse1 - 1.0)) / 2.0;
    assert!((a - want).abs() < 1e-6);
    let b = crate::train::cross_entropy::cross_entropy(&logits.unsqueeze(0).unwrap(), &t)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((b[0] - want).abs() < 1e-6);
}

/// The engine reads a stage's cadence from its resolved params: the kinds that flatten
/// [`Cadence`] (defaults 0 steps / 300 s), a kind that writes its own (ADE20K: 1000 / 600),
/// and params without either.
#[test]
fn cadence_of_resolved_params() {
    let m = |v: serde_json::Value| v.as_object().unwrap().clone();
    let ft = crate::stages::finetune::resolve(&m(serde_json::json!({}))).unwrap();
    assert_eq!(Cadence::of(&ft), Cadence::default());
    assert_eq!(Cadence::default().checkpoint_secs, 300);
    let ft =
        crate::stages::finetune::resolve(&m(serde_json::json!({ "checkpoint_every": 7 }))).unwrap();
    assert_eq!(Cadence::of(&ft).checkpoint_every, 7);
    let e = crate::stages::finetune::resolve(&m(serde_json::json!({ "checkpoint_sec": 7 })))
        .unwrap_err();
    assert!(e.contains("did you mean `checkpoint_secs`?"), "{e}");
    assert!(e.contains("valid keys: ") && e.contains("blr"), "{e}");
    let ade =
        crate::kind::resolve::<crate::stages::ade20k::Params>(&m(serde_json::json!({}))).unwrap();
    assert_eq!(
        Cadence::of(&ade),
        Cadence {
            checkpoint_every: 1000,
            checkpoint_secs: 600
        }
    );
    assert_eq!(
        Cadence::of(&serde_json::json!({ "k": 20 })),
        Cadence::default()
    );
    // field by field: a field that is not a whole number takes its default alone
    let odd = Cadence::of(&serde_json::json!({ "checkpoint_every": 5, "checkpoint_secs": "x" }));
    assert_eq!((odd.checkpoint_every, odd.checkpoint_secs), (5, 300));
}

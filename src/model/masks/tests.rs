//! Unit tests of `masks`.

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn paper() -> MaskSampler {
    MaskSampler::new(MaskConfig::default(), 14, 14).unwrap()
}

fn union_contains(blocks: &[Vec<Block>], b: usize, idx: u32, gw: usize) -> bool {
    let (r, c) = (idx as usize / gw, idx as usize % gw);
    blocks.iter().any(|per_img| per_img[b].contains(r, c))
}

#[test]
fn deterministic_for_a_seed() {
    let s = paper();
    let a = s.sample(&mut ChaCha8Rng::seed_from_u64(7), 8);
    let b = s.sample(&mut ChaCha8Rng::seed_from_u64(7), 8);
    let c = s.sample(&mut ChaCha8Rng::seed_from_u64(8), 8);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn layout_and_sorted_indices() {
    let m = paper().sample(&mut ChaCha8Rng::seed_from_u64(1), 5);
    assert_eq!((m.enc.len(), m.enc[0].len()), (1, 5));
    assert_eq!((m.pred.len(), m.pred[0].len()), (4, 5));
    let (flat, shape) = m.pred_flat();
    assert_eq!(shape, [4, 5, m.k_pred()]);
    assert_eq!(flat.len(), 4 * 5 * m.k_pred());
    for l in m.enc.iter().chain(&m.pred).flatten() {
        assert!(l.windows(2).all(|p| p[0] < p[1]));
        assert!(l.iter().all(|&i| i < 196));
    }
}

#[test]
fn no_context_target_overlap() {
    let s = paper();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..50 {
        let raw = s.sample_raw(&mut rng, 16);
        assert_eq!(raw.relaxations, 0);
        for b in 0..16 {
            for &i in &raw.enc[0][b] {
                assert!(!union_contains(&raw.pred_blocks, b, i, 14));
            }
        }
    }
    let cfg = MaskConfig {
        allow_overlap: true,
        ..MaskConfig::default()
    };
    let raw = MaskSampler::new(cfg, 14, 14)
        .unwrap()
        .sample_raw(&mut rng, 4);
    assert!(raw.enc[0].iter().all(|l| l.len() == 169));
}

#[test]
fn truncation_to_the_shortest_keeps_lowest() {
    let s = paper();
    let raw = s.sample_raw(&mut ChaCha8Rng::seed_from_u64(11), 32);
    let m = raw.collate();
    let kmin = raw.enc[0].iter().map(Vec::len).min().unwrap();
    assert!(raw.enc[0].iter().any(|l| l.len() > kmin));
    assert_eq!(m.k_enc(), kmin);
    for (t, r) in m.enc[0].iter().zip(&raw.enc[0]) {
        assert_eq!(t.as_slice(), &r[..kmin]);
    }
    let (h, w) = raw.pred_size;
    assert!(m.pred.iter().flatten().all(|l| l.len() == h * w));
}

#[test]
fn block_sizes_match_official_sets() {
    let sizes = possible_block_sizes(14, 14, [0.15, 0.2], [0.75, 1.5]);
    let want: BTreeSet<_> = [(5, 6), (6, 5), (6, 6), (7, 5), (8, 5)].into();
    assert_eq!(sizes, want);
    let enc = possible_block_sizes(14, 14, [0.85, 1.0], [1.0, 1.0]);
    assert_eq!(enc, [(13, 13)].into());
}

#[test]
fn validate_rejects_impossible_configs() {
    let c = MaskConfig::default();
    let e = c.validate(8, 8).unwrap_err();
    assert!(matches!(e, MaskError::BlockTooSmall { which: "pred", .. }));
    assert!(e.to_string().contains("mask.min_keep"));
    assert!(c.validate(1, 14).is_err());
    let bad = MaskConfig {
        pred_scale: [0.3, 0.2],
        ..c.clone()
    };
    assert!(bad.validate(14, 14).is_err());
    let bad = MaskConfig {
        pred_blocks: 0,
        ..c.clone()
    };
    assert!(bad.validate(14, 14).is_err());
    assert!(MaskSampler::new(c, 8, 8).is_err());
}

#[test]
fn scaled_for_grid_small_grids_sample() {
    let c = MaskConfig::default();
    assert_eq!(c.scaled_for_grid(14, 14).unwrap(), c);
    assert_eq!(c.scaled_for_grid(28, 28).unwrap().min_keep, 10);
    for g in [4, 6, 8, 10] {
        let s = c.scaled_for_grid(g, g).unwrap();
        assert!(s.min_keep < 10);
        let sampler = MaskSampler::new(s, g, g).unwrap();
        let m = sampler.sample(&mut ChaCha8Rng::seed_from_u64(g as u64), 8);
        assert!(m.k_enc() > 0 && m.k_pred() > 0);
    }
    let tiny = MaskConfig {
        pred_scale: [0.001, 0.002],
        ..c
    };
    assert!(tiny.scaled_for_grid(8, 8).is_err());
}

#[test]
fn edge_quirk_on_and_off() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let last = |raw: &RawMasks| {
        raw.pred_blocks
            .iter()
            .chain(&raw.enc_blocks)
            .flatten()
            .any(|b| b.top + b.h == 14 || b.left + b.w == 14)
    };
    let on = paper();
    for _ in 0..100 {
        let raw = on.sample_raw(&mut rng, 8);
        assert!(!last(&raw));
        assert!(raw.enc_blocks[0].iter().all(|b| b.top == 0 && b.left == 0));
    }
    let cfg = MaskConfig {
        edge_quirk: false,
        ..MaskConfig::default()
    };
    let off = MaskSampler::new(cfg, 14, 14).unwrap();
    let mut touched = false;
    for _ in 0..100 {
        touched |= last(&off.sample_raw(&mut rng, 8));
    }
    assert!(touched);
}

#[test]
fn relaxation_is_bounded() {
    // Targets that cover nearly the whole context force the relaxation path.
    let cfg = MaskConfig {
        pred_blocks: 8,
        pred_scale: [0.5, 0.6],
        pred_aspect: [1.0, 1.0],
        min_keep: 5,
        ..MaskConfig::default()
    };
    let s = MaskSampler::new(cfg, 6, 6).unwrap();
    let raw = s.sample_raw(&mut ChaCha8Rng::seed_from_u64(9), 16);
    assert!(raw.relaxations > 0);
    assert!(raw.enc[0].iter().all(|l| l.len() > 5));
}

#[test]
fn config_serde() {
    let c: MaskConfig = serde_json::from_str(r#"{"min_keep": 3}"#).unwrap();
    assert_eq!(c.min_keep, 3);
    assert!(c.edge_quirk);
    assert!(serde_json::from_str::<MaskConfig>(r#"{"nenc": 1}"#).is_err());
}

//! Unit tests of `fcos`.

use super::*;
use candle_core::{Device, Var};

fn levels() -> Vec<LevelInfo> {
    let mut off = 0;
    [(4, 16), (8, 8), (16, 4), (32, 2)]
        .iter()
        .map(|&(s, n)| {
            let l = LevelInfo {
                stride: s,
                h: n,
                w: n,
                offset: off,
            };
            off += n * n;
            l
        })
        .collect()
}

#[test]
fn assignment_follows_size_ranges_and_center_sampling() {
    let lv = levels();
    assert_eq!(
        size_ranges(&lv),
        vec![
            (-1.0, 32.0),
            (32.0, 64.0),
            (64.0, 128.0),
            (128.0, f32::INFINITY)
        ]
    );
    let small = GtBox {
        bbox: [8.0, 8.0, 24.0, 24.0],
        class: 1,
    };
    let big = GtBox {
        bbox: [0.0, 0.0, 64.0, 60.0],
        class: 0,
    };
    let a = assign(&lv, &[small, big], 1.5);
    let pos: Vec<(usize, usize)> = a.positives().collect();
    // small box: max distance <= 32 -> stride-4 level only, within 1.5*4 = 6 px of its centre (16, 16)
    for &(loc, g) in &pos {
        let l = lv.iter().rev().find(|l| loc >= l.offset).unwrap();
        let r = loc - l.offset;
        let (x, y) = l.location(r / l.w, r % l.w);
        if g == 0 {
            assert_eq!(l.stride, 4);
            assert!((x - 16.0).abs() < 6.0 && (y - 16.0).abs() < 6.0);
        } else {
            // big box: max distance in (32, 64] -> stride 8
            assert_eq!(l.stride, 8, "{x} {y}");
        }
        let d = a.reg[loc];
        let b = decode(x, y, l.stride as f32, &d);
        let want = [small, big][g].bbox;
        for i in 0..4 {
            assert!((b[i] - want[i]).abs() < 1e-4);
        }
    }
    // centre region (10, 22)^2, strict: x, y in {14, 18}
    assert_eq!(pos.iter().filter(|p| p.1 == 0).count(), 4);
    assert!(pos.iter().any(|p| p.1 == 1));
    assert!(assign(&lv, &[], 1.5).positives().next().is_none());
}

#[test]
fn head_shapes_and_losses_backprop() {
    let dev = Device::Cpu;
    let (vm, vb) = crate::model::detect::init::SeededInit::cpu_vars(0);
    let head = FcosHead::new(3, 8, 1, 2, vb).unwrap();
    let f0 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 8, 8, 8), &dev).unwrap()).unwrap();
    let f1 = Tensor::randn(0f32, 1.0, (2, 4, 4, 8), &dev).unwrap();
    let out = head
        .forward(&[f0.as_tensor().clone(), f1], &[4, 8])
        .unwrap();
    assert_eq!(out.cls.dims(), &[2, 80, 3]);
    assert_eq!(out.reg.dims(), &[2, 80, 4]);
    assert_eq!(out.ctr.dims(), &[2, 80]);
    // prior probability 0.01 at init
    let p = super::super::nn::sigmoid(&out.cls)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((p - 0.01).abs() < 0.005, "{p}");
    let gts = vec![
        vec![GtBox {
            bbox: [4.0, 4.0, 20.0, 28.0],
            class: 2,
        }],
        vec![],
    ];
    let assigns: Vec<Assignment> = gts.iter().map(|g| assign(&out.levels, g, 1.5)).collect();
    let l = losses(
        &out,
        &assigns,
        &gts,
        &LossConfig {
            alpha: 0.25,
            gamma: 2.0,
        },
    )
    .unwrap();
    assert!(l.num_pos > 0);
    let total = ((&l.cls + &l.reg).unwrap() + &l.ctr).unwrap();
    let g = total.backward().unwrap();
    for (name, v) in vm.data().lock().unwrap().iter() {
        assert!(g.get(v.as_tensor()).is_some(), "{name} has no gradient");
    }
}

#[test]
fn postprocess_decodes_thresholds_and_suppresses() {
    let lv = vec![LevelInfo {
        stride: 8,
        h: 2,
        w: 2,
        offset: 0,
    }];
    // 4 locations, 2 classes
    let cls = [0.9, 0.0, 0.8, 0.0, 0.01, 0.02, 0.0, 0.6];
    let ctr = [1.0, 1.0, 1.0, 0.25];
    // location 0 at (4, 4) and location 1 at (12, 4) both predict about the same box
    let reg = [
        0.5, 0.5, 1.5, 1.5, 1.5, 0.5, 0.5, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    ];
    let cfg = PostConfig {
        score_thresh: 0.05,
        pre_nms_topk: 10,
        nms_thresh: 0.6,
        detections_per_image: 10,
    };
    let d = postprocess(&cls, &ctr, &reg, &lv, 2, (16.0, 16.0), &cfg);
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[0].class, 0);
    assert!((d[0].score - 0.9f32.sqrt()).abs() < 1e-6);
    assert_eq!(d[0].bbox, [0.0, 0.0, 16.0, 16.0]);
    assert_eq!(d[1].class, 1);
    assert!((d[1].score - (0.6f32 * 0.25).sqrt()).abs() < 1e-6);
    assert_eq!(d[1].bbox, [4.0, 4.0, 16.0, 16.0]);
}

//! Unit tests of `probe_sweep`.

use super::*;
use crate::stages::linear_probe::Params;
use crate::train::cross_entropy::cross_entropy;

fn synthetic(n: usize, seed: u64) -> (Tensor, Vec<usize>) {
    // 3 classes, class c shifts dims 2c, 2c+1 of both layers.
    let mut r = crate::util::rng::stage_rng("data", seed, "x");
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let mut v = crate::model::init::trunc_normal(&mut r, 2 * n * 6, 1.0);
    for l in 0..2 {
        for (i, &y) in labels.iter().enumerate() {
            v[(l * n + i) * 6 + 2 * y] += 2.0;
            v[(l * n + i) * 6 + 2 * y + 1] += 2.0;
        }
    }
    (
        Tensor::from_vec(v, (2, n, 6), &Device::Cpu).unwrap(),
        labels,
    )
}

fn tiny_sweep(opt: OptimKind) -> Sweep {
    Sweep {
        epochs: 4,
        batch_size: 16,
        optimizer: opt,
        base_lr: if opt == OptimKind::Sgd { 4.0 } else { 16.0 },
        ..Params::default().sweep()
    }
}

/// A sweep interrupted after every single step and resumed each time ends bit-identical to
/// an uninterrupted one (heads, momentum, BN statistics and the loss series are restored).
#[test]
fn resume_after_every_step_is_bit_identical() {
    let (xt, yt) = synthetic(48, 1);
    let (xv, yv) = synthetic(30, 2);
    let data = ProbeData {
        train: &xt,
        train_labels: &yt,
        val: &xv,
        val_labels: &yv,
        classes: 3,
        augment: None,
    };
    for opt in [OptimKind::Lars, OptimKind::Sgd] {
        let sw = tiny_sweep(opt);
        let tmp = tempfile::tempdir().unwrap();
        let mut a = crate::kind::context::test_context(
            &tmp.path().join("a"),
            "k",
            Default::default(),
            tmp.path(),
        );
        let ra = train_sweep(&mut a, &sw, &data, &Device::Cpu).unwrap();
        assert_eq!(ra.resumed_from, 0);
        assert_eq!(ra.loss.len(), 4);
        let best = &ra.heads[ra.best];
        if opt == OptimKind::Sgd {
            assert!(best.top1 > 80.0, "{opt:?}: {:?}", ra.heads);
        }
        assert!(ra.loss[3].1 < ra.loss[0].1, "{opt:?}: {:?}", ra.loss);
        let mut calls = 0;
        let rb = loop {
            calls += 1;
            let mut b = crate::kind::context::test_context(
                &tmp.path().join("b"),
                "k",
                Default::default(),
                tmp.path(),
            );
            b.interrupted
                .store(true, std::sync::atomic::Ordering::SeqCst);
            match train_sweep(&mut b, &sw, &data, &Device::Cpu) {
                Err(Error::Interrupted) => continue,
                Ok(r) => break r,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(calls, 12, "3 batches x 4 epochs, one step per call");
        assert!(rb.resumed_from > 0);
        assert_eq!(ra.loss, rb.loss);
        for (x, y) in ra.heads.iter().zip(&rb.heads) {
            assert_eq!((x.top1, x.top5), (y.top1, y.top5));
        }
        let read = |d: &str| {
            fs_err::read(tmp.path().join(d).join("tmp/k/out").join(TENSORS_FILE)).unwrap()
        };
        assert_eq!(read("a"), read("b"));
    }
}

/// The batched heads learn a separable problem, at the speed their lr multiplier sets.
#[test]
fn heads_train_independently() {
    let dev = Device::Cpu;
    let sw = Sweep {
        epochs: 3,
        batch_size: 8,
        optimizer: OptimKind::Sgd,
        base_lr: 8.0,
        ..Params::default().sweep()
    };
    let specs = sw.head_specs();
    let mut rng = crate::util::rng::stage_rng("k", 0, "t");
    let mults: Vec<f64> = specs[..4].iter().map(|s| s.lr_mult).collect();
    let wds: Vec<f64> = specs[..4].iter().map(|s| s.wd).collect();
    let mut bank = HeadBank::new(
        "last_bn".into(),
        true,
        vec![0, 1, 2, 3],
        &mults,
        &wds,
        3,
        2,
        &mut rng,
        &dev,
    )
    .unwrap();
    let x = Tensor::new(
        &[
            [1f32, 0., 0.5],
            [0.9, 0.1, 0.],
            [0., 1., 0.2],
            [0.1, 0.8, 0.],
        ],
        &dev,
    )
    .unwrap();
    let y = Tensor::new(&[0u32, 0, 1, 1], &dev).unwrap();
    let oh = features::one_hot(&y, 2, &dev).unwrap();
    let before = cross_entropy(&bank.forward(&x, true).unwrap(), &oh).unwrap();
    for _ in 0..20 {
        let l = cross_entropy(&bank.forward(&x, true).unwrap(), &oh).unwrap();
        let g = l.sum_all().unwrap().backward().unwrap();
        bank.step(&g, 0.5, &sw.optim()).unwrap();
    }
    let after = cross_entropy(&bank.forward(&x, true).unwrap(), &oh).unwrap();
    let (b, a) = (
        before.to_vec1::<f32>().unwrap(),
        after.to_vec1::<f32>().unwrap(),
    );
    assert!(a[0] < b[0] * 0.5, "{a:?} vs {b:?}");
    // lr multiplier 0.1 heads (2, 3) learn slower than lr 1 heads (0, 1)
    assert!(a[2] > a[0]);
}

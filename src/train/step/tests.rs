//! Unit tests of `step`.

use super::*;
use crate::model::fused::testutil::randn;
use crate::train::optim::AdamWConfig;
use crate::train::testutil::{host_masks, tiny_vit};

/// The step makes no device-to-host read: its values stay on the device until the loop reads
/// them, in one read. (Five reads of the losses, a read-back of every mask in the encoder,
/// the predictor and the targets, and a second target forward for the collapse monitor were
/// made before; each would count here.)
#[test]
fn a_step_reads_nothing_from_the_device_and_its_values_read_once() {
    let cfg = tiny_vit();
    let nets = JepaNetworks::new_random(&cfg, 1, &Device::Cpu).unwrap();
    let mut opt = AdamW::new(nets.online_vars(), AdamWConfig::default()).unwrap();
    let loss_cfg = LossConfig::cjepa();
    let hyper = StepHyper {
        lr: 1e-3,
        wd: 0.04,
        momentum: 0.99,
    };
    let mut last = None;
    for step in 0..3 {
        let images = randn(&[4, 3, 32, 32], step);
        let (enc, pred) = host_masks(&cfg, 4, step);
        let b = Batch {
            images: &images,
            masks_enc: &enc,
            masks_pred: &pred,
        };
        let before = host_read::reads();
        let pending =
            train_step_pending(&nets, &b, &loss_cfg, &mut opt, hyper, &mut Single, None).unwrap();
        assert_eq!(
            host_read::reads() - before,
            0,
            "step {step} read from the device"
        );
        last = Some(pending);
    }
    let before = host_read::reads();
    let l = last.unwrap().read().unwrap();
    assert_eq!(host_read::reads() - before, 1);
    assert!(l.total.is_finite() && l.target_std > 0.0, "{l:?}");
    // with gradient clipping on, the global norm is one more read per step
    let mut clipped = AdamW::new(
        nets.online_vars(),
        AdamWConfig {
            clip_grad_norm: Some(1.0),
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let images = randn(&[4, 3, 32, 32], 9);
    let (enc, pred) = host_masks(&cfg, 4, 9);
    let b = Batch {
        images: &images,
        masks_enc: &enc,
        masks_pred: &pred,
    };
    let before = host_read::reads();
    train_step_pending(&nets, &b, &loss_cfg, &mut clipped, hyper, &mut Single, None).unwrap();
    assert_eq!(host_read::reads() - before, 1);
}

/// The collapse monitor: mean over dimensions of the unbiased batch std.
#[test]
fn effective_rank_counts_the_spread_directions() {
    // four points spread over 2 orthogonal directions equally: rank 2; over 3 of 8 dims
    let z = Tensor::new(
        &[
            [1f32, 0., 0., 0.],
            [-1., 0., 0., 0.],
            [0., 1., 0., 0.],
            [0., -1., 0., 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    assert!((effective_rank(&z).unwrap() - 2.0).abs() < 1e-5);
    let mut rows = vec![vec![0f32; 8]; 6];
    for k in 0..3 {
        rows[2 * k][k] = 2.0;
        rows[2 * k + 1][k] = -2.0;
    }
    let z = Tensor::new(rows, &Device::Cpu).unwrap();
    assert!((effective_rank(&z).unwrap() - 3.0).abs() < 1e-5);
    // collapse: every row the same point plus one direction -> 1
    let z = Tensor::new(&[[1f32, 2.], [1., 2.], [2., 2.]], &Device::Cpu).unwrap();
    assert!((effective_rank(&z).unwrap() - 1.0).abs() < 1e-5);
    assert!(effective_rank(&z.narrow(0, 0, 1).unwrap())
        .unwrap()
        .is_nan());
}

#[test]
fn target_std_is_the_mean_unbiased_std() {
    let z = Tensor::new(&[[1f32, 0.0], [3.0, 0.0], [5.0, 3.0]], &Device::Cpu).unwrap();
    // column 0: mean 3, var (4+0+4)/2 = 4 -> 2; column 1: mean 1, var (1+1+4)/2 = 3
    let got = target_std(&z).unwrap().to_scalar::<f32>().unwrap();
    assert!((got - (2.0 + 3f32.sqrt()) / 2.0).abs() < 1e-6, "{got}");
    let one = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
    assert!(target_std(&one)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .is_nan());
}

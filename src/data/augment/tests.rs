//! Unit tests of `augment`.

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 20 + 10) as u8,
            (y * 25 + 30) as u8,
            ((x + y) * 9) as u8,
        ])
    })
}

#[test]
fn simple_ops() {
    let mut r = ChaCha8Rng::seed_from_u64(0);
    let img = pattern(8, 6);
    let inv = apply_op(&img, Op::Invert, 5.0, &mut r);
    assert_eq!(inv.get_pixel(1, 2).0[0], 255 - 30);
    // AutoContrast stretches the red channel 10..150 to 0..255.
    let ac = apply_op(&img, Op::AutoContrast, 5.0, &mut r);
    assert_eq!(ac.get_pixel(0, 0).0[0], 0);
    assert_eq!(ac.get_pixel(7, 0).0[0], 255);
    // Posterize at m = 10 keeps 0 bits.
    let p = apply_op(&img, Op::Posterize, 10.0, &mut r);
    assert!(p.pixels().all(|p| p.0 == [0, 0, 0]));
    // Solarize at m = 0: threshold 256, nothing changes.
    assert_eq!(apply_op(&img, Op::Solarize, 0.0, &mut r), img);
    // Translation by 0 and identity affine keep the image.
    assert_eq!(affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), img);
    // A whole-width translation leaves only the fill colour.
    let t = affine(&img, [1.0, 0.0, 8.0, 0.0, 1.0, 0.0]);
    assert!(t.pixels().all(|p| p.0 == FILL));
    // Brightness factor 1 is the identity.
    let deg = RgbImage::new(8, 6);
    assert_eq!(blend(&deg, &img, 1.0), img);
}

#[test]
fn equalize_flat_and_two_level() {
    let mut r = ChaCha8Rng::seed_from_u64(0);
    let flat = RgbImage::from_pixel(4, 4, Rgb([7, 7, 7]));
    assert_eq!(apply_op(&flat, Op::Equalize, 0.0, &mut r), flat);
    let two = RgbImage::from_fn(4, 4, |x, _| if x < 2 { Rgb([10; 3]) } else { Rgb([20; 3]) });
    let e = apply_op(&two, Op::Equalize, 0.0, &mut r);
    // Pillow: step = (16 - 8) // 255 = 0 -> identity.
    assert_eq!(e, two);
}

#[test]
fn randaugment_is_seeded() {
    let img = pattern(16, 16);
    let ra = RandAugment::mae();
    let a = ra.apply(&img, &mut ChaCha8Rng::seed_from_u64(3));
    let b = ra.apply(&img, &mut ChaCha8Rng::seed_from_u64(3));
    assert_eq!(a, b);
}

#[test]
fn beta_mean() {
    let mut r = ChaCha8Rng::seed_from_u64(9);
    let n = 20000;
    let m: f64 = (0..n).map(|_| beta(0.8, 0.8, &mut r)).sum::<f64>() / n as f64;
    assert!((m - 0.5).abs() < 0.01, "{m}");
    let m: f64 = (0..n).map(|_| beta(2.0, 6.0, &mut r)).sum::<f64>() / n as f64;
    assert!((m - 0.25).abs() < 0.01, "{m}");
}

#[test]
fn mixup_targets_sum_to_one() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let shape = [4, 1, 4, 4];
    let mut imgs: Vec<f32> = (0..64).map(|i| (i / 16) as f32).collect();
    let cfg = MixupConfig {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
        smoothing: 0.1,
    };
    for _ in 0..10 {
        let t = mix_batch(&mut imgs, shape, &[0, 1, 2, 0], 3, &cfg, &mut r);
        for row in t.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
    // Off: plain smoothed one-hot, images untouched.
    let off = MixupConfig {
        mixup_alpha: 0.0,
        cutmix_alpha: 0.0,
        ..cfg
    };
    let mut imgs2: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let t = mix_batch(&mut imgs2, shape, &[0, 1, 2, 0], 3, &off, &mut r);
    assert_eq!(imgs2, (0..64).map(|i| i as f32).collect::<Vec<_>>());
    assert!((t[0] - (0.9 + 0.1 / 3.0) as f32).abs() < 1e-6);
}

#[test]
fn erasing_changes_a_box() {
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let mut img = Chw {
        channels: 3,
        height: 16,
        width: 16,
        data: vec![0.0; 3 * 256],
    };
    random_erasing(&mut img, 1.0, &mut r);
    let changed = img.data.iter().filter(|v| **v != 0.0).count();
    assert!(changed > 0 && changed < 3 * 256);
}

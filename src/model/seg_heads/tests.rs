//! Unit tests of `seg_heads`.

use super::*;
use candle_core::{DType, Device};

#[test]
fn deconv_matches_torch() {
    // torch.nn.ConvTranspose2d(2, 1, 2, 2) with weight = arange(8).reshape(2,1,2,2),
    // bias = 0.5, on x = arange(2).reshape(1,2,1,1) + 1 -> [[1*w0 + 2*w1]] + 0.5
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let d = Deconv2x2::new(2, 1, vb).unwrap();
    for (k, v) in vm.data().lock().unwrap().iter() {
        let t = if k.ends_with("weight") {
            Tensor::arange(0f32, 8.0, &dev)
                .unwrap()
                .reshape((2, 1, 2, 2))
                .unwrap()
        } else {
            Tensor::new(&[0.5f32], &dev).unwrap()
        };
        v.set(&t).unwrap();
    }
    let x = Tensor::new(&[1f32, 2.0], &dev)
        .unwrap()
        .reshape((1, 2, 1, 1))
        .unwrap();
    let y = d.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // w0 = [0,1,2,3], w1 = [4,5,6,7]: 1*w0 + 2*w1 + 0.5
    assert_eq!(got, vec![8.5, 11.5, 14.5, 17.5]);
}

#[test]
fn upernet_shapes_and_gradients() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = UperNetConfig {
        in_dim: 8,
        channels: 6,
        aux_channels: 4,
        classes: 5,
        dropout: 0.1,
    };
    let net = UperNet::new(&cfg, vb).unwrap();
    seeded_init(&vm, 3).unwrap();
    let feats: Vec<Tensor> = (0..4)
        .map(|i| {
            Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &dev)
                .unwrap()
                .affine(1.0, i as f64)
                .unwrap()
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (logits, aux) = net.forward(&feats, true, Some(&mut rng)).unwrap();
    assert_eq!(logits.dims(), &[2, 5, 16, 16]);
    let aux = aux.expect("aux logits in training");
    assert_eq!(aux.dims(), &[2, 5, 4, 4]);
    let loss = (logits.sqr().unwrap().mean_all().unwrap() + aux.mean_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let params = trainable(&vm);
    let missing: Vec<&String> = params
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_none())
        .map(|(k, _)| k)
        .collect();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    let (eval_logits, none) = net.forward(&feats, false, None).unwrap();
    assert!(none.is_none());
    assert_eq!(eval_logits.dims(), &[2, 5, 16, 16]);
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    assert!(names.iter().any(|n| n == "decode_head.conv_seg.weight"));
    assert!(names.iter().any(|n| n == "neck.upsample_4x.1.running_var"));
}

#[test]
fn im2col_conv_matches_candle_conv2d() {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 2.0 * 3.0 * 5.0 * 4.0, &dev)
        .unwrap()
        .reshape((2, 3, 5, 4))
        .unwrap()
        .sin()
        .unwrap();
    for k in [1usize, 3] {
        let w = Tensor::arange(0f32, (4 * 3 * k * k) as f32, &dev)
            .unwrap()
            .reshape((4, 3, k, k))
            .unwrap()
            .cos()
            .unwrap();
        let want = x.conv2d(&w, k / 2, 1, 1, 1).unwrap();
        let got = conv_same(&x, &w).unwrap();
        assert_eq!(got.dims(), want.dims());
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // with the launch guard lowered to one image's columns, the batch runs image by
        // image and gives the same values
        let per_image = (3 * k * k).max(4) * 5 * 4;
        let chunked = conv_same_limited(&x, &w, per_image).unwrap();
        let diff = (chunked - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(conv_same_limited(&x, &w, per_image - 1).is_err());
    }
}

#[test]
fn batchnorm_updates_running_stats() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let bn = BatchNorm2d::new(1, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)
        .unwrap()
        .reshape((2, 1, 1, 2))
        .unwrap();
    let y = bn.forward(&x, true).unwrap();
    let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // mean 2.5, biased var 1.25
    let s = (1.25f32 + 1e-5).sqrt();
    for (g, v) in got.iter().zip([1f32, 2.0, 3.0, 4.0]) {
        assert!((g - (v - 2.5) / s).abs() < 1e-5);
    }
    let rm = bn.running_mean.to_vec1::<f32>().unwrap()[0];
    let rv = bn.running_var.to_vec1::<f32>().unwrap()[0];
    assert!((rm - 0.25).abs() < 1e-6);
    // unbiased var 5/3: 0.9 * 1 + 0.1 * 5/3
    assert!((rv - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
}

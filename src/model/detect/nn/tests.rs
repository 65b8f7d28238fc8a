//! Unit tests of `nn`.

use super::*;
use candle_core::{Device, Var};

/// Direct NCHW reference convolution (PyTorch semantics, zero padding k/2).
/// Standard normal weights.
const N01: Init = Init::Randn {
    mean: 0.0,
    stdev: 1.0,
};

fn conv_ref(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    wt: &[f32],
    o: usize,
    k: usize,
) -> Vec<f32> {
    let p = (k / 2) as i64;
    let mut y = vec![0f32; o * h * w];
    for oc in 0..o {
        for i in 0..h {
            for j in 0..w {
                let mut s = 0f32;
                for ic in 0..c {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (yy, xx) = (i as i64 + ky as i64 - p, j as i64 + kx as i64 - p);
                            if yy >= 0 && xx >= 0 && yy < h as i64 && xx < w as i64 {
                                s += x[(ic * h + yy as usize) * w + xx as usize]
                                    * wt[((oc * c + ic) * k + ky) * k + kx];
                            }
                        }
                    }
                }
                y[(oc * h + i) * w + j] = s;
            }
        }
    }
    y
}

#[test]
fn conv_matches_direct_formula_and_candle() {
    let dev = Device::Cpu;
    let (_vars, vb) = crate::model::detect::init::SeededInit::cpu_vars(1);
    for k in [1, 3] {
        let conv = Conv2d::new(3, 4, k, N01, Some(0.5), vb.pp(format!("c{k}"))).unwrap();
        let nchw = Tensor::randn(0f32, 1.0, (1, 3, 5, 6), &dev).unwrap();
        let y = conv.forward(&nchw.permute((0, 2, 3, 1)).unwrap()).unwrap();
        assert_eq!(y.dims(), &[1, 5, 6, 4]);
        let got = y
            .permute((0, 3, 1, 2))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let xv = nchw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = conv.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = conv_ref(&xv, (3, 5, 6), &wv, 4, k);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - (b + 0.5)).abs() < 1e-4, "k{k}: {a} vs {}", b + 0.5);
        }
        // candle's own conv2d agrees too
        let cand = nchw.conv2d(&conv.weight, k / 2, 1, 1, 1).unwrap();
        let cv = cand.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&cv) {
            assert!((a - (b + 0.5)).abs() < 1e-4);
        }
    }
}

/// The shifted-view columns (the CUDA path) are the gathered columns (the CPU path).
#[test]
fn shifted_columns_equal_the_gathered_columns() {
    let dev = Device::Cpu;
    let (b, h, w, c, k) = (2, 4, 5, 3, 3);
    let x = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev).unwrap();
    let table = Tensor::cat(
        &[
            x.reshape((b * h * w, c)).unwrap(),
            Tensor::zeros((1, c), x.dtype(), &dev).unwrap(),
        ],
        0,
    )
    .unwrap();
    let idx = Tensor::from_vec(im2col_indices(b, h, w, k), b * h * w * k * k, &dev).unwrap();
    let gathered = table
        .index_select(&idx, 0)
        .unwrap()
        .reshape((b, h, w, k * k * c))
        .unwrap();
    let shifted = shifted_columns(&x, k).unwrap();
    assert_eq!(shifted.dims(), gathered.dims());
    let a = shifted.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g = gathered.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, g);
}

#[test]
fn conv_gradient_matches_candle_conv2d() {
    let dev = Device::Cpu;
    let (_vars, vb) = crate::model::detect::init::SeededInit::cpu_vars(2);
    let conv = Conv2d::new(2, 3, 3, N01, None, vb.pp("c")).unwrap();
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 4, 5), &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev).unwrap();
    let ours = conv
        .forward(&x.permute((0, 2, 3, 1)).unwrap())
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap();
    let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let theirs = x.conv2d(&conv.weight, 1, 1, 1, 1).unwrap();
    let g2 = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for t in [x.as_tensor(), &conv.weight] {
        let host = |g: &candle_core::backprop::GradStore| {
            let v = g.get(t).unwrap().flatten_all().unwrap();
            v.to_vec1::<f32>().unwrap()
        };
        let (a, b) = (host(&g1), host(&g2));
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-3, "{u} vs {v}");
        }
    }
}

#[test]
fn deconv_matches_direct_formula() {
    let dev = Device::Cpu;
    let (_vars, vb) = crate::model::detect::init::SeededInit::cpu_vars(3);
    let d = Deconv2x2::new(
        2,
        3,
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
        vb.pp("d"),
    )
    .unwrap();
    // NCHW values x[c, i, j] = c*6 + i*3 + j
    let x = Tensor::arange(0f32, 2.0 * 2.0 * 3.0, &dev)
        .unwrap()
        .reshape((1, 2, 2, 3))
        .unwrap();
    let y = d.forward(&x.permute((0, 2, 3, 1)).unwrap()).unwrap();
    assert_eq!(y.dims(), &[1, 4, 6, 3]);
    let y = y.permute((0, 3, 1, 2)).unwrap();
    let w = d.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for o in 0..3 {
        for yy in 0..4 {
            for xx in 0..6 {
                let (i, u, j, v) = (yy / 2, yy % 2, xx / 2, xx % 2);
                let mut s = 0f32;
                for c in 0..2 {
                    s += xv[c * 6 + i * 3 + j] * w[((c * 3 + o) * 2 + u) * 2 + v];
                }
                let got = yv[(o * 4 + yy) * 6 + xx];
                assert!((got - s).abs() < 1e-5, "{got} vs {s}");
            }
        }
    }
}

#[test]
fn losses_have_gradients_and_values() {
    let dev = Device::Cpu;
    let x = Var::new(&[-2f32, 0.0, 3.0], &dev).unwrap();
    let t = Tensor::new(&[0f32, 1.0, 1.0], &dev).unwrap();
    let l = bce_with_logits(x.as_tensor(), &t).unwrap();
    let got = l.to_vec1::<f32>().unwrap();
    let want = [
        (1.0 + (-2f32).exp()).ln(),
        2f32.ln(),
        (1.0 + (-3f32).exp()).ln(),
    ];
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{a} {b}");
    }
    let s = sigmoid(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert!((s[0] - 1.0 / (1.0 + 2f32.exp())).abs() < 1e-6);
    let f = sigmoid_focal_loss(x.as_tensor(), &t, 0.25, 2.0).unwrap();
    let g = f.sum_all().unwrap().backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    // numerical check of d focal / dx
    let fl = |v: f32, tv: f32| {
        let p = 1.0 / (1.0 + (-v).exp());
        let ce = -(tv * p.ln() + (1.0 - tv) * (1.0 - p).ln());
        let pt = p * tv + (1.0 - p) * (1.0 - tv);
        let at = 0.25 * tv + 0.75 * (1.0 - tv);
        ce * (1.0 - pt).powi(2) * at
    };
    let xs = [-2f32, 0.0, 3.0];
    let ts = [0f32, 1.0, 1.0];
    for i in 0..3 {
        let e = 1e-2;
        let num = (fl(xs[i] + e, ts[i]) - fl(xs[i] - e, ts[i])) / (2.0 * e);
        assert!((gx[i] - num).abs() < 1e-3, "{i}: {} vs {num}", gx[i]);
    }
}

#[test]
fn fused_layer_norm_matches_generic_graph() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 4, 5, 7), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(1f32, 0.5, 7, &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 7, &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1.0, (3, 4, 5, 7), &dev).unwrap();
    let generic = |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        xc.broadcast_mul(&(var + 1e-6).unwrap().sqrt().unwrap().recip().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap()
    };
    let fa = layer_norm_last(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
    let fb = generic(x.as_tensor());
    let close = |u: &Tensor, v: &Tensor| {
        let u = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(u.len(), v.len());
        for (p, q) in u.iter().zip(&v) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    };
    close(&fa, &fb);
    let ga = (fa * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (fb * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
        close(ga.get(t).unwrap(), gb.get(t).unwrap());
    }
}

#[test]
fn layer_norm_and_pool_backprop() {
    let dev = Device::Cpu;
    let (vm, vb) = crate::model::detect::init::SeededInit::cpu_vars(0);
    let ln = LayerNorm2d::new(3, vb.pp("ln")).unwrap();
    let x = Var::from_tensor(
        &Tensor::arange(0f32, 24.0, &dev)
            .unwrap()
            .reshape((1, 2, 4, 3))
            .unwrap()
            .sin()
            .unwrap(),
    )
    .unwrap();
    let y = max_pool2x2(&ln.forward(x.as_tensor()).unwrap()).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 3]);
    // NHWC (1, 2, 4, 3): pool output (0, 0, j, c) = max over rows 0..2, cols 2j..2j+2
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let p = max_pool2x2(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for j in 0..2 {
        for c in 0..3 {
            let m = [(0, 2 * j), (0, 2 * j + 1), (1, 2 * j), (1, 2 * j + 1)]
                .iter()
                .map(|&(r, q)| xv[(r * 4 + q) * 3 + c])
                .fold(f32::MIN, f32::max);
            assert_eq!(p[j * 3 + c], m);
        }
    }
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
    assert_eq!(vm.all_vars().len(), 2);
    for v in vm.all_vars() {
        assert!(g.get(v.as_tensor()).is_some());
    }
}

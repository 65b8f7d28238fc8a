//! Golden tests of the I-JEPA / C-JEPA numerics against the official PyTorch code
//! (`golden/model/README.md`): forward quantities, loss terms, every gradient, AdamW, EMA and one
//! full training step, with the README's tolerances.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use cjepa::model::pos_embed::sincos_2d;
use cjepa::model::{JepaNetworks, VitConfig};
use cjepa::train::ema::ema_update;
use cjepa::train::loss::{LossConfig, Method};
use cjepa::train::optim::{AdamW, AdamWConfig};
use cjepa::train::step::{forward_loss, train_step, Batch, StepHyper, StepLosses};

use super::golden::cases;

struct Case {
    dir: PathBuf,
    cfg: VitConfig,
    loss: LossConfig,
    adam: AdamWConfig,
    lr: f64,
    wd: f64,
    momentum: f64,
    weights: HashMap<String, Tensor>,
    images: Tensor,
    masks_enc: Vec<Tensor>,
    masks_pred: Vec<Tensor>,
    out: HashMap<String, Tensor>,
}

fn num(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("config.json lacks numeric `{k}`"))
}

fn split_masks(t: &Tensor) -> Vec<Tensor> {
    let m = t.dim(0).unwrap();
    (0..m).map(|i| t.get(i).unwrap()).collect()
}

/// The device the cases run on: `CJEPA_TEST_DEVICE` (`cpu`, `cuda:N`; `scripts/gpu-check.sh`
/// sets it on a GPU machine), default the CPU.
fn test_device() -> Device {
    let d = std::env::var("CJEPA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    cjepa::stages::backbone::parse_device(&d)
        .unwrap_or_else(|e| panic!("CJEPA_TEST_DEVICE={d}: {e}"))
}

fn load_case(dir: &Path) -> Case {
    let dev = test_device();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let u = |k: &str| num(&c, k) as usize;
    let cfg = VitConfig {
        img_size: u("img_size"),
        patch_size: u("patch_size"),
        in_chans: u("in_chans"),
        embed_dim: u("embed_dim"),
        depth: u("depth"),
        num_heads: u("num_heads"),
        mlp_ratio: num(&c, "mlp_ratio"),
        qkv_bias: c["qkv_bias"].as_bool().unwrap(),
        ln_eps: num(&c, "ln_eps"),
        pred_embed_dim: u("pred_embed_dim"),
        pred_depth: u("pred_depth"),
        pred_num_heads: u("pred_num_heads"),
        init_std: 0.02,
    };
    let loss = LossConfig {
        method: Method::Cjepa,
        smooth_l1_beta: num(&c, "smooth_l1_beta"),
        target_ln_eps: num(&c, "target_ln_eps"),
        vic_weight: num(&c, "vic_weight"),
        vic_sim_coeff: num(&c, "vic_sim_coeff"),
        vic_std_coeff: num(&c, "vic_std_coeff"),
        vic_cov_coeff: num(&c, "vic_cov_coeff"),
        vic_var_eps: num(&c, "vic_var_eps"),
        ..LossConfig::default()
    };
    let adam = AdamWConfig {
        beta1: num(&c, "adam_beta1"),
        beta2: num(&c, "adam_beta2"),
        eps: num(&c, "adam_eps"),
        clip_grad_norm: None,
    };
    let load = |f: &str| candle_core::safetensors::load(dir.join(f), &dev).unwrap();
    let inputs = load("inputs.safetensors");
    Case {
        dir: dir.to_path_buf(),
        cfg,
        loss,
        adam,
        lr: num(&c, "lr"),
        wd: num(&c, "weight_decay"),
        momentum: num(&c, "ema_momentum"),
        weights: load("weights.safetensors"),
        images: inputs["images"].clone(),
        masks_enc: split_masks(&inputs["masks_enc"]),
        masks_pred: split_masks(&inputs["masks_pred"]),
        out: load("outputs.safetensors"),
    }
}

fn all_cases() -> Vec<Case> {
    let v: Vec<Case> = cases("model")
        .iter()
        .filter(|d| d.join("config.json").exists())
        .map(|d| load_case(d))
        .collect();
    assert!(
        !v.is_empty(),
        "no golden model case found under tests/golden/model"
    );
    v
}

/// Collects tolerance violations `|ours - ref| > atol + rtol*|ref|` (or `skip(ref)` elements).
#[derive(Default)]
struct Report(Vec<String>, f64, String);

impl Report {
    fn check_where(
        &mut self,
        what: &str,
        ours: &Tensor,
        reference: &Tensor,
        atol: f64,
        rtol: f64,
        skip: impl Fn(f32) -> bool,
    ) {
        if ours.dims() != reference.dims() {
            self.0.push(format!(
                "{what}: shape {:?} vs reference {:?}",
                ours.dims(),
                reference.dims()
            ));
            return;
        }
        let a = ours
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = (0.0f64, 0usize);
        let mut bad = 0usize;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            if skip(*y) {
                continue;
            }
            let err = (*x as f64 - *y as f64).abs();
            let tol = atol + rtol * (*y as f64).abs();
            if err / tol > self.1 {
                self.1 = err / tol;
                self.2 = what.to_string();
            }
            if err.is_nan() || err > tol {
                bad += 1;
                if err / tol > worst.0 || worst.0.is_nan() {
                    worst = (err / tol, i);
                }
            }
        }
        if bad > 0 {
            let i = worst.1;
            self.0.push(format!(
                "{what}: {bad}/{} elements out of tolerance, worst at {i}: ours {} ref {} ({}x the tolerance)",
                a.len(),
                a[i],
                b[i],
                worst.0
            ));
        }
    }
    fn check(&mut self, what: &str, ours: &Tensor, reference: &Tensor, atol: f64, rtol: f64) {
        self.check_where(what, ours, reference, atol, rtol, |_| false)
    }
    fn finish(self, case: &Path) {
        eprintln!(
            "{}: worst error {:.3} of the tolerance ({})",
            case.display(),
            self.1,
            self.2
        );
        assert!(
            self.0.is_empty(),
            "case {}:\n{}",
            case.display(),
            self.0.join("\n")
        );
    }
}

fn nets(c: &Case) -> JepaNetworks {
    JepaNetworks::from_tensors(&c.cfg, &c.weights, &test_device())
        .expect("golden weights load with the official names")
}

#[test]
fn golden_model_pos_embed_matches() {
    for c in all_cases() {
        let g = c.cfg.grid_size();
        for (key, dim) in [
            ("encoder.pos_embed", c.cfg.embed_dim),
            ("predictor.predictor_pos_embed", c.cfg.pred_embed_dim),
        ] {
            let ours = sincos_2d(dim, g, g).unwrap();
            let r = c.weights[key]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours.len(), r.len());
            let max = ours
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max <= 1e-7, "{}: {key} differs by {max}", c.dir.display());
        }
    }
}

#[test]
fn golden_model_forward() {
    for c in all_cases() {
        let n = nets(&c);
        let mut r = Report::default();
        let (a, rt) = (1e-5, 1e-4);
        let enc = &n.encoder;
        r.check(
            "dbg.enc_full.tokens_in",
            &enc.embed(&c.images, None).unwrap(),
            &c.out["dbg.enc_full.tokens_in"],
            a,
            rt,
        );
        let (blocks, full) = enc.forward_hidden(&c.images, None).unwrap();
        for (l, b) in blocks.iter().enumerate() {
            r.check(
                &format!("dbg.enc_full.block{l}"),
                b,
                &c.out[&format!("dbg.enc_full.block{l}")],
                a,
                rt,
            );
        }
        r.check("enc_full", &full, &c.out["enc_full"], a, rt);
        let sel = enc.forward_layers(&c.images, None, &[-1]).unwrap();
        r.check("forward_layers(-1)", &sel[0], &c.out["enc_full"], a, rt);
        let me = Some(c.masks_enc.as_slice());
        r.check(
            "dbg.enc_ctx.tokens_in",
            &enc.embed(&c.images, me).unwrap(),
            &c.out["dbg.enc_ctx.tokens_in"],
            a,
            rt,
        );

        let batch = Batch {
            images: &c.images,
            masks_enc: &c.masks_enc,
            masks_pred: &c.masks_pred,
        };
        let f = forward_loss(&n, &batch, &c.loss).unwrap();
        r.check("enc_ctx", &f.enc_ctx, &c.out["enc_ctx"], a, rt);
        r.check(
            "target_feats",
            &f.targets.feats,
            &c.out["target_feats"],
            a,
            rt,
        );
        r.check("vic_z_t", &f.targets.z_t, &c.out["vic_z_t"], a, rt);
        let z_c = cjepa::train::loss::context_embedding(&f.enc_ctx, c.masks_enc.len()).unwrap();
        r.check("vic_z_c", &z_c, &c.out["vic_z_c"], a, rt);
        r.check("pred", &f.pred, &c.out["pred"], 1e-5, 1e-4);

        let tr = n
            .predictor
            .forward_trace(&f.enc_ctx, &c.masks_enc, &c.masks_pred, true)
            .unwrap();
        r.check(
            "dbg.pred.tokens_in",
            &tr.tokens_in,
            &c.out["dbg.pred.tokens_in"],
            a,
            rt,
        );
        for (l, b) in tr.blocks.iter().enumerate() {
            r.check(
                &format!("dbg.pred.block{l}"),
                b,
                &c.out[&format!("dbg.pred.block{l}")],
                a,
                rt,
            );
        }
        assert_eq!(tr.blocks.len(), c.cfg.pred_depth);

        let (sa, sr) = (1e-6, 1e-5);
        let l = &f.loss;
        r.check(
            "loss_jepa_smoothl1",
            &l.jepa,
            &c.out["loss_jepa_smoothl1"],
            sa,
            sr,
        );
        r.check("vic_sim", &l.sim, &c.out["vic_sim"], sa, sr);
        r.check("vic_std", &l.std, &c.out["vic_std"], sa, sr);
        r.check("vic_cov", &l.cov, &c.out["vic_cov"], sa, sr);
        r.check("loss_total", &l.total, &c.out["loss_total"], sa, sr);
        let vic_total = ((&l.sim * c.loss.vic_sim_coeff).unwrap()
            + (&l.std * c.loss.vic_std_coeff).unwrap()
            + (&l.cov * c.loss.vic_cov_coeff).unwrap())
        .unwrap();
        r.check("vic_total", &vic_total, &c.out["vic_total"], sa, sr);
        let l2cfg = LossConfig {
            kind: cjepa::train::loss::JepaLossKind::L2,
            ..c.loss.clone()
        };
        let l2 = cjepa::train::loss::jepa_loss(&f.pred, &f.targets.feats, &l2cfg).unwrap();
        r.check("loss_jepa_l2", &l2, &c.out["loss_jepa_l2"], sa, sr);
        r.finish(&c.dir);
    }
}

#[test]
fn golden_model_gradients() {
    for c in all_cases() {
        let n = nets(&c);
        let batch = Batch {
            images: &c.images,
            masks_enc: &c.masks_enc,
            masks_pred: &c.masks_pred,
        };
        let f = forward_loss(&n, &batch, &c.loss).unwrap();
        let grads = f.loss.total.backward().unwrap();
        let mut r = Report::default();
        let mut missing = Vec::new();
        let vars = n.online_vars();
        for (name, var) in &vars {
            match grads.get(var.as_tensor()) {
                None => missing.push(name.clone()),
                Some(g) => r.check(
                    &format!("grad.{name}"),
                    g,
                    &c.out[&format!("grad.{name}")],
                    1e-7,
                    1e-3,
                ),
            }
        }
        assert!(
            missing.is_empty(),
            "{}: parameters without a gradient: {missing:?}",
            c.dir.display()
        );
        let ref_grads = c.out.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            ref_grads,
            vars.len(),
            "every reference gradient has a parameter and vice versa"
        );
        for (_, var) in n.target_vars() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "the target encoder must get no gradient"
            );
        }
        r.finish(&c.dir);
    }
}

#[test]
fn golden_model_optimizer_and_ema_alone() {
    for c in all_cases() {
        let n = nets(&c);
        let vars = n.online_vars();
        let mut opt = AdamW::new(vars.clone(), c.adam.clone()).unwrap();
        let g: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, _)| (k.clone(), c.out[&format!("grad.{k}")].clone()))
            .collect();
        let st = opt.step_named(&g, c.lr, c.wd).unwrap();
        assert_eq!(st.updated, vars.len());
        let mut r = Report::default();
        for (k, v) in &vars {
            r.check(
                &format!("step1.{k} (optimizer alone)"),
                v.as_tensor(),
                &c.out[&format!("step1.{k}")],
                1e-6,
                0.0,
            );
        }
        // EMA alone, from the reference step-1 encoder.
        let n2 = nets(&c);
        for (k, v) in n2.online_vars() {
            v.set(&c.out[&format!("step1.{k}")]).unwrap();
        }
        ema_update(&n2.ema_pairs(), c.momentum).unwrap();
        let tv = n2.target_vars();
        assert_eq!(
            tv.len(),
            c.out
                .keys()
                .filter(|k| k.starts_with("step1.target_encoder.") && !k.ends_with("pos_embed"))
                .count()
        );
        for (k, v) in &tv {
            r.check(
                &format!("step1.{k} (EMA alone)"),
                v.as_tensor(),
                &c.out[&format!("step1.{k}")],
                1e-6,
                0.0,
            );
        }
        r.finish(&c.dir);
    }
}

/// One full training step of a case from its golden weights: the networks, the optimiser and
/// the step's values.
fn one_step(c: &Case) -> (JepaNetworks, AdamW, StepLosses) {
    let n = nets(c);
    let mut opt = AdamW::new(n.online_vars(), c.adam.clone()).unwrap();
    let batch = Batch {
        images: &c.images,
        masks_enc: &c.masks_enc,
        masks_pred: &c.masks_pred,
    };
    let hyper = StepHyper {
        lr: c.lr,
        wd: c.wd,
        momentum: c.momentum,
    };
    let l = train_step(&n, &batch, &c.loss, &mut opt, hyper).unwrap();
    (n, opt, l)
}

#[test]
fn golden_model_train_step_end_to_end() {
    for c in all_cases() {
        let (n, opt, l) = one_step(&c);
        let mut r = Report::default();
        let dev = Device::Cpu;
        for (name, v, key) in [
            ("total", l.total, "loss_total"),
            ("jepa", l.jepa, "loss_jepa_smoothl1"),
            ("sim", l.sim, "vic_sim"),
            ("std", l.std, "vic_std"),
            ("cov", l.cov, "vic_cov"),
        ] {
            r.check(
                name,
                &Tensor::new(v, &dev).unwrap(),
                &c.out[key],
                1e-6,
                1e-5,
            );
        }
        for (k, v) in n.online_vars() {
            r.check(
                &format!("step1.{k}"),
                v.as_tensor(),
                &c.out[&format!("step1.{k}")],
                1e-4,
                1e-4,
            );
            // Away from Adam's ill-conditioned |g| ~ eps elements the step is much tighter.
            let g = c.out[&format!("grad.{k}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let w = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rf = c.out[&format!("step1.{k}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in 0..g.len() {
                if g[i].abs() >= 1e-7 && (w[i] - rf[i]).abs() > 2e-5 {
                    r.0.push(format!(
                        "step1.{k}[{i}]: ours {} ref {} with |grad| {}",
                        w[i], rf[i], g[i]
                    ));
                    break;
                }
            }
        }
        for (k, v) in n.target_vars() {
            r.check(
                &format!("step1.{k}"),
                v.as_tensor(),
                &c.out[&format!("step1.{k}")],
                1e-6,
                1e-5,
            );
        }
        assert_eq!(opt.step_count(), 1);
        r.finish(&c.dir);
    }
}

/// One full step under bf16 autocast (`model::precision`) against the official f32 step. On the
/// CPU the bf16 products are emulated (see `model::precision`), so CI runs the autocast logic;
/// `scripts/gpu-check.sh` runs this test on CUDA's bf16 tensor cores.
///
/// Tolerances, from what bf16 changes:
/// - loss terms: every matrix product rounds its operands and its result to bf16 (a relative
///   error of up to 2^-9 each); through the encoder, predictor and targets these add up to a few
///   tenths of a percent of each term: `rtol` 2e-2 (about 10 roundings' worth) plus a small
///   `atol` for terms near 0;
/// - parameters after the step: AdamW's first step moves each element by `lr * g / (|g| + eps)`,
///   i.e. `lr * sign(g)` wherever `|g| >> eps`. bf16 gradients keep the sign of every clearly
///   non-zero gradient and can flip it only where `|g|` is within bf16 noise of 0: so every
///   element must lie within `2 lr` of the official value (a flip moves it by `2 lr`), and at most
///   5% of the elements may have flipped (differ by more than `lr / 2`). A step that did not
///   happen, or a wrong gradient, fails the second bound (about half the elements flip);
/// - target encoder (EMA): the online parameters enter with weight `1 - momentum`, so its bound
///   is `(1 - momentum) 2 lr`.
#[test]
fn golden_model_train_step_bf16() {
    use cjepa::model::precision::{scope, Precision};
    for c in all_cases() {
        let _bf16 = scope(Precision::Bf16);
        let (n, _, l) = one_step(&c);
        let mut r = Report::default();
        let dev = Device::Cpu;
        let official = c.out["loss_total"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        eprintln!(
            "{}: bf16 loss {} vs official f32 {official} (relative {:.2e})",
            c.dir.display(),
            l.total,
            ((l.total - official) / official).abs()
        );
        // bf16 really ran: f32 matches the official loss to 1e-5 relative (the f32 test)
        assert!(
            ((l.total - official) / official).abs() > 1e-5,
            "the bf16 step gave the f32 loss {}: autocast did not apply",
            l.total
        );
        for (name, v, key) in [
            ("total", l.total, "loss_total"),
            ("jepa", l.jepa, "loss_jepa_smoothl1"),
            ("sim", l.sim, "vic_sim"),
            ("std", l.std, "vic_std"),
            ("cov", l.cov, "vic_cov"),
        ] {
            r.check(
                &format!("bf16 {name}"),
                &Tensor::new(v, &dev).unwrap(),
                &c.out[key],
                1e-4,
                2e-2,
            );
        }
        let (mut flipped, mut total) = (0usize, 0usize);
        for (k, v) in n.online_vars() {
            let reference = &c.out[&format!("step1.{k}")];
            r.check(
                &format!("bf16 step1.{k}"),
                v.as_tensor(),
                reference,
                2.0 * c.lr * (1.0 + 1e-3) + 1e-6,
                1e-5,
            );
            let w = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rf = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            total += w.len();
            flipped += w
                .iter()
                .zip(&rf)
                .filter(|(a, b)| ((**a - **b) as f64).abs() > 0.5 * c.lr)
                .count();
        }
        let share = flipped as f64 / total as f64;
        eprintln!(
            "{}: bf16 step: {flipped} of {total} parameter elements ({:.3}%) moved the other way",
            c.dir.display(),
            100.0 * share
        );
        if share > 0.05 {
            r.0.push(format!(
                "bf16 step: {flipped} of {total} elements ({:.1}%) moved the other way (at most 5%)",
                100.0 * share
            ));
        }
        for (k, v) in n.target_vars() {
            r.check(
                &format!("bf16 step1.{k}"),
                v.as_tensor(),
                &c.out[&format!("step1.{k}")],
                (1.0 - c.momentum) * 2.0 * c.lr * (1.0 + 1e-3) + 1e-6,
                1e-5,
            );
        }
        r.finish(&c.dir);
    }
}

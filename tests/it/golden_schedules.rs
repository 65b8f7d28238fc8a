//! Schedules vs `model/schedules.json` (official `WarmupCosineSchedule`, `CosineWDSchedule` and
//! the momentum generator of `train.py`): every value within 1e-12 relative (README §8).
use super::golden::roots;
use cjepa::train::schedules::{ScheduleConfig, Schedules};
use serde_json::Value;

const RTOL: f64 = 1e-12;

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("schedules.json: `{key}` missing or not a number"))
}

fn u(v: &Value, key: &str) -> u64 {
    let x = f(v, key);
    assert!(x >= 0.0 && x.fract() == 0.0, "`{key}` = {x} is not a count");
    x as u64
}

fn check_set(set: &Value, origin: &str) -> (usize, f64) {
    let name = set["name"].as_str().unwrap_or("?");
    let p = &set["params"];
    let ema = p["ema"].as_array().expect("params.ema");
    let cfg = ScheduleConfig {
        start_lr: f(p, "start_lr"),
        ref_lr: f(p, "ref_lr"),
        final_lr: f(p, "final_lr"),
        warmup_epochs: f(p, "warmup_epochs"),
        ref_wd: f(p, "ref_wd"),
        final_wd: f(p, "final_wd"),
        ema: [ema[0].as_f64().unwrap(), ema[1].as_f64().unwrap()],
        ipe_scale: f(p, "ipe_scale"),
    };
    let s = Schedules::from_config(&cfg, u(p, "ipe"), u(p, "epochs"))
        .unwrap_or_else(|e| panic!("{origin} {name}: {e}"));

    let d = &set["derived"];
    let ctx = format!("{origin} set {name}");
    assert_eq!(
        s.lr.warmup_steps,
        u(d, "warmup_steps"),
        "{ctx}: warmup_steps"
    );
    assert_eq!(s.lr.t_max_total, u(d, "lr_T_max_total"), "{ctx}: lr T");
    assert_eq!(s.lr.cosine_span(), u(d, "lr_cosine_span"), "{ctx}: lr span");
    assert_eq!(s.wd.t_max, u(d, "wd_T_max"), "{ctx}: wd T");
    assert_eq!(s.momentum.num_values, u(d, "momentum_num_values"), "{ctx}");
    assert_eq!(
        s.momentum.denominator,
        f(d, "momentum_denominator"),
        "{ctx}"
    );
    assert_eq!(s.total_iterations, u(d, "num_train_iterations"), "{ctx}");

    let mut n = 0;
    let mut worst: f64 = 0.0;
    for (key, get) in [
        ("lr", Schedules::lr_at as fn(&Schedules, u64) -> f64),
        ("wd", Schedules::wd_at),
        ("momentum", Schedules::momentum_at),
    ] {
        let arr = set[key].as_array().expect("array");
        assert_eq!(
            arr.len() as u64,
            s.total_iterations + 1,
            "{ctx}: {key} length"
        );
        for (t, want) in arr.iter().enumerate() {
            let want = want.as_f64().expect("number");
            let got = get(&s, t as u64);
            let rel = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
            assert!(
                rel <= RTOL,
                "{ctx}: {key}[{t}] = {got:e}, golden {want:e} (rel {rel:e})"
            );
            worst = worst.max(rel);
            n += 1;
        }
    }
    (n, worst)
}

#[test]
fn schedules_match_official() {
    let mut checked = 0;
    for (i, root) in roots().iter().enumerate() {
        let path = root.join("model/schedules.json");
        if !path.exists() {
            assert!(i > 0, "repo golden copy {} is missing", path.display());
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read schedules.json");
        let v: Value = serde_json::from_str(&text).expect("parse schedules.json");
        let sets = v["sets"].as_array().expect("`sets` array");
        assert!(!sets.is_empty());
        for set in sets {
            let (n, _worst) = check_set(set, &path.display().to_string());
            checked += n;
        }
    }
    assert!(checked > 0);
}

//! Our pretraining trajectory vs the official code's: `tests/golden/trajectory/quick_<method>/
//! trajectory.json` holds the per-step values of a PyTorch trainer after the official ijepa
//! `train.py` loop (`bench/torch_step.py --replay`) started from our initial weights and fed our
//! batches and masks (`bench/trajectory.sh`, `GOLDEN=1` regenerates the files). Here our side is
//! trained again through the pretrain stage's iteration and compared step by step.
//!
//! Tolerances (relative, `|a - b| / max(|a|, |b|)`): the schedule values come from the same f64
//! formulas on both sides (1e-12). Everything else is f32 arithmetic whose sums run in another
//! order on each side: the first step agrees to about 1e-7, and every update carries the
//! differences into the next step, so they grow with the steps (measured, bench/RESULTS.md: at
//! most 8e-7 over the first 10 steps and 2.4e-10 for the parameter norms; 1.2e-4 and 6.6e-7 over
//! 100 steps). The 10-step bounds (1e-5, 1e-8 for the parameter norms) keep a margin of 12-40x
//! over that drift and catch a small defect: weight decay applied to the biases and 1-D
//! parameters too moves the parameter norms by 3.6e-6 at step 1 and the loss by 2e-5 by step 10.
//! The bounds up to step 100 (1e-3, 1e-5) keep a margin of 8-15x over the measured drift. The
//! committed files hold 300 steps. Between steps 100 and 150 the two f32 runs part into
//! neighbouring trajectories of the same training (the per-step deviation of the losses reaches
//! 1e-2 and stops growing), so past step 100 the losses, the gradient norm and the target std are
//! compared as means over the last 50 steps (measured: within 0.76%, bound 2%), and the
//! parameter norms step by step (measured: within 1.2e-4, bound 1e-3).

use std::path::PathBuf;

use cjepa::stages::pretrain::trajectory::{
    record, rel_dev, Setup, StepRecord, Trajectory, QUANTITIES,
};
use cjepa::train::loss::Method;

/// The bounds after step 10, up to step 100 and beyond: losses, gradient norm and target std
/// (beyond step 100: none step by step, see [`MEAN_TOL`]); parameter norms.
const LONG_TOL: [f64; 2] = [1e-3, f64::INFINITY];
const LONG_NORM_TOL: [f64; 2] = [1e-5, 1e-3];
/// Past step 100: the means over the last 50 steps of the losses, the gradient norm and the
/// target std (measured within 0.76%, bench/RESULTS.md).
const MEAN_TOL: f64 = 2e-2;

fn golden(method: &str) -> Trajectory {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/trajectory")
        .join(format!("quick_{method}"))
        .join("trajectory.json");
    Trajectory::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The bound of quantity `q` at step `step` (1-based).
fn tolerance(q: &str, step: u64) -> f64 {
    let norm = q.starts_with("param_norm");
    match q {
        "lr" | "wd" | "momentum" => 1e-12,
        _ if step <= 10 && norm => 1e-8,
        _ if step <= 10 => 1e-5,
        _ if norm => LONG_NORM_TOL[usize::from(step > 100)],
        _ => LONG_TOL[usize::from(step > 100)],
    }
}

/// Trains `steps` steps (all the golden file holds when `None`) and compares.
fn check(method: Method, steps: Option<u64>) {
    let setup = Setup::quickstart(method);
    let want = golden(setup.method_name());
    let steps = steps.unwrap_or(want.steps.len() as u64);
    assert!(
        want.steps.len() as u64 >= steps,
        "the golden trajectory has {} steps",
        want.steps.len()
    );
    let work = tempfile::tempdir().unwrap();
    let ours = record(&setup, steps, work.path(), None, &mut |_| {}).unwrap();
    assert_eq!(ours.steps.len() as u64, steps);
    let mut failures = Vec::new();
    for (a, b) in ours.steps.iter().zip(&want.steps) {
        for ((q, x), y) in QUANTITIES.iter().zip(a.values()).zip(b.values()) {
            let d = rel_dev(x, y);
            if d > tolerance(q, a.step) {
                failures.push(format!(
                    "step {} {q}: ours {x} vs official {y} (relative {d:.2e})",
                    a.step
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}: {} values off the official trajectory:\n{}",
        setup.method_name(),
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
    if steps > 150 {
        let tail = |t: &[StepRecord], f: fn(&StepRecord) -> f64| -> f64 {
            let t = &t[steps as usize - 50..steps as usize];
            t.iter().map(f).sum::<f64>() / t.len() as f64
        };
        let means: [(&str, fn(&StepRecord) -> f64); 4] = [
            ("loss", |r| r.loss),
            ("loss_jepa", |r| r.loss_jepa),
            ("target_std", |r| r.target_std),
            ("grad_norm", |r| r.grad_norm),
        ];
        for (q, f) in means {
            let (x, y) = (tail(&ours.steps, f), tail(&want.steps, f));
            let d = rel_dev(x, y);
            assert!(
                d <= MEAN_TOL,
                "{}: mean {q} over steps {}-{steps}: ours {x} vs official {y} (relative {d:.2e})",
                setup.method_name(),
                steps - 49
            );
        }
    }
    // the run learns: the JEPA loss falls over the steps compared
    let (first, last): (&StepRecord, &StepRecord) = (&ours.steps[0], ours.steps.last().unwrap());
    assert!(last.loss_jepa < first.loss_jepa, "{first:?} -> {last:?}");
}

#[test]
fn ijepa_follows_the_official_loop_for_10_steps() {
    check(Method::Ijepa, Some(10));
}

#[test]
fn cjepa_follows_the_official_loop_for_10_steps() {
    check(Method::Cjepa, Some(10));
}

#[test]
#[ignore = "every step of the golden file: minutes (cargo test --release -- --ignored trajectory)"]
fn ijepa_follows_the_official_loop_over_the_whole_golden_run() {
    check(Method::Ijepa, None);
}

#[test]
#[ignore = "every step of the golden file: minutes (cargo test --release -- --ignored trajectory)"]
fn cjepa_follows_the_official_loop_over_the_whole_golden_run() {
    check(Method::Cjepa, None);
}

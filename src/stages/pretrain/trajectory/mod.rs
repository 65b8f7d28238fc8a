//! Training trajectories: the per-step values of a pretraining run (every loss term, the schedule
//! values, gradient and parameter norms, the target-feature spread), recorded from our loop
//! ([`record`]) or from another implementation replaying the same run ([`replay`] writes what it
//! needs), and their comparison step by step ([`deviations`]).

pub mod crops;
pub mod record;
pub mod replay;

use serde::{Deserialize, Serialize};

pub use record::{record, Setup};

/// Errors of recording or reading a trajectory.
#[derive(Debug, thiserror::Error)]
pub enum TrajectoryError {
    /// A setting or a file that does not fit.
    #[error("trajectory: {0}")]
    Invalid(String),
    /// From the data.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// From the training step.
    #[error(transparent)]
    Step(#[from] crate::train::step::StepError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From the file system.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// From JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The values of one completed step (`step` counts from 1). Losses and `target_std` are those of
/// the step's forward pass; `lr`, `wd`, `momentum` the schedule values it applied; `grad_norm` the
/// global 2-norm of the encoder and predictor gradients; the parameter norms are taken after the
/// step (the target encoder after its EMA), over the parameters (not the fixed position tables).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Completed steps.
    pub step: u64,
    /// Total loss.
    pub loss: f64,
    /// JEPA term.
    pub loss_jepa: f64,
    /// Raw VICReg invariance term.
    pub loss_sim: f64,
    /// Raw VICReg variance term.
    pub loss_std: f64,
    /// Raw VICReg covariance term.
    pub loss_cov: f64,
    /// Mean over dimensions of the batch std of the pooled, layer-normed target features.
    pub target_std: f64,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay of the decayed group.
    pub wd: f64,
    /// EMA momentum.
    pub momentum: f64,
    /// Global gradient 2-norm (encoder + predictor).
    pub grad_norm: f64,
    /// 2-norm of the context encoder's parameters.
    pub param_norm_encoder: f64,
    /// 2-norm of the predictor's parameters.
    pub param_norm_predictor: f64,
    /// 2-norm of the target encoder's parameters.
    pub param_norm_target: f64,
}

/// Names of the compared quantities, in table order.
pub const QUANTITIES: [&str; 13] = [
    "loss",
    "loss_jepa",
    "loss_sim",
    "loss_std",
    "loss_cov",
    "target_std",
    "lr",
    "wd",
    "momentum",
    "grad_norm",
    "param_norm_encoder",
    "param_norm_predictor",
    "param_norm_target",
];

impl StepRecord {
    /// The quantities in [`QUANTITIES`] order.
    pub fn values(&self) -> [f64; 13] {
        [
            self.loss,
            self.loss_jepa,
            self.loss_sim,
            self.loss_std,
            self.loss_cov,
            self.target_std,
            self.lr,
            self.wd,
            self.momentum,
            self.grad_norm,
            self.param_norm_encoder,
            self.param_norm_predictor,
            self.param_norm_target,
        ]
    }
}

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// Which implementation wrote it.
    pub source: String,
    /// `ijepa` or `cjepa`.
    pub method: String,
    /// One record per completed step, in order.
    pub steps: Vec<StepRecord>,
}

impl Trajectory {
    /// Reads a trajectory file.
    pub fn read(path: &std::path::Path) -> Result<Self, TrajectoryError> {
        let t: Trajectory = serde_json::from_slice(&fs_err::read(path)?)?;
        for (i, s) in t.steps.iter().enumerate() {
            if s.step != i as u64 + 1 {
                return Err(TrajectoryError::Invalid(format!(
                    "{}: record {i} is step {}, expected {}",
                    path.display(),
                    s.step,
                    i + 1
                )));
            }
        }
        Ok(t)
    }

    /// Writes it as JSON, one step per line.
    pub fn write(&self, path: &std::path::Path) -> Result<(), TrajectoryError> {
        let mut out = format!(
            "{{\"source\": {}, \"method\": {}, \"steps\": [\n",
            serde_json::to_string(&self.source)?,
            serde_json::to_string(&self.method)?
        );
        for (i, s) in self.steps.iter().enumerate() {
            out.push_str(&serde_json::to_string(s)?);
            out.push_str(if i + 1 < self.steps.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        out.push_str("]}\n");
        fs_err::write(path, out)?;
        Ok(())
    }
}

/// Relative deviation `|a - b| / max(|a|, |b|)` (0 when both are 0, 1 for a non-finite value).
pub fn rel_dev(a: f64, b: f64) -> f64 {
    if !(a.is_finite() && b.is_finite()) {
        return if a.to_bits() == b.to_bits() { 0.0 } else { 1.0 };
    }
    let m = a.abs().max(b.abs());
    if m == 0.0 {
        0.0
    } else {
        (a - b).abs() / m
    }
}

/// The largest relative deviation of one quantity over steps `1..=k`, for each `k` asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Deviation {
    /// One of [`QUANTITIES`].
    pub quantity: &'static str,
    /// `(k, largest deviation over steps 1..=k)`, `None` where a trajectory is shorter than `k`.
    pub upto: Vec<(u64, Option<f64>)>,
}

/// Per quantity, the largest relative deviation between `ours` and `theirs` over the first `k`
/// steps, for each `k` in `at`.
pub fn deviations(ours: &Trajectory, theirs: &Trajectory, at: &[u64]) -> Vec<Deviation> {
    let n = ours.steps.len().min(theirs.steps.len());
    QUANTITIES
        .iter()
        .enumerate()
        .map(|(q, &name)| {
            let mut worst = Vec::with_capacity(n);
            let mut w: f64 = 0.0;
            for (a, b) in ours.steps.iter().zip(&theirs.steps) {
                w = w.max(rel_dev(a.values()[q], b.values()[q]));
                worst.push(w);
            }
            Deviation {
                quantity: name,
                upto: at
                    .iter()
                    .map(|&k| {
                        let v = (k >= 1 && k as usize <= n).then(|| worst[k as usize - 1]);
                        (k, v)
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> StepRecord {
        StepRecord {
            step,
            loss,
            loss_jepa: loss,
            loss_sim: 0.0,
            loss_std: 1.0,
            loss_cov: 0.5,
            target_std: 0.3,
            lr: 1e-4,
            wd: 0.04,
            momentum: 0.996,
            grad_norm: 2.0,
            param_norm_encoder: 10.0,
            param_norm_predictor: 5.0,
            param_norm_target: 10.0,
        }
    }

    #[test]
    fn deviations_are_the_running_maximum_per_quantity() {
        let t = |l: [f64; 3]| Trajectory {
            source: "x".into(),
            method: "cjepa".into(),
            steps: (0..3).map(|i| rec(i as u64 + 1, l[i])).collect(),
        };
        let d = deviations(&t([1.0, 2.0, 4.0]), &t([1.0, 1.0, 4.0]), &[1, 2, 3, 4]);
        let loss = &d[0];
        assert_eq!(loss.quantity, "loss");
        assert_eq!(
            loss.upto,
            vec![(1, Some(0.0)), (2, Some(0.5)), (3, Some(0.5)), (4, None)]
        );
        assert!(d[2].upto.iter().all(|(_, v)| v.is_none_or(|v| v == 0.0)));
        assert_eq!(rel_dev(f64::NAN, 1.0), 1.0);
    }

    #[test]
    fn a_trajectory_file_round_trips_and_its_steps_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let t = Trajectory {
            source: "cjepa".into(),
            method: "ijepa".into(),
            steps: vec![rec(1, 0.5), rec(2, 0.25)],
        };
        let p = dir.path().join("t.json");
        t.write(&p).unwrap();
        assert_eq!(Trajectory::read(&p).unwrap(), t);
        let mut bad = t.clone();
        bad.steps[1].step = 3;
        bad.write(&p).unwrap();
        assert!(Trajectory::read(&p).is_err());
    }
}

//! Training schedules of I-JEPA / C-JEPA pretraining: warmup-cosine learning rate, cosine weight
//! decay and linear EMA momentum, as pure functions of the 0-based training iteration.
//!
//! They reproduce the official `WarmupCosineSchedule` / `CosineWDSchedule`
//! (facebookresearch/ijepa `src/utils/schedulers.py`, built by `src/helper.py::init_opt`) and the
//! momentum generator of `src/train.py`, bit for bit in float64, including their quirks:
//!
//! * The official loop calls `scheduler.step()` at the **start** of every iteration and each call
//!   first increments its counter, so iteration `t` applies the value for counter `s = t + 1`;
//!   `start_lr` itself is never applied.
//! * `W = int(warmup_epochs * ipe)`, `T = int(ipe_scale * epochs * ipe)`; the cosine of the learning
//!   rate runs over `max(1, T - W)` steps and that of the weight decay over `T` steps. Past `T` the
//!   cosine is not clamped to its end value (it swings back), and with `ipe_scale > 1` training
//!   stops before the cosine ends.
//! * The EMA momentum of iteration `t` (used after its optimiser step) is
//!   `ema0 + t * (ema1 - ema0) / (ipe * epochs * ipe_scale)`; the official generator holds
//!   `int(ipe * epochs * ipe_scale) + 1` values. Beyond that (only possible with `ipe_scale < 1`,
//!   where the official code would stop with `StopIteration`) the formula is extrapolated.
//!
//! Every value is a function of the iteration only, so resuming at step `t` is `value_at(t)`.
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use thiserror::Error;

/// Errors of the schedule configuration.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ScheduleError {
    /// A numeric field is out of its range.
    #[error("schedule config: field `{field}` = {value} is invalid: {fix}")]
    InvalidField {
        /// Config key (e.g. `schedule.ipe_scale`).
        field: &'static str,
        /// The offending value, printed.
        value: String,
        /// How to fix it.
        fix: &'static str,
    },
}

/// Hyper-parameters of the three schedules (config section `schedule`); defaults = the paper
/// (METHOD.md §4-§5): lr 1e-4 → 1e-3 over 15 warmup epochs then cosine to 1e-6, wd 0.04 → 0.4,
/// EMA 0.996 → 1.0, ipe_scale 1.0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Learning rate the warmup starts from (never applied itself).
    pub start_lr: f64,
    /// Peak learning rate reached at the end of the warmup.
    pub ref_lr: f64,
    /// Floor of the cosine decay.
    pub final_lr: f64,
    /// Warmup length in epochs (may be fractional; `W = int(warmup_epochs * ipe)`).
    pub warmup_epochs: f64,
    /// Weight decay at iteration 0 of the cosine.
    pub ref_wd: f64,
    /// Weight decay at the end of the cosine.
    pub final_wd: f64,
    /// EMA momentum start and end `[ema0, ema1]`.
    pub ema: [f64; 2],
    /// Stretch factor of the schedules' horizon relative to the real training length.
    pub ipe_scale: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            start_lr: 1e-4,
            ref_lr: 1e-3,
            final_lr: 1e-6,
            warmup_epochs: 15.0,
            ref_wd: 0.04,
            final_wd: 0.4,
            ema: [0.996, 1.0],
            ipe_scale: 1.0,
        }
    }
}

/// Linear warmup from `start_lr` to `ref_lr`, then cosine to `final_lr` (official
/// `WarmupCosineSchedule`).
#[derive(Clone, Debug, PartialEq)]
pub struct WarmupCosineLr {
    /// Warmup start value.
    pub start_lr: f64,
    /// Peak value.
    pub ref_lr: f64,
    /// Cosine floor.
    pub final_lr: f64,
    /// `W = int(warmup_epochs * ipe)`.
    pub warmup_steps: u64,
    /// `T = int(ipe_scale * epochs * ipe)` (the official `T_max` argument, before `- W`).
    pub t_max_total: u64,
}

impl WarmupCosineLr {
    /// Steps the cosine part spans: `max(1, T - W)` as the official code divides by.
    pub fn cosine_span(&self) -> u64 {
        (self.t_max_total as i64 - self.warmup_steps as i64).max(1) as u64
    }

    /// Learning rate applied by the optimiser step of 0-based iteration `iter`.
    pub fn value_at(&self, iter: u64) -> f64 {
        let s = iter as f64 + 1.0;
        let w = self.warmup_steps as f64;
        if s < w {
            let progress = s / (self.warmup_steps.max(1) as f64);
            self.start_lr + progress * (self.ref_lr - self.start_lr)
        } else {
            let span = self.t_max_total as i64 - self.warmup_steps as i64;
            let progress = (s - w) / (span.max(1) as f64);
            let v =
                self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + (PI * progress).cos());
            py_max(self.final_lr, v)
        }
    }
}

/// Cosine-shaped weight decay from `ref_wd` to `final_wd` (official `CosineWDSchedule`).
#[derive(Clone, Debug, PartialEq)]
pub struct CosineWd {
    /// Value at the start of the cosine.
    pub ref_wd: f64,
    /// Value at its end.
    pub final_wd: f64,
    /// `T = int(ipe_scale * epochs * ipe)`, at least 1.
    pub t_max: u64,
}

impl CosineWd {
    /// Weight decay applied (to the decayed parameter groups only) in 0-based iteration `iter`.
    pub fn value_at(&self, iter: u64) -> f64 {
        let s = iter as f64 + 1.0;
        let progress = s / self.t_max as f64;
        let w = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + (PI * progress).cos());
        if self.final_wd <= self.ref_wd {
            py_max(self.final_wd, w)
        } else {
            py_min(self.final_wd, w)
        }
    }
}

/// Linear EMA momentum `ema0 → ema1` (the momentum generator of the official `train.py`).
#[derive(Clone, Debug, PartialEq)]
pub struct LinearMomentum {
    /// Start value.
    pub ema0: f64,
    /// End value.
    pub ema1: f64,
    /// `ipe * epochs * ipe_scale` (float).
    pub denominator: f64,
    /// Number of values the official generator yields: `int(ipe * epochs * ipe_scale) + 1`.
    pub num_values: u64,
}

impl LinearMomentum {
    /// EMA momentum used for the target-encoder update at the end of 0-based iteration `iter`.
    pub fn value_at(&self, iter: u64) -> f64 {
        self.ema0 + iter as f64 * (self.ema1 - self.ema0) / self.denominator
    }
}

/// The three values in force for one iteration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScheduleValues {
    /// Learning rate of every parameter group.
    pub lr: f64,
    /// Weight decay of the decayed groups (the others keep 0).
    pub wd: f64,
    /// EMA momentum of the target-encoder update after the step.
    pub momentum: f64,
}

/// All schedules of one training run.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedules {
    /// Learning-rate schedule.
    pub lr: WarmupCosineLr,
    /// Weight-decay schedule.
    pub wd: CosineWd,
    /// EMA-momentum schedule.
    pub momentum: LinearMomentum,
    /// Real training length `ipe * epochs` (iterations `0..total_iterations`).
    pub total_iterations: u64,
}

impl Schedules {
    /// Builds the schedules for `iterations_per_epoch` (ipe) × `epochs`, as `init_opt` does.
    pub fn from_config(
        cfg: &ScheduleConfig,
        iterations_per_epoch: u64,
        epochs: u64,
    ) -> Result<Self, ScheduleError> {
        check_finite("schedule.start_lr", cfg.start_lr)?;
        check_finite("schedule.ref_lr", cfg.ref_lr)?;
        check_finite("schedule.final_lr", cfg.final_lr)?;
        check_finite("schedule.ref_wd", cfg.ref_wd)?;
        check_finite("schedule.final_wd", cfg.final_wd)?;
        check_finite("schedule.ema[0]", cfg.ema[0])?;
        check_finite("schedule.ema[1]", cfg.ema[1])?;
        if !(cfg.warmup_epochs.is_finite() && cfg.warmup_epochs >= 0.0) {
            return Err(invalid(
                "schedule.warmup_epochs",
                cfg.warmup_epochs,
                "use a finite number of epochs >= 0",
            ));
        }
        if !(cfg.ipe_scale.is_finite() && cfg.ipe_scale > 0.0) {
            return Err(invalid(
                "schedule.ipe_scale",
                cfg.ipe_scale,
                "use a finite factor > 0 (1.0 = schedules end with training)",
            ));
        }
        if iterations_per_epoch == 0 {
            return Err(invalid(
                "iterations_per_epoch",
                0,
                "the data set must yield at least one batch per epoch",
            ));
        }
        if epochs == 0 {
            return Err(invalid("epochs", 0, "train for at least one epoch"));
        }
        let ipe = iterations_per_epoch as f64;
        let ep = epochs as f64;
        // Python evaluation order: int(warmup*ipe), int(ipe_scale*num_epochs*ipe),
        // ipe*num_epochs*ipe_scale (the first product is an exact integer).
        let warmup_steps = (cfg.warmup_epochs * ipe).trunc() as u64;
        let t_max = (cfg.ipe_scale * ep * ipe).trunc();
        if t_max < 1.0 {
            return Err(invalid(
                "schedule.ipe_scale",
                cfg.ipe_scale,
                "int(ipe_scale * epochs * ipe) must be >= 1: raise ipe_scale",
            ));
        }
        let t_max = t_max as u64;
        let total = iterations_per_epoch.checked_mul(epochs).ok_or_else(|| {
            invalid(
                "epochs",
                epochs,
                "iterations_per_epoch * epochs overflows; use fewer",
            )
        })?;
        let denominator = total as f64 * cfg.ipe_scale;
        Ok(Self {
            lr: WarmupCosineLr {
                start_lr: cfg.start_lr,
                ref_lr: cfg.ref_lr,
                final_lr: cfg.final_lr,
                warmup_steps,
                t_max_total: t_max,
            },
            wd: CosineWd {
                ref_wd: cfg.ref_wd,
                final_wd: cfg.final_wd,
                t_max,
            },
            momentum: LinearMomentum {
                ema0: cfg.ema[0],
                ema1: cfg.ema[1],
                denominator,
                num_values: denominator.trunc() as u64 + 1,
            },
            total_iterations: total,
        })
    }

    /// Learning rate applied in iteration `iter`.
    pub fn lr_at(&self, iter: u64) -> f64 {
        self.lr.value_at(iter)
    }

    /// Weight decay applied in iteration `iter` (decayed groups only).
    pub fn wd_at(&self, iter: u64) -> f64 {
        self.wd.value_at(iter)
    }

    /// EMA momentum used at the end of iteration `iter`.
    pub fn momentum_at(&self, iter: u64) -> f64 {
        self.momentum.value_at(iter)
    }

    /// All three values of iteration `iter`.
    pub fn at(&self, iter: u64) -> ScheduleValues {
        ScheduleValues {
            lr: self.lr_at(iter),
            wd: self.wd_at(iter),
            momentum: self.momentum_at(iter),
        }
    }
}

/// Python's `max(a, b)`: returns `a` unless `b > a`.
fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `min(a, b)`: returns `a` unless `b < a`.
fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

fn invalid(field: &'static str, value: impl ToString, fix: &'static str) -> ScheduleError {
    ScheduleError::InvalidField {
        field,
        value: value.to_string(),
        fix,
    }
}

fn check_finite(field: &'static str, v: f64) -> Result<(), ScheduleError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid(field, v, "use a finite number"))
    }
}

/// mmseg poly schedule with linear warmup: `lr * (1e-6 + (1 - 1e-6) * t / W)` during warmup, then
/// `lr * (1 - (t - W) / (T - W))`.
pub fn poly_with_warmup(base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        let start = 1e-6;
        return base * (start + (1.0 - start) * step as f64 / warmup as f64);
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    base * (1.0 - (step - warmup) as f64 / span).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_schedule_with_warmup() {
        assert!((poly_with_warmup(1.0, 0, 10, 110) - 1e-6).abs() < 1e-12);
        assert!((poly_with_warmup(1.0, 5, 10, 110) - (1e-6 + (1.0 - 1e-6) * 0.5)).abs() < 1e-12);
        assert_eq!(poly_with_warmup(1.0, 10, 10, 110), 1.0);
        assert!((poly_with_warmup(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(poly_with_warmup(1.0, 110, 10, 110), 0.0);
    }

    fn paper_like() -> Schedules {
        let cfg = ScheduleConfig {
            warmup_epochs: 2.0,
            ..ScheduleConfig::default()
        };
        Schedules::from_config(&cfg, 10, 5).unwrap()
    }

    #[test]
    fn warmup_skips_start_lr_and_peaks_at_w_minus_1() {
        let s = paper_like();
        assert_eq!(s.lr.warmup_steps, 20);
        assert!((s.lr_at(0) - (1e-4 + 0.9e-3 / 20.0)).abs() < 1e-18);
        assert_eq!(s.lr_at(19), 1e-3);
        assert!(s.lr_at(20) < 1e-3);
    }

    #[test]
    fn cosine_swings_back_past_t_max() {
        let s = paper_like();
        assert!(s.lr_at(50) > 1e-6);
        assert!(s.wd_at(50) < 0.4);
        assert!((s.wd_at(49) - 0.4).abs() < 1e-15);
    }

    #[test]
    fn momentum_linear_from_ema0() {
        let s = paper_like();
        assert_eq!(s.momentum_at(0), 0.996);
        assert!((s.momentum_at(50) - 1.0).abs() < 1e-15);
        assert_eq!(s.momentum.num_values, 51);
    }

    #[test]
    fn value_at_is_pure_for_resume() {
        let s = paper_like();
        let a: Vec<ScheduleValues> = (0..50).map(|t| s.at(t)).collect();
        assert_eq!(s.at(37), a[37]);
    }

    #[test]
    fn rejects_bad_config() {
        let cfg = ScheduleConfig::default();
        assert!(Schedules::from_config(&cfg, 0, 5).is_err());
        assert!(Schedules::from_config(&cfg, 5, 0).is_err());
        let bad = ScheduleConfig {
            ipe_scale: 0.01,
            ..cfg.clone()
        };
        let e = Schedules::from_config(&bad, 2, 2).unwrap_err();
        assert!(e.to_string().contains("schedule.ipe_scale"));
        let bad = ScheduleConfig {
            warmup_epochs: f64::NAN,
            ..cfg
        };
        assert!(Schedules::from_config(&bad, 2, 2).is_err());
    }

    #[test]
    fn config_serde_defaults_and_unknown_fields() {
        let c: ScheduleConfig = serde_json::from_str(r#"{"ref_lr": 0.002}"#).unwrap();
        assert_eq!(c.ref_lr, 0.002);
        assert_eq!(c.warmup_epochs, 15.0);
        assert!(serde_json::from_str::<ScheduleConfig>(r#"{"lr": 0.002}"#).is_err());
    }
}

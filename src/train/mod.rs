//! Training: schedules, our AdamW with parameter groups and saveable state, EMA, the
//! JEPA + VICReg losses and the C-JEPA step; `run_loop`, the one loop every training kind
//! shares; `parallel`, data parallel.

pub mod cross_entropy;
pub mod ema;
mod fused_update;
pub mod iteration;
pub mod layer_decay;
pub mod loss;
pub mod optim;
pub mod parallel;
pub mod run_loop;
pub mod schedules;
pub mod step;
#[cfg(test)]
mod testutil;

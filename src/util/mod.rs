//! Small pure helpers shared across the crate.

pub mod atomic;
pub mod canon;
pub mod host_read;
pub mod malloc;
pub mod numpy;
pub mod proc;
pub mod rng;
pub mod suggest;
pub mod switch;

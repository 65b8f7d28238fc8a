//! A process-wide on/off switch whose first read comes from an environment variable (`0`, `off`
//! or `false` turn it off; anything else, or nothing, leaves it on) and that code can flip after
//! (benchmarks time both settings in one process).

use std::sync::atomic::{AtomicU8, Ordering};

/// An on-by-default switch read from `var` on first use.
#[derive(Debug)]
pub struct EnvSwitch {
    var: &'static str,
    /// 0: not read yet, 1: on, 2: off.
    state: AtomicU8,
}

impl EnvSwitch {
    /// A switch read from `var`.
    pub const fn new(var: &'static str) -> Self {
        Self {
            var,
            state: AtomicU8::new(0),
        }
    }

    /// Whether the switch is on.
    pub fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let off = matches!(
                    std::env::var(self.var).as_deref(),
                    Ok("0") | Ok("off") | Ok("false")
                );
                self.state.store(if off { 2 } else { 1 }, Ordering::Relaxed);
                !off
            }
        }
    }

    /// Sets the switch for the whole process.
    pub fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_variable_once_then_follows_set() {
        static S: EnvSwitch = EnvSwitch::new("CJEPA_TEST_SWITCH_UNSET_VARIABLE");
        assert!(S.get(), "on when the variable is unset");
        S.set(false);
        assert!(!S.get());
        S.set(true);
        assert!(S.get());
    }
}

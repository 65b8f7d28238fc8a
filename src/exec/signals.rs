//! SIGINT / SIGTERM set a flag; long-running loops check it, checkpoint and stop cleanly.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Register SIGINT and SIGTERM to set the returned flag (and USR1, used by Slurm preemption).
pub fn install() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
    ] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&flag));
    }
    flag
}

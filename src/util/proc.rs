//! Process helpers (Unix): children die with their parent, own process groups, termination.

use std::process::Command;

/// Make `cmd` die when this process dies (Linux `PR_SET_PDEATHSIG`), so a `kill -9` of the
/// driver never leaves an orphan writing into the store.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Run `cmd` in its own process group (signals to the terminal's group don't reach it twice)
/// and make it die with its parent.
pub fn own_process_group(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    die_with_parent(cmd);
}

/// SIGTERM a process group.
pub fn terminate_group(pid: u32) {
    #[cfg(unix)]
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGTERM);
    }
}

/// SIGTERM one process.
pub fn terminate(pid: u32) {
    #[cfg(unix)]
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
}

/// Whether a process exists.
pub fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    // SAFETY: signal 0 only checks.
    unsafe {
        libc::kill(pid as i32, 0) == 0
    }
    #[cfg(not(unix))]
    true
}

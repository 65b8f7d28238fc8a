//! Command output on stdout, through [`outln!`] / [`out!`] (the `println!` / `print!` of the
//! commands): they write to the locked stdout, flush, and return a `Result` for the caller's `?`.
//!
//! Rust ignores SIGPIPE, so a write to a closed stdout (`cjepa schema | head -1`) fails with
//! `BrokenPipe`, and `println!` would panic on it. Here that failure is the error
//! [`StdoutClosed`], which the command returns with `?` (its destructors run: locks are released)
//! and `main` ends quietly with exit code 0: the reader had what it wanted, as with ripgrep. Any
//! other write error is an ordinary error (exit code 2).

use std::io::Write;

/// stdout was closed by its reader; the command stops without a message.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// Write `args` to stdout and flush.
pub fn write(args: std::fmt::Arguments) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// True when the error is (or was caused by) a closed stdout.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

//! The store lock: one process at a time. The holder writes who it is into `LOCK`, so a second
//! `cjepa` can say exactly who holds the store. The OS releases the lock if the holder dies.
//!
//! Readers (`status`, `report`, `ls`, `show` on a free store) hold the lock too, for the moment
//! they read; a writer that finds a reader waits for it (up to [`READER_GRACE`]) instead of
//! failing, so starting a run while a `status` is reading is never refused.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use fs2::FileExt;

use crate::error::{Error, Result};

/// How long a writer waits for a reader to let go before it reports the store as busy.
pub const READER_GRACE: Duration = Duration::from_secs(30);

/// Marks a reader's line in `LOCK`.
const READING: &str = " [reading]";

/// The holder as named while `LOCK` is empty: a holder writes its line just after taking the lock
/// and clears it just before letting go, so a writer waits [`UNNAMED_GRACE`] before believing it.
const UNNAMED: &str = "another process";

/// How long an unnamed holder is given to write its line or to let go.
const UNNAMED_GRACE: Duration = Duration::from_secs(2);

/// Held for as long as the value lives.
pub struct StoreLock {
    file: std::fs::File,
}

impl StoreLock {
    /// Take the lock of the store at `root`. With `wait`, block until the holder releases it;
    /// otherwise fail at once naming the holder.
    /// A reader holding it briefly is waited for in any case (up to [`READER_GRACE`]).
    pub fn acquire(root: &Path, wait: bool, purpose: &str) -> Result<StoreLock> {
        let start = std::time::Instant::now();
        loop {
            match Self::try_acquire(root, purpose)? {
                Ok(lock) => return Ok(lock),
                Err(holder) if holder.ends_with(READING) && start.elapsed() < READER_GRACE => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(holder) if holder == UNNAMED && start.elapsed() < UNNAMED_GRACE => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(holder) if !wait => {
                    return Err(Error::StoreBusy(format!(
                        "the store {} is in use by {holder}; wait for it to finish, or pass --wait to queue behind it",
                        root.display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Take the lock if it is free; `Ok(Err(holder))` says who holds it.
    pub fn try_acquire(
        root: &Path,
        purpose: &str,
    ) -> Result<std::result::Result<StoreLock, String>> {
        Self::try_acquire_as(root, purpose, false)
    }

    /// [`StoreLock::try_acquire`] for a reader: writers wait for it instead of failing.
    pub fn try_acquire_reader(
        root: &Path,
        purpose: &str,
    ) -> Result<std::result::Result<StoreLock, String>> {
        Self::try_acquire_as(root, purpose, true)
    }

    fn try_acquire_as(
        root: &Path,
        purpose: &str,
        reader: bool,
    ) -> Result<std::result::Result<StoreLock, String>> {
        let path = root.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if file.try_lock_exclusive().is_err() {
            let mut holder = String::new();
            let _ = file.seek(SeekFrom::Start(0));
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Ok(Err(if holder.is_empty() {
                UNNAMED.to_string()
            } else {
                holder.to_string()
            }));
        }
        let info = format!(
            "pid {} on {} since {} ({}){}",
            std::process::id(),
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
            purpose,
            if reader { READING } else { "" }
        );
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(info.as_bytes())?;
        file.flush()?;
        Ok(Ok(StoreLock { file }))
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_fails_at_once_on_a_writer_but_waits_for_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // a writer holding it: refused at once, naming it
        let w = StoreLock::acquire(root, false, "cjepa run").unwrap();
        let t0 = std::time::Instant::now();
        let Err(Error::StoreBusy(msg)) = StoreLock::acquire(root, false, "cjepa run") else {
            panic!("a second writer got the lock")
        };
        assert!(
            msg.contains("(cjepa run)") && msg.contains("--wait"),
            "{msg}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(w);
        // a reader holding it: the writer waits until it lets go
        let r = StoreLock::try_acquire_reader(root, "cjepa status")
            .unwrap()
            .unwrap();
        let holder = StoreLock::try_acquire(root, "x").unwrap().err().unwrap();
        assert!(holder.ends_with("(cjepa status) [reading]"), "{holder}");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(r);
        });
        let t0 = std::time::Instant::now();
        let w = StoreLock::acquire(root, false, "cjepa run").unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(250));
        release.join().unwrap();
        drop(w);
    }
}

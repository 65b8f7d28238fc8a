//! The store lock: one process at a time. The holder writes who it is into `LOCK`, so a second
//! `cjepa` can say exactly who holds the store. The OS releases the lock if the holder dies.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use fs2::FileExt;

use crate::error::{Error, Result};

/// Held for as long as the value lives.
pub struct StoreLock {
    file: std::fs::File,
}

impl StoreLock {
    /// Take the lock of the store at `root`. With `wait`, block until the holder releases it;
    /// otherwise fail at once naming the holder.
    pub fn acquire(root: &Path, wait: bool, purpose: &str) -> Result<StoreLock> {
        loop {
            match Self::try_acquire(root, purpose)? {
                Ok(lock) => return Ok(lock),
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
                "another process".to_string()
            } else {
                holder.to_string()
            }));
        }
        let info = format!(
            "pid {} on {} since {} ({})",
            std::process::id(),
            hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S"),
            purpose
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

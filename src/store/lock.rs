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
    /// Take the lock of the store at `root`.
    pub fn acquire(root: &Path, wait: bool, purpose: &str) -> Result<StoreLock> {
        let path = root.join("LOCK");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut announced = false;
        loop {
            match file.try_lock_exclusive() {
                Ok(()) => break,
                Err(_) => {
                    let mut holder = String::new();
                    let _ = file.seek(SeekFrom::Start(0));
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let holder = if holder.is_empty() {
                        "another process"
                    } else {
                        holder
                    };
                    if !wait {
                        return Err(Error::StoreBusy(format!(
                            "the store {} is in use by {holder}; wait for it to finish, or pass --wait to queue behind it",
                            root.display()
                        )));
                    }
                    if !announced {
                        tracing_wait(holder);
                        announced = true;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
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
        Ok(StoreLock { file })
    }
}

fn tracing_wait(_holder: &str) {}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

//! How ranks meet: rank 0 publishes a small file (a socket address, an NCCL id) in a folder all
//! ranks see; the others wait for it. The launcher empties the folder before it starts the
//! ranks, so a file left by an earlier launch is never read.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::DistError;

/// Publish `bytes` as `dir/name`, atomically (temp + rename).
pub fn publish(dir: &Path, name: &str, bytes: &[u8], rank: usize) -> Result<(), DistError> {
    let io = |what: String| move |source| DistError::Io { rank, what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let path = dir.join(name);
    crate::util::atomic::write(&path, bytes).map_err(io(format!("write {}", path.display())))
}

/// Wait (polling) until `dir/name` exists, then read it; fails after `timeout`.
pub fn wait_for(
    dir: &Path,
    name: &str,
    timeout: Duration,
    rank: usize,
) -> Result<Vec<u8>, DistError> {
    let path: PathBuf = dir.join(name);
    let t0 = Instant::now();
    loop {
        match std::fs::read(&path) {
            Ok(b) => return Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DistError::Io {
                    rank,
                    what: format!("read {}", path.display()),
                    source,
                })
            }
        }
        if t0.elapsed() >= timeout {
            return Err(DistError::Protocol {
                rank,
                msg: format!(
                    "rank 0 did not publish {} within {} s (did it start? see its log)",
                    path.display(),
                    timeout.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_file_is_read_and_absence_times_out() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("dist");
        let e = wait_for(&dir, "addr", Duration::from_millis(50), 1).unwrap_err();
        assert!(e.to_string().contains("did not publish"), "{e}");
        let w = {
            let dir = dir.clone();
            std::thread::spawn(move || wait_for(&dir, "addr", Duration::from_secs(10), 1))
        };
        publish(&dir, "addr", b"127.0.0.1:5", 0).unwrap();
        assert_eq!(w.join().unwrap().unwrap(), b"127.0.0.1:5");
    }
}

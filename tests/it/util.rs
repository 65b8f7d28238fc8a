//! A temp folder with a pipeline file, and the real `cjepa` binary run inside it.

use std::path::{Path, PathBuf};
use std::process::Output;

/// A test's temp folder.
pub struct Ctx {
    pub dir: tempfile::TempDir,
}

/// Output of one `cjepa` invocation.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// stdout + stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl Ctx {
    pub fn new() -> Ctx {
        Ctx {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a file relative to the folder.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A `cjepa` command running in the folder.
    pub fn cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cjepa"));
        c.current_dir(self.dir.path()).env("RAYON_NUM_THREADS", "1");
        c
    }

    /// Run `cjepa ARGS` and wait.
    pub fn run(&self, args: &[&str]) -> Out {
        Out::from(self.cmd().args(args).output().expect("run cjepa"))
    }

    /// The store folder of `p.yaml`'s default store.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join(".cjepa")
    }
}

/// A shell command that waits until `flag` exists (or a minute passes): a stage with it keeps a
/// run going until the test lets it end, so checks made during the run cannot race its end.
pub fn hold_until(flag: &Path) -> String {
    format!(
        "i=0; while [ ! -f {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        flag.display()
    )
}

/// Count lines of `s` starting with `prefix`.
pub fn count(s: &str, prefix: &str) -> usize {
    s.lines().filter(|l| l.starts_with(prefix)).count()
}

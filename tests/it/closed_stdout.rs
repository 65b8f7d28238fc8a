//! A command whose stdout is closed by its reader (`cjepa schema | head -1`) ends quietly with
//! exit code 0: no panic message, no error.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::golden;

/// Run `cjepa ARGS` in `dir` with stdout a pipe whose reading end is already closed, so every
/// write to it fails with a broken pipe; returns the exit code and stderr.
fn run_with_closed_stdout(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_cjepa"))
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_ends_every_printing_command_quietly() {
    let d = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("tiny_ijepa.json")).unwrap()).unwrap();
    std::fs::write(
        d.path().join("tiny.yaml"),
        serde_yaml::to_string(&spec["model"]).unwrap(),
    )
    .unwrap();
    std::fs::write(
        d.path().join("p.yaml"),
        "name: p\nstages:\n  a: {kind: command, cmd: 'true'}\n  b: {kind: command, cmd: 'true', needs: [a]}\n",
    )
    .unwrap();
    let pth = fixtures.join("tiny_ijepa.pth.tar");
    let davis = golden::cases("metrics/davis").remove(0);
    let davis_pred = davis.join("predictions");
    let commands: Vec<Vec<&str>> = vec![
        vec!["schema"],
        vec![
            "checkpoint",
            "import",
            pth.to_str().unwrap(),
            "--model",
            "tiny.yaml",
            "--out",
            "imported",
        ],
        vec![
            "eval",
            "davis",
            "--davis",
            davis.to_str().unwrap(),
            "--pred",
            davis_pred.to_str().unwrap(),
        ],
        vec!["dag", "p.yaml"],
        vec!["run", "p.yaml", "--dry-run"],
    ];
    for args in commands {
        let (code, err) = run_with_closed_stdout(d.path(), &args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("error"), "{args:?}: {err}");
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
    // The import did its work before it printed.
    assert!(d.path().join("imported/encoder.safetensors").is_file());
}

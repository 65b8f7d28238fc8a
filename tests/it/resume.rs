//! Interrupted work is never lost: kill -9 and SIGTERM mid-stage, then the same command resumes
//! from the last checkpoint and finishes with exactly the result of an uninterrupted run.
//! Uses the test-only `counter` kind (feature `test-stages`).

use std::time::{Duration, Instant};

use crate::util::Ctx;

const PIPE: &str =
    "name: r\nstages:\n  count:\n    kind: counter\n    params: { steps: 40, sleep_ms: 50 }\n";

fn final_acc(c: &Ctx) -> f64 {
    let o = c.run(&["report", "p.yaml", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect(&o.all());
    v["rows"][0]["acc"].as_f64().expect("acc metric")
}

fn wait_for_checkpoint(c: &Ctx, min_step: u64) {
    let t0 = Instant::now();
    loop {
        let found = crate::engine::walk(&c.store().join("work"))
            .into_iter()
            .filter(|p| p.ends_with("LATEST"))
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|s| s.trim().trim_start_matches("step-").parse::<u64>().ok())
            .any(|s| s >= min_step);
        if found {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reference() -> f64 {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    final_acc(&c)
}

#[test]
fn kill_9_then_rerun_equals_uninterrupted() {
    let want = reference();
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    let mut child = c.cmd().args(["run", "p.yaml", "--plain"]).spawn().unwrap();
    wait_for_checkpoint(&c, 5);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let o = c.run(&["status", "p.yaml"]);
    assert!(o.stdout.contains("checkpoint at step"), "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stderr.contains("resuming from step"), "{}", o.all());
    assert_eq!(final_acc(&c), want);
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert!(o.stderr.contains("cached"), "{}", o.all());
}

#[test]
fn sigterm_checkpoints_and_exits_cleanly() {
    let want = reference();
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    let child = c.cmd().args(["run", "p.yaml", "--plain"]).spawn().unwrap();
    wait_for_checkpoint(&c, 3);
    // SAFETY: plain syscall on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stderr.contains("resuming from step"), "{}", o.all());
    assert_eq!(final_acc(&c), want);
}

//! Unit tests of `run_loop`.

use super::*;
use candle_core::Device;

/// Loss `step + 1` (NaN at `nan_at`), optionally one counted read inside each step.
struct Toy {
    reads: bool,
    nan_at: Option<u64>,
    saved: Vec<u64>,
    /// a step whose values must be read
    read_at: Option<u64>,
    /// (step, logged) of each `after_read`
    after: Vec<(u64, bool)>,
}

impl Recipe for Toy {
    fn step(&mut self, _: &mut StageContext, _: &mut Ranks, step: u64) -> Result<Step> {
        let v = if Some(step) == self.nan_at {
            f32::NAN
        } else {
            step as f32 + 1.0
        };
        let t = Tensor::new(v, &Device::Cpu)?;
        if self.reads {
            host_read::scalar::<f32>(&t)?;
        }
        Ok(Step {
            losses: vec![t],
            host: vec![("lr", 0.5)],
        })
    }
    fn save(&self, dir: &Path) -> Result<()> {
        fs_err::write(dir.join("toy"), b"x")?;
        Ok(())
    }
    fn load(&mut self, _: &Path, step: u64) -> Result<()> {
        self.saved.push(step);
        Ok(())
    }
    fn read_at(&self, step: u64) -> bool {
        Some(step) == self.read_at
    }
    fn after_read(
        &mut self,
        _: &mut StageContext,
        step: u64,
        logged: bool,
    ) -> Result<Vec<(&'static str, f64)>> {
        self.after.push((step, logged));
        Ok(vec![("extra", step as f64 * 10.0), ("unset", f64::NAN)])
    }
    fn legacy_state(&self, dir: &Path) -> Result<Option<LoopState>> {
        let old = dir.join("old-state");
        Ok(old.is_file().then(|| LoopState::at(1, BTreeMap::new())))
    }
}

/// [`run`] as one process on the CPU.
fn run_cpu(c: &mut StageContext, cfg: &LoopConfig, toy: &mut Toy) -> Result<Trained> {
    run(c, &mut Ranks::single(&Device::Cpu), cfg, toy)
}

fn new_toy(reads: bool, nan_at: Option<u64>) -> Toy {
    Toy {
        reads,
        nan_at,
        saved: vec![],
        read_at: None,
        after: vec![],
    }
}

fn cfg(total: u64) -> LoopConfig {
    LoopConfig {
        log_every: 5,
        points: Points::Means(4),
        nan_hint: Some("lower `lr`".into()),
        ..LoopConfig::new(total, vec!["loss"])
    }
}

fn ctx(dir: &Path) -> StageContext {
    let mut c = crate::kind::context::test_context(dir, "k", Default::default(), dir);
    c.ckpt = crate::kind::checkpoint::Checkpointer::new(c.job.work_dir.join("ckpt"), 0, 0);
    c
}

#[test]
fn the_losses_are_read_once_per_log_and_never_in_a_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    let mut toy = new_toy(false, None);
    let before = host_read::reads();
    let done = run_cpu(&mut c, &cfg(12), &mut toy).unwrap();
    // reads at steps 1, 5, 10 and 12 (the last), none inside the steps
    assert_eq!(host_read::reads() - before, 4);
    assert_eq!(done.reads_in_steps, 0);
    // means over steps 1-4, 5-8, 9-12 of the losses 1..=12
    assert_eq!(done.curve("loss"), vec![(4, 2.5), (8, 6.5), (12, 10.5)]);
    assert_eq!(done.last["loss"], 12.0);
    assert_eq!(done.last["lr"], 0.5);

    let mut toy = new_toy(true, None);
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    let done = run_cpu(&mut c, &cfg(7), &mut toy).unwrap();
    assert_eq!(done.reads_in_steps, 7, "a read inside the step is counted");
}

#[test]
fn a_nan_stops_at_the_next_read_naming_its_step() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    let mut toy = new_toy(false, Some(6)); // the 7th step
    let e = run_cpu(&mut c, &cfg(20), &mut toy).unwrap_err().to_string();
    assert!(
        e.contains("loss is non-finite (NaN) at step 7 of 20: training diverged; lower `lr`")
            && e.contains("the last good checkpoint (none yet) is kept"),
        "{e}"
    );
    assert!(c.ckpt.load().unwrap().is_none(), "nothing was checkpointed");
    // without a hint the loop trains on
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    let mut toy = new_toy(false, Some(6));
    let mut quiet = cfg(8);
    quiet.nan_hint = None;
    let done = run_cpu(&mut c, &quiet, &mut toy).unwrap();
    assert!(done.curve("loss")[1].1.is_nan());
}

#[test]
fn an_interrupt_reads_checkpoints_and_the_rerun_logs_the_same_curve() {
    let total = 12;
    let tmp = tempfile::tempdir().unwrap();
    let whole = {
        let mut c = ctx(&tmp.path().join("a"));
        let mut toy = new_toy(false, None);
        run_cpu(&mut c, &cfg(total), &mut toy).unwrap()
    };
    let mut c = ctx(&tmp.path().join("b"));
    let mut toy = new_toy(false, None);
    c.interrupted
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = run_cpu(&mut c, &cfg(total), &mut toy).unwrap_err();
    assert!(matches!(e, Error::Interrupted));
    let ck = c
        .ckpt
        .load()
        .unwrap()
        .expect("checkpointed on the interrupt");
    assert_eq!(ck.step, 1);
    assert!(ck.path.join("toy").is_file() && ck.path.join(LOOP_FILE).is_file());
    c.interrupted
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let resumed = run_cpu(&mut c, &cfg(total), &mut toy).unwrap();
    assert_eq!(
        toy.saved,
        vec![1],
        "the recipe was restored once, at step 1"
    );
    assert_eq!(resumed.resumed_from, 1);
    assert_eq!(resumed.state, whole.state);
}

#[test]
fn logged_points_are_the_logged_steps_values_with_the_recipes_own() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    let mut toy = new_toy(false, None);
    toy.read_at = Some(3);
    let mut logged = cfg(12);
    logged.points = Points::Logged;
    logged.images_per_step = Some(4);
    let before = host_read::reads();
    let done = run_cpu(&mut c, &logged, &mut toy).unwrap();
    // reads at steps 1, 3 (asked by the recipe), 5, 10 and 12
    assert_eq!(host_read::reads() - before, 5);
    assert_eq!(
        toy.after,
        vec![(1, true), (3, false), (5, true), (10, true), (12, true)]
    );
    // a point per logged step: its own value, no mean; host and recipe values too,
    // non-finite ones and the throughput left out
    assert_eq!(
        done.curve("loss"),
        vec![(1, 1.0), (5, 5.0), (10, 10.0), (12, 12.0)]
    );
    assert_eq!(done.curve("lr").len(), 4);
    assert_eq!(
        done.curve("extra"),
        vec![(1, 10.0), (5, 50.0), (10, 100.0), (12, 120.0)]
    );
    assert!(done.curve("unset").is_empty() && done.curve("images_per_sec").is_empty());
    assert_eq!(done.last["extra"], 120.0);
    assert!(!done.last.contains_key("images_per_sec"));
}

#[test]
fn a_checkpoint_of_an_older_format_resumes_through_the_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    c.ckpt
        .save(1, |dir| {
            fs_err::write(dir.join("old-state"), b"1")?;
            Ok(())
        })
        .unwrap();
    let mut toy = new_toy(false, None);
    let done = run_cpu(&mut c, &cfg(4), &mut toy).unwrap();
    assert_eq!((done.resumed_from, toy.saved.clone()), (1, vec![1]));
    // without the recipe's reader it trains from the start
    let tmp = tempfile::tempdir().unwrap();
    let mut c = ctx(tmp.path());
    c.ckpt
        .save(1, |dir| {
            fs_err::write(dir.join("unknown"), b"1")?;
            Ok(())
        })
        .unwrap();
    let done = run_cpu(&mut c, &cfg(4), &mut toy).unwrap();
    assert_eq!(done.resumed_from, 0);
}

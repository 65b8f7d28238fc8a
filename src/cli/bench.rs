//! `cjepa bench ...`: engine benchmarks (figures are printed with their budget ratio).
//!
//! - `plan`: plan + key + cache check of a generated, fully cached N-stage matrix pipeline.
//! - `report`: `cjepa report` over N stored records.
//! - `train-step`: the full C-JEPA training step (`bench_train.rs`).
//! - `trajectory`: the training trajectory vs the official code's (`bench_trajectory.rs`).
//! - `cocoeval`: the exact COCOeval on a val2017-sized synthetic problem (`bench_cocoeval.rs`).

use std::collections::BTreeMap;
use std::time::Instant;

use cjepa::store::record::Provenance;
use cjepa::store::{Record, Status, Store};

/// The subcommands of `cjepa bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// Full C-JEPA training step, fused vs unfused kernels (images/s, phases, peak RSS).
    TrainStep(super::bench_train::Args),
    /// Plan + key + cache check of a fully cached matrix pipeline.
    Plan {
        /// Number of stage instances.
        #[arg(long, default_value_t = 1000)]
        stages: usize,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// COCOeval (bbox, segm) on a val2017-sized synthetic problem: load + evaluate seconds.
    Cocoeval(super::bench_cocoeval::Args),
    /// Data loader: decode + RandomResizedCrop + normalise, images/s per core.
    Loader(super::bench_loader::Args),
    /// Training trajectory of the quickstart's pretraining, recorded or compared.
    #[command(subcommand)]
    Trajectory(super::bench_trajectory::Args),
    /// Report over many stored records.
    Report {
        /// Number of records.
        #[arg(long, default_value_t = 10_000)]
        records: usize,
        /// Repetitions (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a {
        Args::Plan { stages, reps } => plan(stages, reps),
        Args::Report { records, reps } => report(records, reps),
        Args::Loader(a) => super::bench_loader::run(a),
        Args::Cocoeval(a) => super::bench_cocoeval::run(a),
        Args::TrainStep(a) => super::bench_train::run(a),
        Args::Trajectory(a) => super::bench_trajectory::run(a),
    }
}

fn record(key: &str, stage_id: &str, i: usize) -> Record {
    let now = chrono::Utc::now();
    let metrics: BTreeMap<String, f64> = (0..8)
        .map(|m| (format!("metric_{m}"), (i * 31 + m) as f64 / 7.0))
        .collect();
    Record {
        key: key.to_string(),
        pipeline: "bench".into(),
        stage_id: stage_id.to_string(),
        kind: "command".into(),
        status: Status::Succeeded,
        config: serde_json::json!({}),
        key_input: serde_json::json!({}),
        metrics,
        series: BTreeMap::new(),
        info: serde_json::Value::Null,
        artifacts: vec![],
        artifacts_deleted: false,
        started: now,
        finished: now,
        secs: 1.0,
        error: None,
        provenance: Provenance::default(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn plan(n: usize, reps: usize) -> anyhow::Result<i32> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bench.yaml");
    let values: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    fs_err::write(
        &file,
        format!(
            "name: bench\nstages:\n  sweep:\n    kind: command\n    cmd: 'echo {{}} > out.txt'\n    params: {{ outputs: [out.txt], vars: {{ lr: 0.001, epochs: 10 }} }}\n    matrix: {{ vars.i: [{}] }}\n",
            values.join(", ")
        ),
    )?;
    let opts = cjepa::spec::LoadOptions::default();
    // populate: every instance committed with one artifact file
    {
        let p = cjepa::spec::load_pipeline(&file, &opts)?;
        let plan = cjepa::plan::build(&p, cjepa::stages::table)?;
        let store = Store::open(&p.store_dir, false, "bench")?;
        for (i, s) in plan.stages.iter().enumerate() {
            let out = store.tmp_dir(&s.key).join("out");
            fs_err::create_dir_all(&out)?;
            fs_err::write(out.join("out.txt"), format!("{i}\n"))?;
            let mut r = record(&s.key, &s.inst.id, i);
            r.key_input = s.key_input.clone();
            store.commit(r, &out)?;
        }
    }
    let mut times = Vec::new();
    let mut phases = [0.0f64; 3];
    for _ in 0..reps {
        let t0 = Instant::now();
        let p = cjepa::spec::load_pipeline(&file, &opts)?;
        let plan = cjepa::plan::build(&p, cjepa::stages::table)?;
        let t1 = Instant::now();
        let store = Store::open(&p.store_dir, false, "bench")?;
        let d = cjepa::exec::core::decide(&plan, &store, &Default::default())?;
        let t2 = Instant::now();
        anyhow::ensure!(
            d.iter().all(|d| *d == cjepa::exec::core::Decision::Cached),
            "not all cached"
        );
        anyhow::ensure!(plan.stages.len() == n);
        times.push((t2 - t0).as_secs_f64());
        phases[0] += (t1 - t0).as_secs_f64();
        phases[1] += (t2 - t1).as_secs_f64();
    }
    let med = median(times);
    outln!("bench plan: {n} cached stages, median of {reps}")?;
    outln!(
        "  load + matrix + resolve + keys: {:.3} s (mean)",
        phases[0] / reps as f64
    )?;
    outln!(
        "  open store + cache check:       {:.3} s (mean)",
        phases[1] / reps as f64
    )?;
    outln!("  total: {med:.3} s = {:.2}x of the 1 s budget", med / 1.0)?;
    Ok(0)
}

fn report(n: usize, reps: usize) -> anyhow::Result<i32> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("store");
    {
        let store = Store::open(&root, false, "bench")?;
        for i in 0..n {
            let key = blake3::hash(format!("rec{i}").as_bytes())
                .to_hex()
                .to_string();
            store.put(&record(&key, &format!("stage[i={i}]"), i))?;
        }
        store.flush()?;
    }
    let mut times = Vec::new();
    let mut len = 0;
    for _ in 0..reps {
        let t0 = Instant::now();
        let store = Store::open(&root, false, "bench")?;
        let recs = store.records()?;
        let t = cjepa::report::metrics_table("bench", &recs);
        len = t.render(cjepa::report::Format::Md).len();
        times.push(t0.elapsed().as_secs_f64());
    }
    let med = median(times);
    outln!("bench report: {n} records -> markdown table ({len} bytes), median of {reps}")?;
    outln!("  total: {med:.3} s = {:.2}x of the 1 s budget", med / 1.0)?;
    Ok(0)
}

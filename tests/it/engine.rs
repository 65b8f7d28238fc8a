//! The pipeline engine driven through the real binary: caching, reruns, matrix, resume, locking.

use crate::util::{count, hold_until, Ctx};

const PIPE: &str = r#"
name: t
stages:
  a:
    kind: command
    cmd: 'echo "{\"v\": 1}" > metrics.json; echo a > out.txt'
    params: { outputs: [out.txt] }
  b:
    kind: command
    needs: [a]
    cmd: 'cat "$CJEPA_UPSTREAM_A/out.txt" > got.txt; echo "{\"n\": $(cat got.txt | wc -l)}" > metrics.json'
    params: { outputs: [got.txt], vars: { lr: 0.1 } }
    matrix: { vars.seed: [1, 2] }
  c:
    kind: command
    needs: [b]
    cmd: 'test -f "$CJEPA_UPSTREAM_B/got.txt"'
"#;

#[test]
fn second_run_is_all_cached() {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert_eq!(count(&o.stderr, "done"), 5, "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert_eq!(count(&o.stderr, "cached"), 5, "{}", o.all());
    assert_eq!(count(&o.stderr, "start"), 0, "{}", o.all());
    // the invocation log and records are visible
    let o = c.run(&["ls"]);
    assert_eq!(count(&o.stdout, ""), 5, "{}", o.all());
    let o = c.run(&["report", "p.yaml", "--format", "csv"]);
    assert!(o.stdout.starts_with("stage,kind,key"), "{}", o.all());
}

#[test]
fn editing_params_reruns_only_that_stage_and_dependents() {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    assert_eq!(c.run(&["run", "p.yaml"]).code, 0);
    let edited = PIPE.replace("vars: { lr: 0.1 }", "vars: { lr: 0.2 }");
    c.write("p.yaml", &edited);
    let o = c.run(&["status", "p.yaml", "--explain"]);
    assert!(
        o.stdout.contains("params.vars.lr 0.1 -> 0.2"),
        "{}",
        o.all()
    );
    assert!(o.stdout.contains("upstream b changed"), "{}", o.all());
    assert!(o.stdout.starts_with("fresh    a "), "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    let started: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("start"))
        .collect();
    assert_eq!(started.len(), 4, "{}", o.all());
    assert!(started.iter().all(|l| !l.contains(" a ")), "{}", o.all());
    // a number written differently (1e-1 vs 0.1) and a non-semantic field change nothing
    c.write("p.yaml", &edited.replace("lr: 0.2", "lr: 2e-1"));
    let o = c.run(&["run", "p.yaml", "--plain", "--dry-run"]);
    assert!(o.stdout.contains("0 of 5 stages would run"), "{}", o.all());
}

#[test]
fn new_matrix_value_runs_only_new_instances() {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    assert_eq!(c.run(&["run", "p.yaml"]).code, 0);
    c.write(
        "p.yaml",
        &PIPE.replace("vars.seed: [1, 2]", "vars.seed: [1, 2, 3]"),
    );
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    let started: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("start"))
        .collect();
    assert_eq!(started.len(), 2, "{}", o.all());
    assert!(started.iter().all(|l| l.contains("seed=3")), "{}", o.all());
}

#[test]
fn only_and_force_select_stages() {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    let o = c.run(&["run", "p.yaml", "--plain", "--only", "b[vars.seed=1]"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert_eq!(count(&o.stderr, "done"), 2, "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--plain", "--force", "b"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert_eq!(count(&o.stderr, "cached"), 1, "a stays cached: {}", o.all());
    assert_eq!(count(&o.stderr, "done"), 4, "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--only", "bb"]);
    assert_eq!(o.code, 2, "{}", o.all());
    assert!(o.stderr.contains("did you mean `b`"), "{}", o.all());
}

#[test]
fn failure_skips_dependents_by_name_and_exits_1() {
    let c = Ctx::new();
    c.write(
        "p.yaml",
        "stages:\n  bad: {kind: command, cmd: 'exit 3'}\n  after: {kind: command, cmd: 'true', needs: [bad]}\n  other: {kind: command, cmd: 'true'}\n",
    );
    let o = c.run(&["run", "p.yaml", "--plain", "--keep-going"]);
    assert_eq!(o.code, 1, "{}", o.all());
    assert!(
        o.stderr.contains("skipped  after: upstream bad failed"),
        "{}",
        o.all()
    );
    assert!(o.stderr.contains("done     other"), "{}", o.all());
    let o = c.run(&["status", "p.yaml"]);
    assert!(o.stdout.contains("failed   bad"), "{}", o.all());
}

#[test]
fn retries_rerun_a_flaky_stage() {
    let c = Ctx::new();
    // fails on the first attempt, succeeds on the second (state kept in the work folder)
    c.write(
        "p.yaml",
        "stages:\n  flaky:\n    kind: command\n    retries: 2\n    cmd: 'if [ -f tried ]; then true; else touch tried; exit 1; fi'\n",
    );
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stderr.contains("(retrying)"), "{}", o.all());
}

#[test]
fn concurrent_run_is_refused_naming_the_holder() {
    let c = Ctx::new();
    let release = c.path().join("release");
    c.write(
        "p.yaml",
        &format!(
            "stages:\n  slow: {{kind: command, cmd: '{}'}}\n",
            hold_until(&release)
        ),
    );
    let mut first = c.cmd().args(["run", "p.yaml"]).spawn().unwrap();
    let lock = c.store().join("LOCK");
    for _ in 0..100 {
        if std::fs::read_to_string(&lock).is_ok_and(|s| s.contains("pid")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = c.run(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{}", o.all());
    assert!(o.stderr.contains("in use by pid"), "{}", o.all());
    assert!(o.stderr.contains("--wait"), "{}", o.all());
    // --wait queues behind the holder and then finds the stage cached
    let waiting = c
        .cmd()
        .args(["run", "p.yaml", "--wait", "--plain"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(&release, "").unwrap();
    assert!(first.wait().unwrap().success());
    let o = waiting.wait_with_output().unwrap();
    let (code, err) = (o.status.code(), String::from_utf8_lossy(&o.stderr));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("cached"), "{err}");
}

#[test]
fn status_report_and_ls_read_the_store_during_a_run() {
    let c = Ctx::new();
    // `slow` holds the run open until the test creates `release` (or a minute passes), so the
    // checks below never race the run's end however loaded the machine is
    let release = c.path().join("release");
    c.write(
        "p.yaml",
        &format!(
            "stages:\n  fast: {{kind: command, cmd: 'echo \"{{\\\"v\\\": 7}}\" > metrics.json'}}\n  slow: {{kind: command, needs: [fast], cmd: '{hold}'}}\n",
            hold = hold_until(&release)
        ),
    );
    let mut first = c.cmd().args(["run", "p.yaml"]).spawn().unwrap();
    // wait until the run holds the store and `fast` is done
    let mut seen = None;
    let mut last = String::new();
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(50) {
        let o = c.run(&["status", "p.yaml"]);
        if o.stderr.contains("in use by pid") && o.stdout.contains("fresh") {
            seen = Some(o);
            break;
        }
        last = o.all();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let Some(o) = seen else {
        panic!("status never showed the running store with `fast` done; last status:\n{last}")
    };
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("fresh") && l.contains("fast")),
        "{}",
        o.all()
    );
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("missing") && l.contains("slow")),
        "{}",
        o.all()
    );
    let o = c.run(&["ls", "--store", c.store().to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stdout.contains("t/fast") || o.stdout.contains("/fast"),
        "{}",
        o.all()
    );
    let o = c.run(&["report", "p.yaml", "--format", "json"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("\"v\""), "{}", o.all());
    std::fs::write(&release, "").unwrap();
    assert!(first.wait().unwrap().success());
    // afterwards: the database itself, no note
    let o = c.run(&["status", "p.yaml"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(!o.stderr.contains("in use"), "{}", o.all());
    assert_eq!(
        o.stdout.lines().filter(|l| l.starts_with("fresh")).count(),
        2,
        "{}",
        o.all()
    );
}

#[test]
fn corrupt_record_and_deleted_artifact_rerun() {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    assert_eq!(c.run(&["run", "p.yaml"]).code, 0);
    // delete an artifact of `a`
    let arts = c.store().join("artifacts");
    let out_a = walk(&arts)
        .into_iter()
        .find(|p| p.ends_with("out.txt"))
        .unwrap();
    std::fs::remove_file(&out_a).unwrap();
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stderr.contains("warning: a: artifact out.txt is missing"),
        "{}",
        o.all()
    );
    assert_eq!(
        count(&o.stderr, "done"),
        1,
        "only a reruns (same key): {}",
        o.all()
    );
    // corrupt every record
    {
        let db = sled::open(c.store().join("db")).unwrap();
        let t = db.open_tree("records").unwrap();
        let keys: Vec<_> = t.iter().keys().map(|k| k.unwrap()).collect();
        for k in keys {
            t.insert(k, b"{not json".to_vec()).unwrap();
        }
        db.flush().unwrap();
    }
    let o = c.run(&["run", "p.yaml", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stderr.contains("corrupt record dropped"), "{}", o.all());
    assert_eq!(count(&o.stderr, "done"), 5, "{}", o.all());
}

#[test]
fn dag_schema_gc_show() {
    let c = Ctx::new();
    c.write("p.yaml", PIPE);
    let o = c.run(&["dag", "p.yaml", "--format", "dot"]);
    assert!(o.stdout.starts_with("digraph"), "{}", o.all());
    assert_eq!(o.stdout.matches("->").count(), 4, "{}", o.all());
    let o = c.run(&["dag", "p.yaml"]);
    assert!(o.stdout.starts_with("flowchart LR"), "{}", o.all());
    let o = c.run(&["schema"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert!(
        v["definitions"]["StageSpec"]["properties"]["kind"]["enum"]
            .as_array()
            .unwrap()
            .len()
            >= 2
    );
    assert_eq!(c.run(&["run", "p.yaml"]).code, 0);
    // gc with a pipeline that only has `a`: b and c lose artifacts, keep metrics
    c.write("only_a.yaml", "name: t\nstages:\n  a:\n    kind: command\n    cmd: 'echo \"{\\\"v\\\": 1}\" > metrics.json; echo a > out.txt'\n    params: { outputs: [out.txt] }\n");
    let o = c.run(&["gc", "only_a.yaml"]);
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("4 artifact folders"), "{}", o.all());
    let o = c.run(&["report", "p.yaml", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        v["rows"].as_array().unwrap().len(),
        5,
        "metrics survive gc: {}",
        o.all()
    );
    let o = c.run(&["run", "p.yaml", "--plain", "--dry-run"]);
    assert!(o.stdout.contains("4 of 5 stages would run"), "{}", o.all());
    let key = o
        .stdout
        .lines()
        .find(|l| l.starts_with("cached"))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let o = c.run(&["show", &key]);
    assert!(o.stdout.contains("\"stage_id\": \"a\""), "{}", o.all());
}

pub fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn quickstart_and_examples_plan() {
    let c = Ctx::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, n) in [
        ("pipelines/quickstart.yaml", 31),
        ("pipelines/quickstart_long.yaml", 8),
        ("pipelines/examples/pretrain_tiny.yaml", 3),
        ("pipelines/examples/synth_pretrain_long.yaml", 12),
        ("pipelines/examples/clevr_pretrain.yaml", 8),
        ("pipelines/examples/real_small.yaml", 25),
    ] {
        let store = c.path().join(file.replace('/', "_"));
        let o = c.run(&[
            "run",
            root.join(file).to_str().unwrap(),
            "--dry-run",
            "--store",
            store.to_str().unwrap(),
        ]);
        assert_eq!(o.code, 0, "{file}: {}", o.all());
        assert!(
            o.stdout.contains(&format!("{n} of {n} stages would run")),
            "{file}: {}",
            o.all()
        );
    }
}

/// `matrix: { seed: [...] }` sets the seed of each instance (not a param) and of the probes that
/// fan out from it; seeds of one configuration share their seed-free identity, so the report
/// collapses them into one `mean ± std (n)` entry.
#[test]
fn seed_matrix_sets_each_instances_seed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = cjepa::spec::load_pipeline(
        &root.join("pipelines/examples/real_small.yaml"),
        &Default::default(),
    )
    .unwrap();
    let plan = cjepa::plan::build(&p, cjepa::stages::table).unwrap();
    let get = |id: &str| &plan.stages[plan.index_of(id).unwrap()];
    for (id, seed) in [
        ("pretrain[method=cjepa,seed=1]", 1),
        ("linear[method=cjepa,seed=2]", 2),
        ("knn_random[seed=1]", 1),
        ("fmnist", 0),
    ] {
        let s = get(id);
        assert_eq!(s.config["seed"], seed, "{id}");
        assert!(s.config["params"].get("seed").is_none(), "{id}");
    }
    fn identity(plan: &cjepa::plan::Plan, key: &str) -> Option<String> {
        let s = plan.stages.iter().find(|s| s.key == key)?;
        Some(cjepa::report::runs::identity_of(&s.key_input, &|k| {
            identity(plan, k)
        }))
    }
    let ids: Vec<_> = ["linear[method=cjepa,seed=0]", "linear[method=cjepa,seed=1]"]
        .iter()
        .map(|id| identity(&plan, &get(id).key).unwrap())
        .collect();
    assert_eq!(ids[0], ids[1]);
    assert_ne!(
        get("linear[method=cjepa,seed=0]").key,
        get("linear[method=cjepa,seed=1]").key
    );
}

/// The README's main job shows the whole product: every stage kind except the outside-program
/// and test-only ones, both pretraining methods, and a random-init baseline for each evaluation.
#[test]
fn quickstart_has_every_stage_kind_both_methods_and_baselines() {
    use cjepa::stages::StageKind;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p =
        cjepa::spec::load_pipeline(&root.join("pipelines/quickstart.yaml"), &Default::default())
            .unwrap();
    let plan = cjepa::plan::build(&p, cjepa::stages::table).unwrap();
    let kinds: std::collections::BTreeSet<&str> =
        plan.stages.iter().map(|s| s.kind.name()).collect();
    for k in StageKind::all() {
        if matches!(k.name(), "command" | "counter") {
            continue;
        }
        assert!(
            kinds.contains(k.name()),
            "quickstart lacks a `{}` stage",
            k.name()
        );
    }
    let ids: Vec<&str> = plan.stages.iter().map(|s| s.inst.id.as_str()).collect();
    assert!(ids.contains(&"pretrain[method=ijepa]") && ids.contains(&"pretrain[method=cjepa]"));
    for s in &plan.stages {
        let kind = s.kind.name();
        if matches!(kind, "dataset" | "pretrain" | "finetune") {
            continue;
        }
        // an evaluation fed by pretraining has a twin on a random encoder
        let random = plan
            .stages
            .iter()
            .any(|r| r.kind == s.kind && r.config["params"]["checkpoint"] == "random");
        assert!(random, "no random-init baseline for `{kind}`");
    }
}

/// `quickstart_long.yaml` builds on the quickstart's pretraining: its `images` and `pretrain`
/// stages plan to the same keys, so one store runs them once for both files.
#[test]
fn quickstart_long_shares_the_quickstarts_pretraining() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let keys = |file: &str| -> std::collections::BTreeMap<String, String> {
        let p = cjepa::spec::load_pipeline(&root.join(file), &Default::default()).unwrap();
        let plan = cjepa::plan::build(&p, cjepa::stages::table).unwrap();
        plan.stages
            .iter()
            .map(|s| (s.inst.id.clone(), s.key.clone()))
            .collect()
    };
    let (quick, long) = (
        keys("pipelines/quickstart.yaml"),
        keys("pipelines/quickstart_long.yaml"),
    );
    for id in [
        "images",
        "ade20k",
        "pretrain[method=ijepa]",
        "pretrain[method=cjepa]",
    ] {
        assert_eq!(quick.get(id), long.get(id), "{id}");
        assert!(quick.contains_key(id), "{id}");
    }
    // and it evaluates both methods and the random encoder
    for id in [
        "detect[method=ijepa]",
        "detect[method=cjepa]",
        "detect_random",
    ] {
        assert!(long.contains_key(id), "{id}");
    }
}

/// `precision: bf16` (in `defaults:` or on a stage) is part of the stage key; `f32`, written or
/// not, leaves every key as it was before precision existed.
#[test]
fn bf16_precision_enters_the_key_and_f32_leaves_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = |defaults: &str, stage: &str| -> String {
        let yaml = format!(
            "name: p\ndefaults: {{ seed: 0{defaults} }}\nstages:\n  data:\n    kind: dataset\n    \
             source: synth\n    format: imagefolder\n    params: {{ classes: 2, train_per_class: 4, \
             val_per_class: 2, size: 32 }}\n  pre:\n    kind: pretrain\n    needs: [data]\n{stage}    \
             model: {{ preset: vit_tiny, depth: 1, img_size: 32, patch_size: 8 }}\n    params: {{ epochs: 1, batch_size: 4, mask: {{ min_keep: 0 }} }}\n"
        );
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, yaml).unwrap();
        let p = cjepa::spec::load_pipeline(&f, &Default::default()).unwrap();
        let plan = cjepa::plan::build(&p, cjepa::stages::table).unwrap();
        let s = plan.stages.iter().find(|s| s.inst.id == "pre").unwrap();
        s.key.clone()
    };
    let plain = key("", "");
    assert_eq!(key(", precision: f32", ""), plain);
    assert_eq!(key("", "    precision: f32\n"), plain);
    let bf16 = key(", precision: bf16", "");
    assert_ne!(bf16, plain);
    assert_eq!(key("", "    precision: bf16\n"), bf16);
    assert_eq!(
        key(", precision: bf16", "    precision: f32\n"),
        plain,
        "the stage's own wins"
    );
}

/// `batch` / `img` / `patch` are the old spellings of `batch_size` / `img_size` / `patch_size`:
/// still read, with a warning naming the new one, and hashed as before (same key).
#[test]
fn old_param_spellings_warn_and_keep_the_key() {
    let yaml = |params: &str| {
        format!(
            "stages:\n  d: {{kind: dataset, source: synth, format: imagefolder}}\n  \
             p:\n    kind: pretrain\n    needs: [d]\n    model: {{ preset: vit_tiny, depth: 1 }}\n    \
             params: {{ epochs: 1, mask: {{ min_keep: 0 }}, {params} }}\n  \
             k:\n    kind: knn\n    needs: [d, p]\n    params: {{ {knn} }}\n",
            knn = if params.contains("batch_size") { "img_size: 32" } else { "img: 32" }
        )
    };
    let plan = |text: String| {
        let p = cjepa::spec::load::parse_pipeline(
            std::path::Path::new("p.yaml"),
            text,
            &Default::default(),
        )
        .unwrap();
        cjepa::plan::build(&p, cjepa::stages::table).unwrap()
    };
    let old = plan(yaml("batch: 8, img: 32, patch: 8"));
    let new = plan(yaml("batch_size: 8, img_size: 32, patch_size: 8"));
    assert!(new.warnings.is_empty(), "{:?}", new.warnings);
    assert_eq!(old.warnings.len(), 4, "{:?}", old.warnings);
    assert!(old.warnings[0].contains("p.yaml:7"), "{}", old.warnings[0]);
    assert!(old.warnings[0].contains("`params.batch` is deprecated; write `batch_size`"));
    for (a, b) in old.stages.iter().zip(&new.stages) {
        assert_eq!(a.key, b.key, "{}", a.inst.id);
        assert_eq!(a.config, b.config, "{}", a.inst.id);
    }
    // the key hashes the old name, as before the rename: cached results stay valid
    let p = new.stages.iter().find(|s| s.inst.id == "p").unwrap();
    assert_eq!(p.key_input["params"]["batch"], 8, "{}", p.key_input);
    assert!(p.key_input["params"].get("batch_size").is_none());
    // both spellings at once is an error naming the param to keep
    let text = yaml("batch: 8, batch_size: 8");
    let p = cjepa::spec::load::parse_pipeline(
        std::path::Path::new("p.yaml"),
        text,
        &Default::default(),
    )
    .unwrap();
    let e = cjepa::plan::build(&p, cjepa::stages::table)
        .unwrap_err()
        .to_string();
    assert!(e.contains("keep `batch_size`"), "{e}");
}

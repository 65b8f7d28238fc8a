//! Every bad-input case exits 2 with a message naming the file, the position and the fix.

use crate::util::Ctx;

fn bad(yaml: &str, expect: &[&str]) -> Ctx {
    let c = Ctx::new();
    c.write("p.yaml", yaml);
    for args in [
        &["run", "p.yaml"][..],
        &["status", "p.yaml"][..],
        &["dag", "p.yaml"][..],
    ] {
        let o = c.run(args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.all());
        assert!(!o.stderr.contains("panicked"), "{}", o.all());
        for e in expect {
            assert!(
                o.stderr.contains(e),
                "{args:?}: expected `{e}` in: {}",
                o.stderr
            );
        }
    }
    assert!(
        !c.store().join("db").exists(),
        "no store is created for a bad file"
    );
    c
}

/// [`bad`], for errors found when planning: not even the store folder is made.
fn bad_plan(yaml: &str, expect: &[&str]) {
    let c = bad(yaml, expect);
    assert!(!c.store().exists(), "no store folder for a bad plan");
}

#[test]
fn yaml_syntax_error_names_line_and_column() {
    bad(
        "stages:\n  a: {kind: command, cmd: 'x'\n  b: [\n",
        &["p.yaml:", "error"],
    );
    let c = Ctx::new();
    c.write("p.yaml", "stages:\n  a:\n    kind: command\n   cmd: x\n");
    let o = c.run(&["run", "p.yaml"]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("p.yaml:4:"), "{}", o.stderr);
}

#[test]
fn unknown_key_suggests_the_nearest() {
    bad(
        "stages:\n  a:\n    kind: command\n    cmd: 'true'\n    parms: {}\n",
        &["p.yaml:5:5", "unknown key `parms`", "did you mean `params`"],
    );
    bad(
        "stages:\n  a:\n    kind: command\n    cmd: 'true'\n    params: { ouputs: [x] }\n",
        &[
            "p.yaml:5",
            "unknown key `ouputs`",
            "did you mean `outputs`",
            "stage `a`",
        ],
    );
    bad(
        "name: x\nstagez: {}\n",
        &[
            "p.yaml:2:1",
            "unknown key `stagez`",
            "did you mean `stages`",
        ],
    );
}

#[test]
fn unknown_kind_missing_need_cycle_type_error_empty() {
    bad(
        "stages:\n  a: {kind: comand, cmd: x}\n",
        &[
            "p.yaml:2",
            "unknown kind `comand`",
            "did you mean `command`",
        ],
    );
    bad(
        "stages:\n  a: {kind: command, cmd: x, needs: [dta]}\n  data: {kind: command, cmd: x}\n",
        &["needs `dta`", "did you mean `data`"],
    );
    bad(
        "stages:\n  a: {kind: command, cmd: x, needs: [c]}\n  b: {kind: command, cmd: x, needs: [a]}\n  c: {kind: command, cmd: x, needs: [b]}\n",
        &["cycle", "a -> c -> b -> a"],
    );
    bad(
        "stages:\n  a: {kind: command, cmd: x, retries: many}\n",
        &["p.yaml:2", "retries"],
    );
    bad(
        "stages:\n  a: {kind: command, cmd: x, params: {inputs: 3}}\n",
        &["stage `a`", "invalid type"],
    );
    bad("", &["empty"]);
    bad("name: x\nstages: {}\n", &["no stages"]);
    bad("stages:\n  a: {kind: command}\n", &["`cmd` is required"]);
    bad(
        "stages:\n  d: {kind: dataset, format: imagefolde, path: x}\n",
        &["did you mean `imagefolder`"],
    );
}

#[test]
fn bad_overrides_and_missing_file() {
    let c = Ctx::new();
    c.write("p.yaml", "stages:\n  a: {kind: command, cmd: 'true'}\n");
    let o = c.run(&["run", "p.yaml", "--set", "aa.params.cmd=x"]);
    assert_eq!(o.code, 2, "{}", o.all());
    assert!(o.stderr.contains("did you mean `a`"), "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--set", "novalue"]);
    assert_eq!(o.code, 2, "{}", o.all());
    assert!(o.stderr.contains("PATH=VALUE"), "{}", o.all());
    let o = c.run(&["run", "nope.yaml"]);
    assert_eq!(o.code, 2, "{}", o.all());
    assert!(o.stderr.contains("nope.yaml"), "{}", o.all());
    let o = c.run(&["run", "p.yaml", "--set", "a.params.cmd=echo hi", "--plain"]);
    assert_eq!(o.code, 0, "{}", o.all());
}

#[test]
fn duplicate_stage_id_names_both_lines() {
    bad_plan(
        "stages:\n  a:\n    kind: command\n    cmd: 'true'\n  b: {kind: command, cmd: 'true'}\n  a:\n    kind: command\n    cmd: 'false'\n",
        &[
            "p.yaml:6:3",
            "duplicate stage id `a`",
            "lines 2 and 6",
            "rename or remove one",
        ],
    );
    bad_plan(
        "stages:\n  x: {kind: command, cmd: 'true'}\n  x: {kind: command, cmd: 'true'}\n",
        &["p.yaml:3", "duplicate stage id `x`", "lines 2 and 3"],
    );
}

#[test]
fn model_shape_that_cannot_work_fails_when_planning() {
    bad_plan(
        "stages:\n  k:\n    kind: knn\n    checkpoint: random\n    model:\n      preset: vit_tiny\n      img_size: 100\n",
        &[
            "p.yaml:7",
            "stage `k`",
            "model field `img_size`",
            "img_size 100 must be a positive multiple of patch_size 16",
            "(e.g. 96)",
        ],
    );
    bad_plan(
        "stages:\n  k:\n    kind: knn\n    checkpoint: random\n    model: {preset: vit_tiny, pred_num_heads: 5}\n",
        &[
            "p.yaml:5",
            "stage `k`",
            "model field `pred_embed_dim`",
            "divisible by its head count 5",
            "or change `pred_num_heads`",
        ],
    );
    bad_plan(
        "stages:\n  d: {kind: dataset, source: synth, format: imagefolder}\n  k:\n    kind: knn\n    needs: [d]\n    checkpoint: random\n    model: vit_tiny\n    matrix: {model.num_heads: [3, 5]}\n",
        &["stage `k", "model field `embed_dim`", "change `num_heads`"],
    );
}

#[test]
fn davis_sizes_are_checked_when_planning() {
    bad_plan(
        "stages:\n  v:\n    kind: davis_vos\n    checkpoint: random\n    model: vit_tiny\n    params:\n      size: 0\n",
        &[
            "p.yaml:7",
            "stage `v`",
            "`size` (0)",
            "positive multiples of the patch size 16",
            "set `params.size`",
        ],
    );
    bad_plan(
        "stages:\n  v:\n    kind: davis_vos\n    checkpoint: random\n    model: vit_tiny\n    params: {size: 64, multiple: 10}\n",
        &["p.yaml:6", "stage `v`", "`multiple` (10)", "set `params.multiple`"],
    );
    bad_plan(
        "stages:\n  v:\n    kind: davis_vos\n    checkpoint: random\n    params: {temperature: 0}\n",
        &["p.yaml:5", "stage `v`", "`temperature`", "DINO uses 0.1"],
    );
}

#[test]
fn missing_checkpoint_path_fails_when_planning() {
    bad_plan(
        "stages:\n  k:\n    kind: knn\n    checkpoint: weights/enc.safetensors\n    model: vit_tiny\n",
        &[
            "p.yaml:4",
            "stage `k`",
            "`checkpoint`",
            "weights/enc.safetensors does not exist",
            "relative paths are read from the pipeline file's folder",
            "cjepa checkpoint import",
        ],
    );
    bad_plan(
        "stages:\n  f:\n    kind: finetune\n    model: vit_tiny\n    params: {checkpoint: nope}\n",
        &[
            "p.yaml:5",
            "stage `f`",
            "nope does not exist",
            "checkpoint: random",
        ],
    );
    // an existing folder, or a path an upstream command may write, still plans
    let c = Ctx::new();
    c.write("enc/encoder.safetensors", "");
    c.write(
        "p.yaml",
        "stages:\n  d: {kind: dataset, source: synth, format: imagefolder}\n  get: {kind: command, cmd: 'true'}\n  \
         k: {kind: knn, needs: [d], checkpoint: enc, model: vit_tiny}\n  \
         l: {kind: knn, needs: [d, get], checkpoint: later/enc, model: vit_tiny}\n",
    );
    let o = c.run(&["dag", "p.yaml"]);
    assert_eq!(o.code, 0, "{}", o.all());
}

/// The nine malformed files that used to start running and fail only when their stage started
/// (exit 1): each now exits 2 when the plan is built, naming the file, the line, the field and
/// the fix, with nothing started and no store written (`run`, `status` and `dag` alike). The
/// dataset folder is checked before the run starts on this machine (`run`; `dag` and `status`
/// do not need the data).
#[test]
fn nine_late_failures_now_fail_when_planning() {
    let data = "  d: {kind: dataset, source: synth, format: imagefolder}\n";
    let cases: [(&str, String, &[&str]); 8] = [
        (
            "classes: \"many\"",
            "stages:\n  d:\n    kind: dataset\n    source: synth\n    format: imagefolder\n    params: {classes: \"many\"}\n".into(),
            &["p.yaml:6", "stage `d`", "`classes`", "give a value like the default"],
        ),
        (
            "img_size not a multiple of patch_size",
            format!("stages:\n{data}  p:\n    kind: pretrain\n    needs: [d]\n    model: {{preset: vit_tiny, img_size: 100}}\n"),
            &["p.yaml:6", "stage `p`", "`img_size`", "multiple of patch_size 16"],
        ),
        (
            "pred_embed_dim not divisible by the heads",
            format!("stages:\n{data}  p:\n    kind: pretrain\n    needs: [d]\n    model: {{preset: vit_tiny, pred_num_heads: 5}}\n"),
            &["p.yaml:6", "stage `p`", "`pred_embed_dim`", "`pred_num_heads`"],
        ),
        (
            "a checkpoint file that does not exist",
            format!("stages:\n{data}  k:\n    kind: linear_probe\n    needs: [d]\n    checkpoint: no/such/encoder.safetensors\n    model: vit_tiny\n"),
            &["p.yaml:6", "stage `k`", "`checkpoint`", "does not exist"],
        ),
        (
            "knn with no dataset upstream",
            "stages:\n  k:\n    kind: knn\n    checkpoint: random\n    model: vit_tiny\n".into(),
            &["p.yaml:2", "stage `k`", "`needs`", "dataset"],
        ),
        (
            "clevr_count with no dataset upstream",
            "stages:\n  c:\n    kind: clevr_count\n    checkpoint: random\n    model: vit_tiny\n".into(),
            &["p.yaml:2", "stage `c`", "`needs`", "clevr"],
        ),
        (
            "davis_vos with size: 0",
            "stages:\n  v:\n    kind: davis_vos\n    checkpoint: random\n    model: vit_tiny\n    params: {size: 0}\n".into(),
            &["p.yaml:6", "stage `v`", "`size` (0)", "set `params.size`"],
        ),
        (
            "linear_probe with needs: [d, d] and no encoder",
            format!("stages:\n{data}  l:\n    kind: linear_probe\n    needs: [d, d]\n    model: vit_tiny\n"),
            &["p.yaml:", "stage `l`", "`needs`"],
        ),
    ];
    for (what, yaml, expect) in cases {
        eprintln!("case: {what}");
        bad_plan(&yaml, expect);
    }
    // a dataset folder that does not exist: refused before the run starts
    let c = Ctx::new();
    c.write(
        "p.yaml",
        "stages:\n  d:\n    kind: dataset\n    format: imagefolder\n    path: no/such/folder\n",
    );
    let o = c.run(&["run", "p.yaml"]);
    assert_eq!(o.code, 2, "{}", o.all());
    for e in [
        "p.yaml:5",
        "stage `d`",
        "`path`",
        "is not a folder",
        "source: synth",
    ] {
        assert!(
            o.stderr.contains(e),
            "missing path: expected `{e}` in: {}",
            o.stderr
        );
    }
    assert!(!c.store().exists(), "missing path: no store folder");
    // a stage id written twice: both lines named (see duplicate_stage_id_names_both_lines)
    bad_plan(
        "stages:\n  x: {kind: command, cmd: 'true'}\n  x: {kind: command, cmd: 'false'}\n",
        &["p.yaml:3", "duplicate stage id `x`"],
    );
}

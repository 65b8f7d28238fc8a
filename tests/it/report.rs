//! Reports: the paper's tables from records put straight into a store (the stage kinds that make
//! them live elsewhere), seeds as mean ± std (n), the four renderings, baselines on disk = the
//! embedded copy, the pipeline files of the paper, cost estimates, and `cjepa report` end to end.

use std::collections::BTreeMap;
use std::path::Path;

use cjepa::model::VitConfig;
use cjepa::plan::cost::estimate_gpu_hours;
use cjepa::report::baselines::{self, Method};
use cjepa::report::{paper_tables, runs, Format, PaperTable, Table};
use cjepa::spec::PipelineFile;
use cjepa::store::record::Provenance;
use cjepa::store::{Record, Status, Store};
use serde_json::{json, Value};

fn key(tag: &str) -> String {
    let h = blake3::hash(tag.as_bytes()).to_hex().to_string();
    h
}

struct Rec<'a> {
    tag: &'a str,
    kind: &'a str,
    stage: &'a str,
    params: Value,
    model: Option<Value>,
    up: Vec<(&'a str, String)>,
    seed: u64,
    metrics: Vec<(&'a str, f64)>,
    minute: i64,
}

impl Rec<'_> {
    fn build(&self) -> Record {
        let upstream: BTreeMap<String, String> = self
            .up
            .iter()
            .map(|(n, k)| (n.to_string(), k.clone()))
            .collect();
        let mut ki = json!({"v": 1, "kind": self.kind, "kind_version": 1,
            "params": self.params, "upstream": upstream});
        let mut config = json!({"params": self.params, "seed": self.seed});
        if self.seed != 0 {
            ki["seed"] = json!(self.seed);
        }
        if let Some(m) = &self.model {
            ki["model"] = m.clone();
            config["model"] = m.clone();
        }
        let t = chrono::DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc)
            + chrono::Duration::minutes(self.minute);
        Record {
            key: key(self.tag),
            pipeline: "paper_test".into(),
            stage_id: self.stage.into(),
            kind: self.kind.into(),
            status: Status::Succeeded,
            config,
            key_input: ki,
            metrics: self
                .metrics
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            series: BTreeMap::new(),
            info: Value::Null,
            artifacts: vec![],
            artifacts_deleted: false,
            started: t,
            finished: t,
            secs: 1.0,
            error: None,
            provenance: Provenance::default(),
        }
    }
}

fn rec<'a>(tag: &'a str, kind: &'a str, stage: &'a str, params: Value) -> Rec<'a> {
    Rec {
        tag,
        kind,
        stage,
        params,
        model: None,
        up: vec![],
        seed: 0,
        metrics: vec![],
        minute: 0,
    }
}

fn model(cfg: VitConfig) -> Value {
    serde_json::to_value(cfg).unwrap()
}

/// The records of a small "paper": ViT-B/16 600 ep I-JEPA and C-JEPA (C-JEPA with three seeds),
/// probes, a fine-tune, a frozen-linear ADE20K head, a stale probe, and a tiny synthetic run.
fn paper_records() -> Vec<Record> {
    let mut v = Vec::new();
    let data = rec(
        "data",
        "dataset",
        "imagenet",
        json!({"source": "path", "format": "imagefolder", "path": "/data/imagenet"}),
    );
    v.push(data.build());
    let vb = model(VitConfig::vit_base());
    let pt = |tag: &'static str, method: &str, seed: u64| Rec {
        model: Some(vb.clone()),
        up: vec![("imagenet", key("data"))],
        seed,
        ..rec(
            tag,
            "pretrain",
            if method == "cjepa" {
                "pretrain_b16[method=cjepa]"
            } else {
                "pretrain_b16[method=ijepa]"
            },
            json!({"method": method, "epochs": 600, "batch": 2048, "img": 224}),
        )
    };
    let mut p = pt("pc0", "cjepa", 0).build();
    p.series.insert(
        "loss".into(),
        (0..50).map(|i| (i * 10, 1.0 / (1.0 + i as f64))).collect(),
    );
    p.series
        .insert("emb_std".into(), (0..50).map(|i| (i * 10, 0.5)).collect());
    v.push(p);
    v.push(pt("pc1", "cjepa", 1).build());
    v.push(pt("pc2", "cjepa", 2).build());
    v.push(pt("pi0", "ijepa", 0).build());
    let probe = |tag: &'static str, up: &str, seed: u64, top1: f64, epochs: u64| Rec {
        up: vec![("pretrain_b16", key(up)), ("imagenet", key("data"))],
        seed,
        metrics: vec![("top1", top1), ("top5", 90.0)],
        minute: 10,
        ..rec(
            tag,
            "linear_probe",
            "linprobe_b16[method=cjepa]",
            json!({"epochs": epochs}),
        )
    };
    v.push(probe("lc0", "pc0", 0, 73.0, 50).build());
    v.push(probe("lc1", "pc1", 1, 73.5, 50).build());
    v.push(probe("lc2", "pc2", 2, 74.0, 50).build());
    // the same probe configured shorter: its own entry in the same cell, never averaged in
    let mut short = probe("ls0", "pc0", 0, 60.0, 10).build();
    short.stage_id = "linprobe_short[method=cjepa]".into();
    v.push(short);
    // a stale record of the probe stage (older, other params): not selected
    let mut stale = probe("lstale", "pc0", 0, 10.0, 3).build();
    stale.finished -= chrono::Duration::minutes(5);
    v.push(stale);
    let mut li = probe("li0", "pi0", 0, 72.5, 50).build();
    li.stage_id = "linprobe_b16[method=ijepa]".into();
    v.push(li);
    v.push(
        Rec {
            up: vec![("pretrain_b16", key("pc0")), ("imagenet", key("data"))],
            metrics: vec![("top1", 84.1), ("top5", 97.0)],
            ..rec(
                "fc0",
                "finetune",
                "finetune_b16[method=cjepa]",
                json!({"epochs": 100}),
            )
        }
        .build(),
    );
    v.push(
        Rec {
            up: vec![("pretrain_b16", key("pc0"))],
            metrics: vec![("miou", 38.25), ("aacc", 75.0)],
            ..rec(
                "ac0",
                "ade20k_segmentation",
                "ade20k_b16[method=cjepa]",
                json!({"protocol": "linear", "iters": 160000}),
            )
        }
        .build(),
    );
    // a tiny synthetic run: no published counterpart
    v.push(
        rec(
            "sdata",
            "dataset",
            "synth",
            json!({"source": "synth", "format": "imagefolder"}),
        )
        .build(),
    );
    let mut tiny = VitConfig::vit_tiny();
    tiny.depth = 2;
    tiny.patch_size = 8;
    tiny.img_size = 32;
    v.push(
        Rec {
            model: Some(model(tiny)),
            up: vec![("data", key("sdata"))],
            ..rec(
                "tp",
                "pretrain",
                "pretrain",
                json!({"method": "cjepa", "epochs": 2, "img": 32}),
            )
        }
        .build(),
    );
    v.push(
        Rec {
            up: vec![("pretrain", key("tp")), ("data", key("sdata"))],
            metrics: vec![("top1", 41.0)],
            ..rec("tl", "linear_probe", "linprobe", json!({"epochs": 3}))
        }
        .build(),
    );
    v
}

fn store_with(records: &[Record]) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), false, "report test").unwrap();
    for r in records {
        store.put(r).unwrap();
    }
    store.flush().unwrap();
    (dir, store)
}

fn tables_from_store() -> Vec<PaperTable> {
    let (_d, store) = store_with(&paper_records());
    let records = runs::select(store.records().unwrap(), None);
    let published = baselines::embedded().unwrap();
    paper_tables(&published, &records)
}

fn find<'a>(ts: &'a [PaperTable], slug: &str) -> &'a Table {
    &ts.iter()
        .find(|t| t.slug == slug)
        .unwrap_or_else(|| panic!("no table {slug}"))
        .table
}

fn cell<'a>(t: &'a Table, method: &str, protocols: &str, col: &str) -> &'a str {
    let c = t
        .header
        .iter()
        .position(|h| h == col)
        .unwrap_or_else(|| panic!("no column {col} in {:?}", t.header));
    let row = t
        .rows
        .iter()
        .find(|r| r[0] == method && r[3] == protocols)
        .unwrap_or_else(|| panic!("no row {method}/{protocols} in {:#?}", t.rows));
    &row[c]
}

/// Probes of one 600-epoch run's snapshot (`at_epoch: 100`) count as epoch 100 of that run: a row
/// `100 of 600` of their own (no published value), never in the 600-epoch row nor in the row of
/// a genuine 100-epoch run; in the plot, the run's snapshots and final probe are one line.
#[test]
fn snapshot_probes_are_rows_of_their_own_and_one_line() {
    let vb = model(VitConfig::vit_base());
    let data = rec(
        "data",
        "dataset",
        "imagenet",
        json!({"source": "path", "format": "imagefolder", "path": "/data/imagenet"}),
    );
    let pt = |tag: &'static str, stage: &'static str, params: Value| Rec {
        model: Some(vb.clone()),
        up: vec![("imagenet", key("data"))],
        ..rec(tag, "pretrain", stage, params)
    };
    let probe = |tag: &'static str, stage: &'static str, up: &str, top1: f64, params: Value| Rec {
        up: vec![("pretrain", key(up)), ("imagenet", key("data"))],
        metrics: vec![("top1", top1)],
        ..rec(tag, "linear_probe", stage, params)
    };
    let records =
        vec![
        data.build(),
        pt(
            "ps",
            "pretrain[method=cjepa]",
            json!({"method": "cjepa", "epochs": 600, "img": 224, "snapshot_epochs": [100, 300]}),
        )
        .build(),
        probe("lsf", "linprobe[method=cjepa]", "ps", 73.0, json!({"epochs": 50})).build(),
        probe(
            "ls100",
            "linprobe_at[at_epoch=100,method=cjepa]",
            "ps",
            61.0,
            json!({"epochs": 50, "at_epoch": 100}),
        )
        .build(),
        probe(
            "ls300",
            "linprobe_at[at_epoch=300,method=cjepa]",
            "ps",
            69.0,
            json!({"epochs": 50, "at_epoch": 300}),
        )
        .build(),
        pt(
            "p100",
            "pretrain100[method=cjepa]",
            json!({"method": "cjepa", "epochs": 100, "img": 224}),
        )
        .build(),
        probe("l100", "linprobe100[method=cjepa]", "p100", 66.0, json!({"epochs": 50})).build(),
    ];
    let published = baselines::embedded().unwrap();
    let ts = paper_tables(&published, &records);
    let row = |t: &Table, epochs: &str| -> Vec<String> {
        t.rows
            .iter()
            .find(|r| r[0] == "C-JEPA" && r[2] == epochs && r[3] == "paper")
            .unwrap_or_else(|| panic!("no C-JEPA row {epochs} in {:#?}", t.rows))
            .clone()
    };
    let col = |t: &Table, name: &str| t.header.iter().position(|h| h == name).unwrap();
    let t1 = find(&ts, "cjepa_table1");
    let (lin, pubc) = (col(t1, "IN-1K linear"), col(t1, "IN-1K linear (paper)"));
    let r600 = row(t1, "600");
    assert!(
        r600[lin].starts_with("73.00 (1) [linear, 50 ep, "),
        "{r600:?}"
    );
    assert_eq!(r600[pubc], "73.7");
    let t3 = find(&ts, "cjepa_table3");
    let (lin, pubc) = (col(t3, "IN-1K linear"), col(t3, "IN-1K linear (paper)"));
    let r100 = row(t3, "100");
    assert!(r100[lin].starts_with("66.00 (1) ["), "{r100:?}");
    let snap = row(t3, "100 of 600");
    assert!(snap[lin].starts_with("61.00 (1) ["), "{snap:?}");
    assert_eq!(snap[pubc], "");
    for t in [t1, t3] {
        for r in &t.rows {
            if r[2] != "100 of 600" {
                assert!(!r.iter().any(|c| c.contains("61.00")), "{r:?}");
            }
        }
    }
    // epoch 300 has no published table: "Other runs"
    let other = find(&ts, "other_runs");
    assert!(
        other
            .rows
            .iter()
            .any(|r| r[2] == "300 of 600" && r.iter().any(|c| c.starts_with("69.00 (1)"))),
        "{:#?}",
        other.rows
    );
    let plots = cjepa::report::plots::probe_vs_epochs(&records, &published);
    assert_eq!(plots.len(), 1);
    let svg = plots[0].svg().unwrap();
    assert!(
        svg.contains(">C-JEPA, probe 50 ep, one 600-ep run<"),
        "{svg}"
    );
    assert!(svg.contains(">C-JEPA, probe 50 ep<"), "{svg}");
    // two measured lines (the paper's are dashed): the separate 100-epoch run, one point; the
    // one-run line (second colour), epochs 100, 300 and 600
    let series = &plots[0].chart.panels[0].series;
    let solid: Vec<_> = series.iter().filter(|s| !s.dashed).collect();
    assert_eq!(solid.len(), 2, "{series:?}");
    assert_eq!(solid[0].points.len(), 1, "{series:?}");
    let xs: Vec<f64> = solid[1].points.iter().map(|p| p.0).collect();
    assert_eq!(xs, [100.0, 300.0, 600.0], "{series:?}");
    // drawn with a marker at each of its points, in the second colour
    assert_eq!(svg.matches(r##"fill="#D62728""##).count(), 3, "{svg}");
}

#[test]
fn paper_tables_hold_measured_and_published_values_in_the_right_cells() {
    let ts = tables_from_store();
    let slugs: Vec<&str> = ts.iter().map(|t| t.slug.as_str()).collect();
    assert_eq!(
        slugs,
        [
            "cjepa_table1",
            "cjepa_table2",
            "cjepa_table3",
            "cjepa_table4",
            "ijepa_table1",
            "ijepa_table4",
            "other_runs"
        ]
    );
    let t1 = find(&ts, "cjepa_table1");
    // C-JEPA, three seeds: 73.0, 73.5, 74.0 -> 73.50 ± 0.50 (3); the 10-epoch probe is its own entry
    let lin = cell(t1, "C-JEPA", "paper", "IN-1K linear");
    assert!(
        lin.starts_with("73.50 ± 0.50 (3) [linear, 50 ep, "),
        "{lin}"
    );
    for k in ["pc0", "pc1", "pc2"] {
        let lk = key(&format!("l{}", &k[1..]));
        assert!(lin.contains(&lk[..8]), "{lin} lacks {}", &lk[..8]);
    }
    assert!(lin.contains("; 60.00 (1) [linear, 10 ep, "), "{lin}");
    assert!(!lin.contains("10.00"), "stale record selected: {lin}");
    assert_eq!(cell(t1, "C-JEPA", "paper", "IN-1K linear (paper)"), "73.7");
    assert!(
        cell(t1, "C-JEPA", "paper", "IN-1K fine-tune").starts_with("84.10 (1) [finetune, 100 ep,")
    );
    assert_eq!(
        cell(t1, "C-JEPA", "paper", "IN-1K fine-tune (paper)"),
        "84.5"
    );
    assert_eq!(cell(t1, "C-JEPA", "paper", "COCO AP^box"), "—");
    assert_eq!(cell(t1, "C-JEPA", "paper", "COCO AP^box (paper)"), "50.7");
    assert!(cell(t1, "I-JEPA", "paper", "IN-1K linear").starts_with("72.50 (1) [linear, 50 ep,"));
    assert_eq!(cell(t1, "I-JEPA", "paper", "IN-1K linear (paper)"), "72.9");
    // the frozen linear ADE20K head is a row of its own, with no published value next to it
    assert!(cell(t1, "C-JEPA", "ade20k-linear", "ADE20K mIoU")
        .starts_with("38.25 (1) [ade20k-linear, 160000 it,"));
    assert_eq!(
        cell(t1, "C-JEPA", "ade20k-linear", "ADE20K mIoU (paper)"),
        ""
    );
    assert_eq!(cell(t1, "C-JEPA", "paper", "ADE20K mIoU"), "—");
    assert_eq!(cell(t1, "C-JEPA", "paper", "ADE20K mIoU (paper)"), "48.7");
    // Table 3 (100 epochs) has only published values
    let t3 = find(&ts, "cjepa_table3");
    assert_eq!(t3.rows.len(), 4);
    assert_eq!(
        cell(t3, "+ var/cov", "paper", "IN-1K linear (paper)"),
        "68.3"
    );
    assert_eq!(cell(t3, "+ inv", "paper", "DAVIS J&F (paper)"), "53.9");
    assert_eq!(cell(t3, "C-JEPA", "paper", "IN-1K linear"), "—");
    // Table 4 carries its own I-JEPA fine-tune number
    assert_eq!(
        cell(
            find(&ts, "cjepa_table4"),
            "I-JEPA",
            "paper",
            "IN-1K fine-tune (paper)"
        ),
        "83.9"
    );
    // a table without a fine-tune column does not take the fine-tune as a variant row
    let ij = find(&ts, "ijepa_table1");
    let methods: Vec<(&str, &str)> = ij
        .rows
        .iter()
        .map(|r| (r[0].as_str(), r[3].as_str()))
        .collect();
    assert_eq!(
        methods,
        [
            ("I-JEPA", "paper"),
            ("I-JEPA", "paper"),
            ("I-JEPA", "paper"),
            ("C-JEPA", "paper")
        ]
    );
    // the tiny synthetic run fits no table
    let other = find(&ts, "other_runs");
    assert_eq!(other.rows.len(), 1, "{:#?}", other.rows);
    assert_eq!(other.rows[0][1], "ViT D192 L2 /8 @32px");
    assert!(other.rows[0][3].contains("41.00 (1) [linear, 3 ep, synth data,"));
}

#[test]
fn paper_tables_render_in_every_format() {
    let ts = tables_from_store();
    let t1 = find(&ts, "cjepa_table1");
    let md = t1.render(Format::Md);
    assert!(md.starts_with("### C-JEPA"), "{md}");
    assert!(md.contains("| 73.50 ± 0.50 (3) [linear, 50 ep,"), "{md}");
    let csv = t1.render(Format::Csv);
    assert!(csv
        .lines()
        .next()
        .unwrap()
        .starts_with("method,backbone,pt epochs,protocols,IN-1K linear,IN-1K linear (paper)"));
    assert!(csv.contains("\"73.50 ± 0.50 (3) [linear, 50 ep,"), "{csv}");
    let json: Value = serde_json::from_str(&t1.render(Format::Json)).unwrap();
    let row = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["method"] == "C-JEPA" && r["protocols"] == "paper")
        .unwrap();
    assert_eq!(row["IN-1K linear (paper)"], json!(73.7));
    assert!(row["IN-1K linear"]
        .as_str()
        .unwrap()
        .starts_with("73.50 ± 0.50 (3)"));
    let tex = t1.render(Format::Latex);
    assert!(tex.contains("73.50 $\\pm$ 0.50 (3)"), "{tex}");
    assert!(tex.contains("COCO AP\\^{}box"), "{tex}");
    assert!(tex.contains("\\begin{tabular}"));
}

#[test]
fn baselines_on_disk_equal_the_embedded_copy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let disk = baselines::load_all(root).unwrap();
    assert_eq!(disk, baselines::embedded().unwrap());
    for f in ["cjepa", "ijepa"] {
        let p = root.join("registry/baselines").join(format!("{f}.yaml"));
        let text = std::fs::read_to_string(&p).unwrap();
        let parsed = baselines::parse(&text, &p.display().to_string()).unwrap();
        assert!(parsed.baselines.iter().all(|b| b.transcribed));
    }
    // every (table, method, arch, epochs, benchmark, protocol) is published once
    let mut seen = std::collections::BTreeSet::new();
    for b in &disk {
        assert!(seen.insert((
            b.source.arxiv.clone(),
            b.source.table.clone(),
            b.method,
            b.arch.clone(),
            b.epochs,
            b.benchmark,
            b.protocol
        )));
    }
}

#[test]
fn cost_is_monotone_in_model_size_and_epochs_and_plausible_for_vit_b() {
    const IN1K: u64 = 1_281_167;
    let sizes = [
        VitConfig::vit_tiny(),
        VitConfig::vit_small(),
        VitConfig::vit_base(),
        VitConfig::vit_large(),
        VitConfig::vit_huge(),
    ];
    // the work per image each kind declares (its cost hook, on its default params)
    let pass = |kind: &str| {
        let hooks = cjepa::stages::table(cjepa::kind::StageKind::parse(kind).unwrap());
        hooks.cost(&hooks.default_params()).pass
    };
    for kind in ["pretrain", "linear_probe", "finetune", "davis_vos"] {
        let h: Vec<f64> = sizes
            .iter()
            .map(|m| estimate_gpu_hours(pass(kind), m, IN1K, 100.0, 224))
            .collect();
        assert!(h.windows(2).all(|w| w[0] < w[1]), "{kind}: {h:?}");
    }
    let b = VitConfig::vit_base();
    let by_epochs: Vec<f64> = [1.0, 100.0, 300.0, 600.0]
        .iter()
        .map(|e| estimate_gpu_hours(pass("pretrain"), &b, IN1K, *e, 224))
        .collect();
    assert!(by_epochs.windows(2).all(|w| w[0] < w[1]), "{by_epochs:?}");
    // ViT-B/16, 600 epochs on ImageNet-1K: tens of H100-hours (see plan::cost's doc)
    let h = by_epochs[3];
    assert!((20.0..200.0).contains(&h), "{h}");
    // a fine-tune costs less than pretraining the same epochs; a probe less than a fine-tune
    let ft = estimate_gpu_hours(pass("finetune"), &b, IN1K, 100.0, 224);
    let lp = estimate_gpu_hours(pass("linear_probe"), &b, IN1K, 100.0, 224);
    assert!(lp < ft && ft < by_epochs[1] * 2.0, "{lp} {ft}");
}

fn pipeline_file(rel: &str) -> PipelineFile {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    let text = std::fs::read_to_string(&p).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const PAPER_KINDS: [&str; 9] = [
    "dataset",
    "pretrain",
    "linear_probe",
    "finetune",
    "coco_detection",
    "ade20k_segmentation",
    "davis_vos",
    "clevr_count",
    "clevr_dist",
];

#[test]
fn paper_pipelines_parse_and_cover_the_tables() {
    let full = pipeline_file("pipelines/full_paper.yaml");
    for (id, s) in &full.stages {
        assert!(PAPER_KINDS.contains(&s.kind.as_str()), "{id}: {}", s.kind);
        if s.kind == "dataset" {
            let path = s.path.as_deref().unwrap();
            assert!(path.starts_with("${CJEPA_DATA:-/data}/"), "{id}: {path}");
        }
    }
    // every kind of evaluation the tables need is there
    for k in &PAPER_KINDS[2..] {
        assert!(full.stages.values().any(|s| s.kind == *k), "no {k} stage");
    }
    // 600-epoch ViT-B and ViT-L pretraining of both methods
    for (id, preset) in [("pretrain_b16", "vit_base"), ("pretrain_l16", "vit_large")] {
        let s = &full.stages[id];
        assert_eq!(
            s.model,
            Some(cjepa::spec::types::ModelRef::Preset(preset.into()))
        );
        assert_eq!(s.params["epochs"], 600);
        assert_eq!(s.params["batch_size"], 2048);
        assert_eq!(s.matrix["method"], vec![json!("ijepa"), json!("cjepa")]);
    }
    // the ablation matrix yields the paper's four rows
    let ab = &full.stages["ablation_b16"];
    assert_eq!(ab.params["epochs"], 100);
    let mut methods = Vec::new();
    for b_sim in &ab.matrix["loss.b_sim"] {
        for terms in &ab.matrix["loss.vic_terms"] {
            let mut p = ab.params.clone();
            let loss = p["loss"].as_object_mut().unwrap();
            loss.insert("b_sim".into(), b_sim.clone());
            loss.insert("vic_terms".into(), terms.clone());
            let facts = cjepa::stages::table(cjepa::kind::StageKind::Pretrain)
                .report_facts(&Value::Object(p))
                .pretrain
                .expect("pretrain facts");
            let (m, label) = runs::method_of(&facts);
            methods.push(m.unwrap_or_else(|| panic!("{label}")));
        }
    }
    methods.sort();
    assert_eq!(
        methods,
        [Method::Ijepa, Method::VarCov, Method::Inv, Method::Cjepa]
    );
    // convergence: one 600-epoch run per method with the params of full_paper's, snapshots
    // probed at every listed epoch, plus the final probe
    let conv = pipeline_file("pipelines/convergence.yaml");
    let (cp, fp) = (&conv.stages["pretrain"], &full.stages["pretrain_b16"]);
    assert_eq!(cp.model, fp.model);
    assert_eq!(cp.matrix, fp.matrix);
    // the same params, snapshots included, so the two files share the runs (same keys)
    assert_eq!(cp.params, fp.params);
    let snaps = cp.params.get("snapshot_epochs").expect("snapshot_epochs");
    assert!(snaps.as_array().unwrap().len() >= 4, "{snaps}");
    assert_eq!(
        &conv.stages["linprobe_at"].matrix["at_epoch"],
        snaps.as_array().unwrap()
    );
    assert_eq!(
        conv.stages["linprobe"].params,
        full.stages["linprobe_b16"].params
    );
    let sweep = pipeline_file("pipelines/sweeps/b_vic.yaml");
    let vals = &sweep.stages["pretrain"].matrix["loss.b_vic"];
    assert!(vals.contains(&json!(0.001)) && vals.len() >= 4);
}

/// Once every paper kind exists (after the stage branches merge), the files also validate, plan,
/// and get cost estimates.
#[test]
fn paper_pipelines_plan_when_the_kinds_exist() {
    if PAPER_KINDS
        .iter()
        .any(|k| cjepa::stages::StageKind::parse(k).is_none())
    {
        eprintln!("skipped: not every paper stage kind is compiled into this build");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pretrain_keys = std::collections::BTreeMap::new();
    for (rel, n) in [
        ("pipelines/full_paper.yaml", 5 + 2 * 6 + 2 * 6 + 4 * 4),
        ("pipelines/convergence.yaml", 1 + 2 + 2 * 6 + 2),
        ("pipelines/sweeps/b_vic.yaml", 1 + 6 + 6),
    ] {
        let p = cjepa::spec::load_pipeline(&root.join(rel), &Default::default())
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        let plan =
            cjepa::plan::build(&p, cjepa::stages::table).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(plan.stages.len(), n, "{rel}");
        let est = cjepa::plan::cost::plan_estimates(&plan);
        for (s, e) in plan.stages.iter().zip(&est) {
            if s.kind.name() == "pretrain" {
                assert!(e.is_some_and(|h| h > 1.0), "{rel} {}: {e:?}", s.inst.id);
                pretrain_keys
                    .entry(rel)
                    .or_insert_with(Vec::new)
                    .push(s.key.clone());
            }
        }
    }
    // convergence.yaml's two 600-epoch runs are full_paper.yaml's ViT-B/16 runs (shared store)
    let full = &pretrain_keys["pipelines/full_paper.yaml"];
    for k in &pretrain_keys["pipelines/convergence.yaml"] {
        assert!(
            full.contains(k),
            "convergence pretrain {k} is not a full_paper stage"
        );
    }
}

#[test]
fn cli_report_prints_paper_tables_and_writes_files_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    {
        let store = Store::open(&store_dir, false, "report test").unwrap();
        let mut recs = paper_records();
        // a convergence sweep: C-JEPA ViT-B probed after 100 and 600 epochs
        let vb = model(VitConfig::vit_base());
        recs.push(
            Rec {
                model: Some(vb),
                up: vec![("imagenet", key("data"))],
                ..rec(
                    "pc100",
                    "pretrain",
                    "pretrain[epochs=100,method=cjepa]",
                    json!({"method": "cjepa", "epochs": 100, "img": 224}),
                )
            }
            .build(),
        );
        recs.push(
            Rec {
                up: vec![("pretrain", key("pc100")), ("imagenet", key("data"))],
                metrics: vec![("top1", 66.0)],
                ..rec(
                    "lc100",
                    "linear_probe",
                    "linprobe_b16[epochs=100,method=cjepa]",
                    json!({"epochs": 50}),
                )
            }
            .build(),
        );
        for r in &recs {
            store.put(r).unwrap();
        }
        store.flush().unwrap();
    }
    let out = dir.path().join("out");
    let a = assert_cmd::Command::cargo_bin("cjepa")
        .unwrap()
        .current_dir(dir.path())
        .args(["report", "--tables", "paper", "--store"])
        .arg(&store_dir)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&a.get_output().stdout).into_owned();
    assert!(
        stdout.contains("### C-JEPA (Mo & Tong, NeurIPS 2024) Table 1"),
        "{stdout}"
    );
    assert!(stdout.contains("73.50 ± 0.50 (3)"), "{stdout}");
    assert!(stdout.contains("66.00 (1)"), "{stdout}");
    assert!(!stdout.contains("stored metrics"), "{stdout}");
    let a = assert_cmd::Command::cargo_bin("cjepa")
        .unwrap()
        .current_dir(dir.path())
        .args(["report", "--tables", "all", "--format", "csv", "--store"])
        .arg(&store_dir)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&a.get_output().stdout).into_owned();
    assert!(stdout.contains("stage,kind,key"), "{stdout}");
    for f in [
        "cjepa_table1.csv",
        "cjepa_table3.csv",
        "other_runs.csv",
        "metrics.csv",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let t3 = std::fs::read_to_string(out.join("cjepa_table3.csv")).unwrap();
    assert!(t3.contains("66.00 (1)"), "{t3}");
    let plots = out.join("plots");
    let names: Vec<String> = std::fs::read_dir(&plots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let loss = format!("loss_pretrain_b16-method-cjepa_{}", &key("pc0")[..8]);
    for ext in ["svg", "png"] {
        assert!(names.contains(&format!("{loss}.{ext}")), "{names:?}");
    }
    assert!(
        names.iter().any(|n| n.starts_with("collapse_")),
        "{names:?}"
    );
    // the convergence plot of ViT-B/16 only (the tiny run has a single length)
    let mut probe: Vec<&String> = names.iter().filter(|n| n.starts_with("probe_vs")).collect();
    probe.sort();
    assert_eq!(
        probe,
        [
            "probe_vs_epochs_vit_base.png",
            "probe_vs_epochs_vit_base.svg"
        ],
        "{names:?}"
    );
    let svg = std::fs::read_to_string(plots.join("probe_vs_epochs_vit_base.svg")).unwrap();
    assert!(svg.contains(">C-JEPA (paper)<"), "{svg}");
    assert!(svg.contains(">C-JEPA, probe 50 ep<"), "{svg}");
    assert!(svg.contains("ViT-B/16"), "{svg}");
    // JSON on stdout is one document: the list of tables
    let a = assert_cmd::Command::cargo_bin("cjepa")
        .unwrap()
        .current_dir(dir.path())
        .args(["report", "--tables", "paper", "--format", "json", "--store"])
        .arg(&store_dir)
        .assert()
        .success();
    let all: Value = serde_json::from_slice(&a.get_output().stdout).unwrap();
    let titles: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles.len(), 7, "{titles:?}");
    assert!(titles[2].contains("Table 3"), "{titles:?}");
    // a bad --tables value is a usage error
    assert_cmd::Command::cargo_bin("cjepa")
        .unwrap()
        .args(["report", "--tables", "nope", "--store"])
        .arg(&store_dir)
        .assert()
        .code(2);
}

/// Image-classification probes name the data set they used: "Other runs" has a column per data
/// set (`IN-1K` for ImageNet-1K recognised by its folder, the dataset stage's id for an
/// unknown folder, `<id> (synthetic)` for generated data), and a paper-table cell measured on
/// another data set than ImageNet-1K says which.
#[test]
fn classification_columns_name_the_data_set_of_the_probe() {
    let dataset = |tag: &'static str, stage: &'static str, params: Value| {
        rec(tag, "dataset", stage, params).build()
    };
    let mut v = vec![
        dataset(
            "d_synth",
            "images",
            json!({"source": "synth", "format": "imagefolder"}),
        ),
        dataset(
            "d_in1k",
            "inet",
            json!({"source": "path", "format": "imagefolder", "path": "/mnt/ILSVRC2012"}),
        ),
        dataset(
            "d_cifar",
            "cifar10",
            json!({"source": "path", "format": "imagefolder", "path": "/mnt/cifar-10"}),
        ),
    ];
    let mut tiny = VitConfig::vit_tiny();
    tiny.depth = 2;
    tiny.patch_size = 8;
    tiny.img_size = 32;
    v.push(
        Rec {
            model: Some(model(tiny)),
            up: vec![("images", key("d_synth"))],
            ..rec(
                "t_pt",
                "pretrain",
                "pretrain",
                json!({"method": "cjepa", "epochs": 2, "img": 32}),
            )
        }
        .build(),
    );
    let eval = |tag: &'static str, kind: &'static str, data: &'static str, top1: f64| Rec {
        up: vec![("pretrain", key("t_pt")), ("data", key(data))],
        metrics: vec![("top1", top1)],
        ..rec(tag, kind, tag, json!({"epochs": 3}))
    };
    v.push(eval("lin_synth", "linear_probe", "d_synth", 41.0).build());
    v.push(eval("knn_synth", "knn", "d_synth", 38.0).build());
    v.push(eval("lin_cifar", "linear_probe", "d_cifar", 55.0).build());
    v.push(eval("ft_in1k", "finetune", "d_in1k", 12.0).build());
    // a ViT-B/16 600-epoch run probed on CIFAR-10 lands in the paper's table, tagged
    v.push(
        Rec {
            model: Some(model(VitConfig::vit_base())),
            up: vec![("inet", key("d_in1k"))],
            ..rec(
                "b_pt",
                "pretrain",
                "pretrain_b16",
                json!({"method": "cjepa", "epochs": 600, "img": 224}),
            )
        }
        .build(),
    );
    v.push(
        Rec {
            up: vec![("pretrain_b16", key("b_pt")), ("cifar10", key("d_cifar"))],
            metrics: vec![("top1", 91.0)],
            ..rec("b_lin", "linear_probe", "b_lin", json!({"epochs": 50}))
        }
        .build(),
    );

    // and a 100-epoch run probed on CIFAR-10: a line of the convergence plot
    v.push(
        Rec {
            model: Some(model(VitConfig::vit_base())),
            up: vec![("inet", key("d_in1k"))],
            ..rec(
                "b_pt100",
                "pretrain",
                "pretrain_b16_100",
                json!({"method": "cjepa", "epochs": 100, "img": 224}),
            )
        }
        .build(),
    );
    v.push(
        Rec {
            up: vec![
                ("pretrain_b16_100", key("b_pt100")),
                ("cifar10", key("d_cifar")),
            ],
            metrics: vec![("top1", 85.0)],
            ..rec(
                "b_lin100",
                "linear_probe",
                "b_lin100",
                json!({"epochs": 50}),
            )
        }
        .build(),
    );

    let ts = paper_tables(&baselines::embedded().unwrap(), &v);
    let other = find(&ts, "other_runs");
    let col = |name: &str| -> &str {
        let c = other
            .header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", other.header));
        &other.rows[0][c]
    };
    assert!(
        col("images (synthetic) linear").starts_with("41.00 (1) [linear, 3 ep, synth data,"),
        "{:?}",
        other.rows
    );
    assert!(col("images (synthetic) knn").starts_with("38.00 (1) [knn, 3 ep, synth data,"));
    assert!(col("cifar10 linear").starts_with("55.00 (1) [linear, 3 ep, on cifar10,"));
    assert!(col("IN-1K fine-tune").starts_with("12.00 (1) [finetune, 3 ep,"));
    for h in &other.header {
        assert!(
            !["IN-1K linear", "IN-1K knn"].contains(&h.as_str()),
            "{:?}",
            other.header
        );
    }
    let t1 = find(&ts, "cjepa_table1");
    let lin = cell(t1, "C-JEPA", "paper", "IN-1K linear");
    assert!(
        lin.starts_with("91.00 (1) [linear, 50 ep, on cifar10,"),
        "{lin}"
    );
    let plots = cjepa::report::plots::probe_vs_epochs(&v, &baselines::embedded().unwrap());
    assert_eq!(plots.len(), 1);
    let svg = plots[0].svg().unwrap();
    assert!(svg.contains(">C-JEPA, probe 50 ep, on cifar10<"), "{svg}");
    assert!(!svg.contains("ImageNet linear probe"), "{svg}");
}

/// A tiny pipeline with a pretraining stage, a stage that fails, one made stale by `--set` and
/// one left missing behind the failure: `report --html` renders every section, each stage's
/// state and key (as `cjepa status` has them), the failed stage's log tail, plots as inline
/// PNG, the metrics grouped by kind in sortable tables, and loads nothing from the network.
#[cfg(feature = "test-stages")]
#[test]
fn html_report_of_a_tiny_pipeline() {
    let c = crate::util::Ctx::new();
    c.write(
        "p.yaml",
        r#"name: html_tiny
defaults: { seed: 0, device: cpu }
stages:
  data:
    kind: dataset
    source: synth
    format: imagefolder
    params: { classes: 2, train_per_class: 8, val_per_class: 2, size: 32 }
  pretrain:
    kind: pretrain
    needs: [data]
    model: { preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }
    params: { method: cjepa, epochs: 2, batch_size: 8, warmup_epochs: 1, mask: { min_keep: 0 }, log_every: 1 }
  other:
    kind: counter
    params: { steps: 3 }
  boom:
    kind: counter
    params: { steps: 5, fail_at: 2 }
  after:
    kind: counter
    needs: [boom]
    params: { steps: 2 }
"#,
    );
    let run = c.run(&["run", "p.yaml", "--keep-going"]);
    assert_ne!(run.code, 0, "{}", run.all());
    let set = ["--set", "other.params.steps=4"];
    let status = c.run(&["status", "p.yaml", set[0], set[1]]);
    assert_eq!(status.code, 0, "{}", status.all());
    let out = c.run(&["report", "p.yaml", set[0], set[1], "--html", "page.html"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let page = std::fs::read_to_string(c.path().join("page.html")).unwrap();

    for id in [
        "stages",
        "failed",
        "paper",
        "metrics",
        "training",
        "convergence",
    ] {
        assert!(page.contains(&format!("<section id=\"{id}\">")), "{id}");
    }
    // each stage's state and key, as `cjepa status` prints them
    let want = [
        ("data", "fresh"),
        ("pretrain", "fresh"),
        ("other", "stale"),
        ("boom", "failed"),
        ("after", "missing"),
    ];
    for (id, state) in want {
        let line = status
            .stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("{id}: {}", status.stdout));
        let mut f = line.split_whitespace();
        assert_eq!(f.next(), Some(state), "{line}");
        let key = f.nth(1).unwrap();
        assert!(
            page.contains(&format!("<tr data-state=\"{state}\"><td>{id}</td>")),
            "{id} {state}"
        );
        assert!(page.contains(&format!(">{key}</code>")), "{id} {key}");
        assert!(
            page.contains(&format!("{state} · {key}</text>")),
            "DAG {id}"
        );
    }
    // the failed stage: its error and the tail of its log
    let failed = &page[page.find("<section id=\"failed\">").unwrap()..];
    let failed = &failed[..failed.find("</section>").unwrap()];
    assert!(failed.contains("<h3>boom</h3>"), "{failed}");
    assert!(failed.contains("<pre class=\"log\">"), "{failed}");
    assert!(failed.contains("fail at step 2"), "{failed}");
    // plots inline: loss and collapse monitors of the pretraining stage
    assert!(page.matches("src=\"data:image/png;base64,").count() >= 2);
    // both collapse monitors are recorded: no note that one is missing
    assert!(!page.contains("Effective rank: not recorded"));
    assert!(page.contains("<section id=\"training\">\n<h2>Training</h2>\n<div class=\"pretrain\""));
    // paper tables with the published numbers
    assert!(page.contains("<table id=\"cjepa_table1\">"), "paper tables");
    // metrics grouped by kind, each table sortable with only its kind's columns
    let table_of = |id: &str| {
        let t = &page[page
            .find(&format!("<table id=\"{id}\""))
            .unwrap_or_else(|| panic!("{id}"))..];
        t[..t.find("</table>").unwrap()].to_string()
    };
    let pre = table_of("metrics-pretrain");
    let data = table_of("metrics-dataset");
    assert!(pre.starts_with("<table id=\"metrics-pretrain\" class=\"sortable\">"));
    assert!(pre.contains("<th>loss</th>") && pre.contains("<th>target_std</th>"));
    assert!(data.starts_with("<table id=\"metrics-dataset\" class=\"sortable\">"));
    assert!(!data.contains("<th>loss</th>"), "{data}");
    // the counters' records are not the current ones (stale, failed, missing): no table
    assert!(!page.contains("<table id=\"metrics-counter\""));
    assert!(page.contains("<script>") && page.contains("querySelectorAll(\"table.sortable\")"));
    // self-contained: nothing from the network
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(!page.contains("<link") && !page.contains("<script src"));

    // `--out DIR` holds the same page as index.html next to the tables and plots
    let out = c.run(&["report", "p.yaml", set[0], set[1], "--out", "r"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let index = std::fs::read_to_string(c.path().join("r").join("index.html")).unwrap();
    assert_eq!(index.matches("<section id=").count(), 6);
    // a page into a folder that does not exist: a usage error
    let bad = c.run(&["report", "p.yaml", "--html", "no/such/page.html"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert!(bad.stderr.contains("does not exist"), "{}", bad.stderr);
}

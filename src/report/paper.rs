//! The paper's tables from the store. One table per published table in `registry/baselines/`
//! (C-JEPA Tables 1-4, the I-JEPA reference numbers): rows = method x backbone x pretraining
//! epochs, columns = benchmarks (each with the paper's protocol), and next to every measured cell
//! the published value.
//!
//! Rules:
//! * A measured cell is tagged with its evaluation protocol, schedule length and run key(s),
//!   `synth data` when its dataset is synthetic, and `on <data set>` when an image-classification
//!   measurement is on another data set than ImageNet-1K ([`runs::dataset_label`]).
//! * Seeds aggregate as `mean ± std (n)` (sample std): records that differ only in their seed (same
//!   seed-free identity, see [`super::runs::identity_of`]) form one entry. Different
//!   configurations that land in the same cell are listed side by side (`;`), never averaged.
//! * A measurement whose protocol is not the column's (a frozen linear ADE20K head under the
//!   UperNet column, a k-NN accuracy under the linear-probe column) goes to a separate row tagged
//!   with that protocol, so rows whose protocol differs are never averaged together; its published
//!   cell stays empty.
//! * A measured row is placed in every table that has a published row of the same backbone and
//!   epochs; runs that fit no table (tiny models, sweeps at other lengths) form "Other runs",
//!   whose image-classification columns name the data set measured on (`IN-1K linear`,
//!   `images (synthetic) knn`, `cifar10 fine-tune`).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::baselines::{Baseline, Benchmark, Method, Protocol, Source};
use super::runs::{self, Origin};
use super::Table;
use crate::kind::report_facts::ReportFacts;
use crate::store::Record;

/// One measured number of one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Benchmark.
    pub benchmark: Benchmark,
    /// Protocol tag (`linear`, `knn`, `ade20k-linear`, ...).
    pub protocol: String,
    /// Evaluation schedule (`50 ep`, `160000 it`, `-`).
    pub schedule: String,
    /// The value (percent).
    pub value: f64,
    /// Pretraining behind it.
    pub origin: Origin,
    /// Evaluated on a synthetic dataset.
    pub synth: bool,
    /// The report's name of the data set it was measured on ([`runs::dataset_label`]); `None`
    /// when the record's dataset record is not at hand.
    pub dataset: Option<String>,
    /// Record key.
    pub key: String,
    /// Seed-free identity of the record (seeds of one configuration share it).
    pub identity: String,
    /// Pipeline seed of the record.
    pub seed: u64,
}

impl Measurement {
    /// The data set an image-classification measurement names in its label (`IN-1K` when its
    /// dataset record is not at hand); `None` for the other benchmarks.
    pub fn classification_dataset(&self) -> Option<&str> {
        (self.benchmark == Benchmark::Imagenet)
            .then(|| self.dataset.as_deref().unwrap_or(runs::IMAGENET_LABEL))
    }
}

/// Benchmarks a stage kind measures: (benchmark, protocol of the full recipe, metric name).
pub fn kind_benchmarks(kind: &str) -> &'static [(Benchmark, &'static str, &'static str)] {
    match kind {
        "linear_probe" => &[(Benchmark::Imagenet, "linear", "top1")],
        "knn" => &[(Benchmark::Imagenet, "knn", "top1")],
        "finetune" => &[(Benchmark::Imagenet, "finetune", "top1")],
        "coco_detection" => &[
            (Benchmark::CocoApBox, "coco-maskrcnn", "ap_box"),
            (Benchmark::CocoApMask, "coco-maskrcnn", "ap_mask"),
        ],
        "ade20k_segmentation" => &[(Benchmark::Ade20kMiou, "ade20k-upernet", "miou")],
        "davis_vos" => &[(Benchmark::DavisJf, "davis", "jf_mean")],
        "clevr_count" => &[(Benchmark::ClevrCount, "clevr-linear", "top1")],
        "clevr_dist" => &[(Benchmark::ClevrDist, "clevr-linear", "top1")],
        _ => &[],
    }
}

/// The protocol of a stage: the one its params choose ([`ReportFacts::protocol`], e.g.
/// `coco-fcos` for our detector, `ade20k-linear`), else the benchmark's full recipe `base`.
pub fn protocol_of(facts: &ReportFacts, base: &str) -> String {
    facts.protocol.clone().unwrap_or_else(|| base.to_string())
}

/// Schedule length of an evaluation stage (`50 ep`, `160000 it`, `-`).
pub fn schedule_of(facts: &ReportFacts) -> String {
    match facts.schedule {
        Some((n, unit)) => format!("{} {unit}", super::table::fmt_num(n)),
        None => "-".into(),
    }
}

/// Every measurement in `records` (the upstream chain is looked up among them).
pub fn measurements(records: &[Record]) -> Vec<Measurement> {
    let by_key: BTreeMap<String, Record> =
        records.iter().map(|r| (r.key.clone(), r.clone())).collect();
    let ids = runs::identities(&by_key);
    let mut out = Vec::new();
    for r in records {
        let benches = kind_benchmarks(&r.kind);
        if benches.is_empty() {
            continue;
        }
        let origin = runs::origin(r, &by_key);
        let synth = runs::on_synth_data(r, &by_key);
        let dataset = runs::dataset_label(r, &by_key);
        let facts = runs::facts(r);
        for (bench, base, metric) in benches {
            let Some(v) = r.metrics.get(*metric) else {
                continue;
            };
            out.push(Measurement {
                benchmark: *bench,
                protocol: protocol_of(&facts, base),
                schedule: schedule_of(&facts),
                value: *v,
                origin: origin.clone(),
                synth,
                dataset: dataset.clone(),
                key: r.key.clone(),
                identity: ids.get(&r.key).cloned().unwrap_or_else(|| r.key.clone()),
                seed: r.config["seed"].as_u64().unwrap_or(0),
            });
        }
    }
    out
}

/// Mean, sample standard deviation and count.
pub fn mean_std(v: &[f64]) -> (f64, Option<f64>, usize) {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    let std = (n > 1)
        .then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    (mean, std, n)
}

/// One cell entry: the seeds of one configuration.
fn entry(ms: &[&Measurement]) -> String {
    let vals: Vec<f64> = ms.iter().map(|m| m.value).collect();
    let (mean, std, n) = mean_std(&vals);
    let num = match std {
        Some(s) => format!("{mean:.2} ± {s:.2} ({n})"),
        None => format!("{mean:.2} ({n})"),
    };
    let m0 = ms[0];
    let mut tags = vec![m0.protocol.clone(), m0.schedule.clone()];
    if m0.synth {
        tags.push("synth data".into());
    } else if let Some(d) = m0
        .classification_dataset()
        .filter(|d| *d != runs::IMAGENET_LABEL)
    {
        tags.push(format!("on {d}"));
    }
    let mut keys: Vec<&str> = ms.iter().map(|m| &m.key[..8.min(m.key.len())]).collect();
    keys.sort();
    tags.push(keys.join(" "));
    format!("{num} [{}]", tags.join(", "))
}

/// A cell: entries per configuration (identity), never averaged across configurations; the
/// entry with the most seeds first, then the longer schedule.
fn cell(ms: &[&Measurement]) -> String {
    let mut by_id: BTreeMap<&str, Vec<&Measurement>> = BTreeMap::new();
    for m in ms {
        by_id.entry(m.identity.as_str()).or_default().push(m);
    }
    let mut groups: Vec<Vec<&Measurement>> = by_id.into_values().collect();
    let length = |m: &Measurement| -> f64 {
        m.schedule
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0)
    };
    groups.sort_by(|a, b| {
        b.len()
            .cmp(&a.len())
            .then(length(b[0]).total_cmp(&length(a[0])))
    });
    groups
        .iter()
        .map(|v| entry(v))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A row of a paper table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct RowKey {
    method: Option<Method>,
    method_label: String,
    arch: String,
    epochs: Option<u64>,
    /// `Some(n)`: the weights are the snapshot of epoch `epochs` of an `n`-epoch run (a row of
    /// its own, never one of the paper's `epochs`-epoch rows).
    snapshot_of: Option<u64>,
    /// `None`: the paper's protocols; `Some(p)`: a row of measurements under protocol `p`.
    variant: Option<String>,
}

impl RowKey {
    fn of(o: &Origin, variant: Option<String>) -> Self {
        RowKey {
            method: o.method,
            method_label: o.method_label.clone(),
            arch: o.arch.clone(),
            epochs: o.epochs,
            snapshot_of: o.snapshot_of,
            variant,
        }
    }
}

/// A table of the paper, from its baselines.
struct TableDef<'a> {
    source: &'a Source,
    columns: Vec<(Benchmark, Protocol)>,
    rows: Vec<(Method, String, u32)>,
    values: BTreeMap<(Method, String, u32, Benchmark, Protocol), f64>,
}

fn table_defs(baselines: &[Baseline]) -> Vec<TableDef<'_>> {
    let mut defs: Vec<TableDef> = Vec::new();
    for b in baselines {
        let i = match defs
            .iter()
            .position(|d| d.source.arxiv == b.source.arxiv && d.source.table == b.source.table)
        {
            Some(i) => i,
            None => {
                defs.push(TableDef {
                    source: &b.source,
                    columns: Vec::new(),
                    rows: Vec::new(),
                    values: BTreeMap::new(),
                });
                defs.len() - 1
            }
        };
        let d = &mut defs[i];
        if !d.columns.contains(&(b.benchmark, b.protocol)) {
            d.columns.push((b.benchmark, b.protocol));
        }
        let row = (b.method, b.arch.clone(), b.epochs);
        if !d.rows.contains(&row) {
            d.rows.push(row);
        }
        d.values.insert(
            (b.method, b.arch.clone(), b.epochs, b.benchmark, b.protocol),
            b.value,
        );
    }
    defs
}

/// A rendered-ready table with a file-name slug.
#[derive(Debug, Clone, PartialEq)]
pub struct PaperTable {
    /// File stem (`cjepa_table1`).
    pub slug: String,
    /// The table.
    pub table: Table,
}

fn slug(s: &Source) -> String {
    let paper: String = s
        .paper
        .split_whitespace()
        .next()
        .unwrap_or("paper")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_lowercase();
    let table: String = s
        .table
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_lowercase();
    format!("{paper}_{table}")
}

/// `600`, or `100 of 600` for a snapshot of a 600-epoch run.
fn epochs_label(e: Option<u64>, snapshot_of: Option<u64>) -> String {
    match (e, snapshot_of) {
        (Some(e), Some(n)) => format!("{e} of {n}"),
        (e, _) => e.map_or("-".into(), |e| e.to_string()),
    }
}

/// Build the paper tables (then "Other runs", if any run fits no table) from baselines and the
/// selected records.
pub fn paper_tables(baselines: &[Baseline], records: &[Record]) -> Vec<PaperTable> {
    let ms = measurements(records);
    let mut used = vec![false; ms.len()];
    let mut out = Vec::new();
    for def in table_defs(baselines) {
        let scopes: BTreeSet<(String, Option<u64>)> = def
            .rows
            .iter()
            .map(|(_, a, e)| (a.clone(), Some(*e as u64)))
            .collect();
        // (row, column index) -> measurements
        let mut cells: BTreeMap<(RowKey, usize), Vec<&Measurement>> = BTreeMap::new();
        let mut rows: BTreeSet<RowKey> = BTreeSet::new();
        for (i, m) in ms.iter().enumerate() {
            if !scopes.contains(&(m.origin.arch.clone(), m.origin.epochs)) {
                continue;
            }
            let exact = def
                .columns
                .iter()
                .position(|(b, p)| *b == m.benchmark && p.as_str() == m.protocol);
            // a paper protocol the table has no column for (a fine-tune under a linear-only
            // table) does not belong here; another protocol (k-NN, a frozen head) gets a row
            // of its own under the column of its benchmark
            let paper_protocol =
                serde_json::from_value::<Protocol>(Value::String(m.protocol.clone())).is_ok();
            let (col, variant) = match exact {
                Some(c) => (c, None),
                None if paper_protocol => continue,
                None => match def.columns.iter().position(|(b, _)| *b == m.benchmark) {
                    Some(c) => (c, Some(m.protocol.clone())),
                    None => continue,
                },
            };
            used[i] = true;
            let rk = RowKey::of(&m.origin, variant);
            rows.insert(rk.clone());
            cells.entry((rk, col)).or_default().push(m);
        }
        // published rows first, in the paper's order; then measured-only rows
        let mut order: Vec<RowKey> = def
            .rows
            .iter()
            .map(|(m, a, e)| RowKey {
                method: Some(*m),
                method_label: m.label().to_string(),
                arch: a.clone(),
                epochs: Some(*e as u64),
                snapshot_of: None,
                variant: None,
            })
            .collect();
        let extra: Vec<RowKey> = rows.into_iter().filter(|r| !order.contains(r)).collect();
        order.extend(extra);
        let mut header: Vec<String> = ["method", "backbone", "pt epochs", "protocols"]
            .map(String::from)
            .to_vec();
        for (b, p) in &def.columns {
            let l = b.label(p.as_str());
            header.push(l.clone());
            header.push(format!("{l} (paper)"));
        }
        let arch_labels: BTreeMap<&str, &str> = ms
            .iter()
            .map(|m| (m.origin.arch.as_str(), m.origin.arch_label.as_str()))
            .collect();
        let mut trows = Vec::new();
        for rk in &order {
            let mut row = vec![
                rk.method_label.clone(),
                arch_labels
                    .get(rk.arch.as_str())
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| super::baselines::arch_label(&rk.arch)),
                epochs_label(rk.epochs, rk.snapshot_of),
                rk.variant.clone().unwrap_or_else(|| "paper".into()),
            ];
            for (c, (b, p)) in def.columns.iter().enumerate() {
                row.push(
                    cells
                        .get(&(rk.clone(), c))
                        .map(|v| cell(v))
                        .unwrap_or_else(|| "—".into()),
                );
                let published = match (rk.method, &rk.variant, rk.epochs, rk.snapshot_of) {
                    (Some(m), None, Some(e), None) => {
                        def.values.get(&(m, rk.arch.clone(), e as u32, *b, *p))
                    }
                    _ => None,
                };
                row.push(published.map(|v| v.to_string()).unwrap_or_default());
            }
            trows.push(row);
        }
        let s = def.source;
        let mut title = format!("{} {}", s.paper, s.table);
        if let Some(c) = &s.caption {
            title.push_str(&format!(": {c}"));
        }
        title.push_str(&format!(
            " [arXiv {}; published values transcribed]",
            s.arxiv
        ));
        out.push(PaperTable {
            slug: slug(s),
            table: Table {
                title,
                header,
                rows: trows,
            },
        });
    }
    let rest: Vec<&Measurement> = ms
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(m, _)| m)
        .collect();
    if !rest.is_empty() {
        out.push(PaperTable {
            slug: "other_runs".into(),
            table: other_runs(&rest),
        });
    }
    out
}

/// The protocol a benchmark column of "Other runs" is labelled without a tag.
fn default_protocol(b: Benchmark) -> &'static str {
    match b {
        Benchmark::Imagenet => "linear",
        Benchmark::CocoApBox | Benchmark::CocoApMask => "coco-maskrcnn",
        Benchmark::Ade20kMiou => "ade20k-upernet",
        Benchmark::DavisJf => "davis",
        Benchmark::ClevrCount | Benchmark::ClevrDist => "clevr-linear",
    }
}

fn other_runs(ms: &[&Measurement]) -> Table {
    // (benchmark, protocol, data set of an image-classification measurement)
    let col_of = |m: &Measurement| {
        (
            m.benchmark,
            m.protocol.clone(),
            m.classification_dataset().map(str::to_string),
        )
    };
    let mut cols: Vec<(Benchmark, String, Option<String>)> = ms
        .iter()
        .map(|m| col_of(m))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    cols.sort_by_key(|(b, p, d)| {
        (
            *b,
            d.as_deref() != Some(runs::IMAGENET_LABEL),
            d.clone(),
            p != default_protocol(*b),
            p.clone(),
        )
    });
    // (method, method label, arch, epochs, snapshot of): a row, without protocol variants (the
    // columns differ)
    type Row = (Option<Method>, String, String, Option<u64>, Option<u64>);
    let mut rows: BTreeMap<Row, String> = BTreeMap::new();
    let mut cells: BTreeMap<(Row, usize), Vec<&Measurement>> = BTreeMap::new();
    for m in ms {
        let rk = (
            m.origin.method,
            m.origin.method_label.clone(),
            m.origin.arch.clone(),
            m.origin.epochs,
            m.origin.snapshot_of,
        );
        rows.insert(rk.clone(), m.origin.arch_label.clone());
        let want = col_of(m);
        let c = cols
            .iter()
            .position(|c| *c == want)
            .expect("column of every measurement");
        cells.entry((rk, c)).or_default().push(m);
    }
    let mut header: Vec<String> = ["method", "backbone", "pt epochs"]
        .map(String::from)
        .to_vec();
    for (b, p, d) in &cols {
        let l = match d {
            Some(d) => b.label_on(p, d),
            None => b.label(p),
        };
        header.push(if b != &Benchmark::Imagenet && p != default_protocol(*b) {
            format!("{l} ({p})")
        } else {
            l
        });
    }
    let trows = rows
        .iter()
        .map(|(rk, arch_label)| {
            let mut row = vec![rk.1.clone(), arch_label.clone(), epochs_label(rk.3, rk.4)];
            for c in 0..cols.len() {
                row.push(
                    cells
                        .get(&(rk.clone(), c))
                        .map(|v| cell(v))
                        .unwrap_or_else(|| "—".into()),
                );
            }
            row
        })
        .collect();
    Table {
        title: "Other runs (no published counterpart: other backbone, epochs or loss weights)"
            .into(),
        header,
        rows: trows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn protocol_and_schedule_tags() {
        let tag = |kind: &str, base: &str, params: Value| {
            let k = crate::kind::StageKind::parse(kind).unwrap();
            protocol_of(&crate::stages::table(k).report_facts(&params), base)
        };
        let ade = "ade20k_segmentation";
        assert_eq!(
            tag(ade, "ade20k-upernet", json!({"protocol": "linear"})),
            "ade20k-linear"
        );
        assert_eq!(
            tag(ade, "ade20k-upernet", json!({"protocol": "upernet"})),
            "ade20k-upernet"
        );
        assert_eq!(tag(ade, "ade20k-upernet", json!({})), "ade20k-linear");
        let coco = "coco_detection";
        assert_eq!(
            tag(coco, "coco-maskrcnn", json!({"backbone": "frozen"})),
            "coco-fcos-frozen"
        );
        assert_eq!(
            tag(coco, "coco-maskrcnn", json!({"backbone": "finetune"})),
            "coco-fcos"
        );
        assert_eq!(
            tag("linear_probe", "linear", json!({"head": "bn_linear"})),
            "linear"
        );
        let sched = |v: Value| schedule_of(&ReportFacts::common(&v));
        assert_eq!(sched(json!({"epochs": 50})), "50 ep");
        assert_eq!(sched(json!({"iters": 160000})), "160000 it");
        assert_eq!(sched(json!({})), "-");
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s, n) = mean_std(&[70.0, 72.0, 74.0]);
        assert_eq!((m, n), (72.0, 3));
        assert!((s.unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0]).1, None);
    }
}

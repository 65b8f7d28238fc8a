//! SVG plots of `cjepa report --out`, written by hand (no plotting dependency): loss curves of every
//! pretraining stage from its `series`, collapse monitors when a stage records them, and linear-
//! probe top-1 against pretraining epochs, per backbone (the idea of the C-JEPA paper's Figure 1):
//! over separate runs of each length, or over the snapshots (`at_epoch`) and the final weights of
//! one run, with the published points of that backbone dashed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::baselines::{Baseline, Benchmark, Method, Protocol};
use super::paper::{mean_std, measurements};
use super::runs::IMAGENET_LABEL;
use crate::store::Record;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points (x, y), drawn in x order.
    pub points: Vec<(f64, f64)>,
    /// Dashed line (published reference values).
    pub dashed: bool,
}

/// A plot file.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// File name (`loss_pretrain-method-cjepa_1a2b3c4d.svg`).
    pub file: String,
    /// SVG text.
    pub svg: String,
}

const W: f64 = 860.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 300.0;
/// Legend entries longer than this are cut (with an ellipsis) to fit the legend column.
const LEGEND_CHARS: usize = 44;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// At most this many points per drawn line (longer series are thinned evenly, last point kept).
pub const MAX_POINTS: usize = 2000;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick positions covering [lo, hi] with a 1-2-5 step.
pub fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{}", v as i64)
    } else if v.abs() >= 0.01 {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

fn thin(p: &[(f64, f64)]) -> Vec<(f64, f64)> {
    if p.len() <= MAX_POINTS {
        return p.to_vec();
    }
    let stride = p.len().div_ceil(MAX_POINTS);
    let mut v: Vec<(f64, f64)> = p.iter().step_by(stride).copied().collect();
    if v.last() != p.last() {
        v.push(*p.last().expect("non-empty"));
    }
    v
}

/// A line chart with axes, ticks, grid and legend. Non-finite points are skipped.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), (x, y)| (a.min(*x), b.max(*x), c.min(*y), d.max(*y)),
    );
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6 * y1.abs().max(1.0));
    y0 -= pad;
    y1 += pad;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        LEFT + pw / 2.0,
        esc(title)
    );
    for t in ticks(x0, x1) {
        let x = sx(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            fmt_tick(t)
        );
    }
    for t in ticks(y0, y1) {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let mut p: Vec<(f64, f64)> = se
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        let p = thin(&p);
        let dash = if se.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let path: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.6"{dash} points="{}"/>"#,
            path.join(" ")
        );
        if p.len() <= 30 {
            for (x, y) in &p {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                    sx(*x),
                    sy(*y)
                );
            }
        }
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&legend_text(&se.name))
        );
    }
    s.push_str("</svg>\n");
    s
}

fn legend_text(s: &str) -> String {
    if s.chars().count() <= LEGEND_CHARS {
        s.to_string()
    } else {
        let cut: String = s.chars().take(LEGEND_CHARS - 1).collect();
        format!("{cut}…")
    }
}

fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

/// Whether a series name is a collapse monitor (embedding std, rank, covariance, ...).
pub fn is_collapse_monitor(name: &str) -> bool {
    !name.starts_with("loss")
        && ["std", "rank", "collapse", "cov", "var"]
            .iter()
            .any(|k| name.contains(k))
}

fn series_of(r: &Record, pick: impl Fn(&str) -> bool) -> Vec<Series> {
    r.series
        .iter()
        .filter(|(n, p)| pick(n) && !p.is_empty())
        .map(|(n, p)| Series {
            name: n.clone(),
            points: p.iter().map(|(x, y)| (*x as f64, *y)).collect(),
            dashed: false,
        })
        .collect()
}

/// Every plot the records support.
pub fn plots(records: &[Record], baselines: &[Baseline]) -> Vec<Plot> {
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r.kind == "pretrain") {
        let stem = format!(
            "{}_{}",
            file_part(&r.stage_id),
            &r.key[..8.min(r.key.len())]
        );
        let loss = series_of(r, |n| n.starts_with("loss"));
        if !loss.is_empty() {
            out.push(Plot {
                file: format!("loss_{stem}.svg"),
                svg: line_chart(
                    &format!("{}: training loss", r.stage_id),
                    "step",
                    "loss",
                    &loss,
                ),
            });
        }
        let mon = series_of(r, is_collapse_monitor);
        if !mon.is_empty() {
            out.push(Plot {
                file: format!("collapse_{stem}.svg"),
                svg: line_chart(
                    &format!("{}: collapse monitors", r.stage_id),
                    "step",
                    "value",
                    &mon,
                ),
            });
        }
    }
    out.extend(probe_vs_epochs(records, baselines));
    out
}

/// The run whose snapshots a measurement's line follows: its length, for an evaluation of a
/// snapshot (`at_epoch`) or of the final weights of a run that saves snapshots; `None` for the
/// separate-runs route (one run per length, each its own schedule).
fn one_run(o: &super::runs::Origin) -> Option<u64> {
    o.snapshot_of
        .or_else(|| o.with_snapshots.then_some(o.epochs).flatten())
}

/// Linear-probe top-1 against pretraining epochs, one plot per backbone
/// (`probe_vs_epochs_<arch>.svg`): one line per (method, probe schedule, data set, route), seeds
/// averaged; drawn for a backbone when one of its lines has two or more epoch values. Two routes:
/// separate runs of each length (a point per run), or one run's snapshots (`snapshot_epochs`,
/// probed with `at_epoch: k`, a point at k) plus its final weights (`one <n>-ep run` in the
/// legend). A line probed on synthetic data ends its legend with `, synth`, one on another data
/// set than ImageNet-1K with `, on <data set>`. The published ImageNet linear numbers of that
/// backbone are added as dashed lines.
pub fn probe_vs_epochs(records: &[Record], baselines: &[Baseline]) -> Vec<Plot> {
    // (method label, probe schedule, data set suffix, one run's length) -> pretraining epochs ->
    // top-1 of each seed
    type Lines = BTreeMap<(String, String, String, Option<u64>), BTreeMap<u64, Vec<f64>>>;
    let mut by_arch: BTreeMap<(String, String), Lines> = BTreeMap::new();
    for m in measurements(records) {
        if m.benchmark != Benchmark::Imagenet || m.protocol != "linear" {
            continue;
        }
        let Some(e) = m.origin.epochs else { continue };
        let data = match m.classification_dataset() {
            _ if m.synth => ", synth".to_string(),
            Some(d) if d != IMAGENET_LABEL => format!(", on {d}"),
            _ => String::new(),
        };
        by_arch
            .entry((m.origin.arch.clone(), m.origin.arch_label.clone()))
            .or_default()
            .entry((
                m.origin.method_label.clone(),
                m.schedule.clone(),
                data,
                one_run(&m.origin),
            ))
            .or_default()
            .entry(e)
            .or_default()
            .push(m.value);
    }
    let mut out = Vec::new();
    for ((arch, arch_label), lines) in by_arch {
        if !lines.values().any(|l| l.len() >= 2) {
            continue;
        }
        let mut series: Vec<Series> = lines
            .iter()
            .map(|((method, sched, data, run), pts)| Series {
                name: format!(
                    "{method}, probe {sched}{}{}",
                    run.map_or(String::new(), |n| format!(", one {n}-ep run")),
                    data
                ),
                points: pts
                    .iter()
                    .map(|(e, v)| (*e as f64, mean_std(v).0))
                    .collect(),
                dashed: false,
            })
            .collect();
        let mut published: BTreeMap<Method, BTreeMap<u32, f64>> = BTreeMap::new();
        for b in baselines {
            if b.benchmark == Benchmark::Imagenet
                && b.protocol == Protocol::Linear
                && b.arch == arch
            {
                published
                    .entry(b.method)
                    .or_default()
                    .entry(b.epochs)
                    .or_insert(b.value);
            }
        }
        for (method, pts) in published {
            series.push(Series {
                name: format!("{} (paper)", method.label()),
                points: pts.iter().map(|(e, v)| (*e as f64, *v)).collect(),
                dashed: true,
            });
        }
        out.push(Plot {
            file: format!("probe_vs_epochs_{}.svg", file_part(&arch)),
            svg: line_chart(
                &format!(
                    "Linear probe top-1 vs pretraining epochs, {arch_label} (paper: ImageNet-1K)"
                ),
                "pretraining epochs",
                "top-1 (%)",
                &series,
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(63.1, 74.2);
        assert!(t.iter().all(|v| *v >= 63.1 && *v <= 74.2), "{t:?}");
        assert!(t.len() >= 3);
    }

    #[test]
    fn chart_is_svg_with_one_line_per_series() {
        let s = line_chart(
            "a < b",
            "x",
            "y",
            &[
                Series {
                    name: "one".into(),
                    points: vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)],
                    dashed: false,
                },
                Series {
                    name: "two".into(),
                    points: vec![(0.0, 2.0)],
                    dashed: true,
                },
            ],
        );
        assert!(s.starts_with("<svg"));
        assert!(s.contains("a &lt; b"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("stroke-dasharray"));
        assert!(!s.contains("NaN"));
    }

    #[test]
    fn long_series_are_thinned() {
        let p: Vec<(f64, f64)> = (0..10_001).map(|i| (i as f64, 1.0)).collect();
        let t = thin(&p);
        assert!(t.len() <= MAX_POINTS + 1);
        assert_eq!(t.last(), p.last());
    }
}

//! Plots of `cjepa report`, drawn with the `plotters` crate as SVG and as PNG: loss curves of
//! every pretraining stage from its `series`, its collapse monitors (target std, effective rank:
//! one panel per unit), and linear-probe top-1 against pretraining epochs, per backbone (the idea
//! of the C-JEPA paper's Figure 1): over separate runs of each length, or over the snapshots
//! (`at_epoch`) and the final weights of one run, with the published points of that backbone
//! dashed. Each panel has its legend in a column of its own, right of the axes, so that no entry
//! covers a line. PNG text is drawn with DejaVu Sans, embedded in the binary (no system fonts).

use std::collections::BTreeMap;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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

/// Axes of their own inside a chart, with the lines that share one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Y axis label, with its unit.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// A chart: a title over one or more panels stacked vertically, on one x axis quantity.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label, with its unit.
    pub x_label: String,
    /// Panels, top to bottom.
    pub panels: Vec<Panel>,
}

/// A plot: a chart and the file name it is written under (`.svg` and `.png`).
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// File name without extension (`loss_pretrain-method-cjepa_1a2b3c4d`).
    pub stem: String,
    /// What is drawn.
    pub chart: Chart,
}

impl Plot {
    /// `<stem>.svg`.
    pub fn svg_file(&self) -> String {
        format!("{}.svg", self.stem)
    }

    /// `<stem>.png`.
    pub fn png_file(&self) -> String {
        format!("{}.png", self.stem)
    }

    /// The chart as SVG text.
    pub fn svg(&self) -> Result<String, PlotError> {
        svg(&self.chart)
    }

    /// The chart as a PNG file, `scale` times the SVG's size in pixels (2 for print and for
    /// high-density screens).
    pub fn png(&self, scale: u32) -> Result<Vec<u8>, PlotError> {
        png(&self.chart, scale)
    }
}

/// A chart that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw plot {title:?}: {msg}")]
pub struct PlotError {
    title: String,
    msg: String,
}

/// Width of a chart (SVG pixels).
pub const WIDTH: u32 = 900;
/// Height of one panel.
const PANEL_H: u32 = 330;
/// Height of the title band.
const TITLE_H: u32 = 36;
/// Width of the legend column right of each panel.
const LEGEND_W: u32 = 300;
/// Legend entries longer than this are cut (with an ellipsis) to fit the legend column.
const LEGEND_CHARS: usize = 40;
const COLOURS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];
/// At most this many points per drawn line (longer series are thinned evenly, last point kept).
pub const MAX_POINTS: usize = 2000;
/// Lines of at most this many points also get a marker at each point.
const MARKED_POINTS: usize = 30;
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The font behind plotters' `sans-serif`, registered once per process.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the embedded file is a valid font (the tests draw with it)
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Pixel size of a chart at scale 1.
pub fn size(chart: &Chart) -> (u32, u32) {
    (WIDTH, TITLE_H + PANEL_H * chart.panels.len().max(1) as u32)
}

/// The chart as SVG text (text in `sans-serif`, to the viewer's fonts).
pub fn svg(chart: &Chart) -> Result<String, PlotError> {
    register_font();
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, size(chart)).into_drawing_area();
        draw(&root, chart, 1).map_err(|msg| err(chart, msg))?;
    }
    Ok(inline_text(&s))
}

/// plotters writes a text element over three lines (tag, text, end tag): one line each, so that
/// the text sits between `>` and `<` as in any other SVG.
fn inline_text(svg: &str) -> String {
    let mut out = String::with_capacity(svg.len());
    let mut lines = svg.lines();
    while let Some(l) = lines.next() {
        out.push_str(l);
        if l.starts_with("<text") && l.ends_with('>') {
            let rest: Vec<&str> = lines.by_ref().take(2).collect();
            match rest[..] {
                [t, "</text>"] => {
                    out.push_str(t);
                    out.push_str("</text>");
                }
                _ => {
                    for r in rest {
                        out.push('\n');
                        out.push_str(r);
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}

/// The chart as PNG, `scale` (1 to 4) times its SVG size, text in the embedded DejaVu Sans.
pub fn png(chart: &Chart, scale: u32) -> Result<Vec<u8>, PlotError> {
    register_font();
    let k = scale.clamp(1, 4);
    let (w, h) = size(chart);
    let (w, h) = (w * k, h * k);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        draw(&root, chart, k).map_err(|msg| err(chart, msg))?;
    }
    let img =
        image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| err(chart, "buffer size".into()))?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| err(chart, e.to_string()))?;
    Ok(out.into_inner())
}

fn err(chart: &Chart, msg: String) -> PlotError {
    PlotError {
        title: chart.title.clone(),
        msg,
    }
}

/// A single-panel chart as SVG text.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<String, PlotError> {
    svg(&Chart {
        title: title.into(),
        x_label: x_label.into(),
        panels: vec![Panel {
            y_label: y_label.into(),
            series: series.to_vec(),
        }],
    })
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

/// A series' finite points in x order, thinned to [`MAX_POINTS`].
fn drawn_points(s: &Series) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = s
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    thin(&p)
}

/// The ranges of a panel: every finite point, y padded by 5%; a unit range when empty.
fn ranges(lines: &[Vec<(f64, f64)>]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let pts = || lines.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = pts().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), (x, y)| (a.min(*x), b.max(*x), c.min(*y), d.max(*y)),
    );
    if pts().next().is_none() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6 * y1.abs().max(1.0));
    (x0..x1, (y0 - pad)..(y1 + pad))
}

fn legend_text(s: &str) -> String {
    if s.chars().count() <= LEGEND_CHARS {
        s.to_string()
    } else {
        let cut: String = s.chars().take(LEGEND_CHARS - 1).collect();
        format!("{cut}…")
    }
}

/// Draws `chart` on `root`, every length times `k`.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    k: u32,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let px = |v: u32| (v * k) as i32;
    let font = |size: u32| ("sans-serif", (size * k) as f64).into_font();
    root.fill(&WHITE).map_err(e)?;
    let (title, body) = root.split_vertically(px(TITLE_H));
    title
        .draw(&Text::new(
            chart.title.clone(),
            (px((WIDTH - LEGEND_W) / 2), px(TITLE_H / 2)),
            TextStyle::from(font(18)).pos(Pos::new(HPos::Center, VPos::Center)),
        ))
        .map_err(e)?;
    let panels = body.split_evenly((chart.panels.len().max(1), 1));
    for (area, panel) in panels.iter().zip(&chart.panels) {
        let (plot_area, legend) = area.split_horizontally(px(WIDTH - LEGEND_W));
        let lines: Vec<Vec<(f64, f64)>> = panel.series.iter().map(drawn_points).collect();
        let (xr, yr) = ranges(&lines);
        let mut c = ChartBuilder::on(&plot_area)
            .margin(px(8))
            .x_label_area_size(px(44))
            .y_label_area_size(px(70))
            .build_cartesian_2d(xr, yr)
            .map_err(e)?;
        c.configure_mesh()
            .x_desc(chart.x_label.as_str())
            .y_desc(panel.y_label.as_str())
            .x_labels(8)
            .y_labels(7)
            .x_label_formatter(&|v| fmt_tick(*v))
            .y_label_formatter(&|v| fmt_tick(*v))
            .label_style(font(14))
            .axis_desc_style(font(15))
            .axis_style(BLACK.stroke_width(k))
            .bold_line_style(RGBColor(0xe0, 0xe0, 0xe0).stroke_width(k))
            .light_line_style(TRANSPARENT)
            .draw()
            .map_err(e)?;
        for (i, (s, pts)) in panel.series.iter().zip(&lines).enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let line = colour.stroke_width(2 * k);
            if s.dashed {
                c.draw_series(DashedLineSeries::new(
                    pts.iter().copied(),
                    px(7),
                    px(5),
                    line,
                ))
                .map_err(e)?;
            } else {
                c.draw_series(LineSeries::new(pts.iter().copied(), line))
                    .map_err(e)?;
            }
            if pts.len() <= MARKED_POINTS {
                c.draw_series(pts.iter().map(|p| Circle::new(*p, px(3), colour.filled())))
                    .map_err(e)?;
            }
            // the legend column: a stroke of the line's style, then its name
            let y = px(18 + 20 * i as u32);
            let (x0, x1) = (px(10), px(38));
            if s.dashed {
                legend
                    .draw(&DashedPathElement::new(
                        vec![(x0, y), (x1, y)],
                        px(7),
                        px(5),
                        line,
                    ))
                    .map_err(e)?;
            } else {
                legend
                    .draw(&PathElement::new(vec![(x0, y), (x1, y)], line))
                    .map_err(e)?;
            }
            legend
                .draw(&Text::new(
                    legend_text(&s.name),
                    (px(46), y),
                    TextStyle::from(font(12)).pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
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

/// X axis of the per-step plots.
pub const STEP_LABEL: &str = "training step (optimiser updates)";

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
                stem: format!("loss_{stem}"),
                chart: Chart {
                    title: format!("{}: training loss", r.stage_id),
                    x_label: STEP_LABEL.into(),
                    panels: vec![Panel {
                        y_label: "loss (unitless)".into(),
                        series: loss,
                    }],
                },
            });
        }
        let (rank, spread): (Vec<Series>, Vec<Series>) = series_of(r, is_collapse_monitor)
            .into_iter()
            .partition(|s| s.name.contains("rank"));
        let mut panels = Vec::new();
        if !spread.is_empty() {
            panels.push(Panel {
                y_label: "std of target features (unitless)".into(),
                series: spread,
            });
        }
        if !rank.is_empty() {
            panels.push(Panel {
                y_label: "effective rank (dimensions)".into(),
                series: rank,
            });
        }
        if !panels.is_empty() {
            out.push(Plot {
                stem: format!("collapse_{stem}"),
                chart: Chart {
                    title: format!("{}: collapse monitors", r.stage_id),
                    x_label: STEP_LABEL.into(),
                    panels,
                },
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
/// (`probe_vs_epochs_<arch>`): one line per (method, probe schedule, data set, route), seeds
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
            stem: format!("probe_vs_epochs_{}", file_part(&arch)),
            chart: Chart {
                title: format!(
                    "Linear probe top-1 vs pretraining epochs, {arch_label} (paper: ImageNet-1K)"
                ),
                x_label: "pretraining epochs".into(),
                panels: vec![Panel {
                    y_label: "linear-probe top-1 (%)".into(),
                    series,
                }],
            },
        });
    }
    out
}

#[cfg(test)]
mod tests;

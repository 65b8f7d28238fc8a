//! The report as one self-contained HTML page (`cjepa report --html FILE`): inline CSS, the
//! plots as PNG data URIs, the DAG as inline SVG and a few lines of inline script that sort a
//! table by the clicked column. Nothing is loaded from the network. Sections: the stages (DAG
//! with each stage's state and key, then a table with why), the tail of each failed stage's log,
//! the paper's tables with the published numbers, the stored metrics (one sortable table per
//! stage kind), the training curves and collapse monitors of each pretraining stage, and the
//! convergence plot (linear probe against pretraining epochs).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;

use super::paper::PaperTable;
use super::plots::{Plot, PlotError};
use super::state::{log_tail, StageState, State};
use super::table::{metrics_tables_by_kind, Table};
use crate::plan::Plan;
use crate::store::Record;

/// Lines of a failed stage's log shown.
pub const LOG_TAIL_LINES: usize = 40;
/// PNG plots are drawn at this multiple of their CSS size (sharp on high-density screens).
const PNG_SCALE: u32 = 2;

/// What the page shows.
pub struct Page<'a> {
    /// Heading (the pipeline's name, or `stored runs`).
    pub title: &'a str,
    /// Store folder, shown under the heading.
    pub store: &'a str,
    /// The plan, when the report is of one pipeline (for the DAG).
    pub plan: Option<&'a Plan>,
    /// The state of each stage of `plan`.
    pub states: &'a [StageState],
    /// The paper's tables.
    pub paper: &'a [PaperTable],
    /// The records the report covers.
    pub records: &'a [Record],
    /// The plots of those records.
    pub plots: &'a [Plot],
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = r#"
body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; margin: 24px auto;
  max-width: 1200px; padding: 0 16px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
.sub { color: #666; margin-top: 4px; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: bold; padding: 1px 6px; border-radius: 3px; color: #fff; }
.state-fresh { background: #2e8b3e; } .state-stale { background: #c58a00; }
.state-missing { background: #888; } .state-failed { background: #c62828; }
.state-running { background: #1f66b4; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.85em; }
pre.log { background: #1e1e1e; color: #eee; padding: 8px; overflow-x: auto; max-height: 40em; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; margin: 6px 0; }
.note { color: #666; font-style: italic; }
"#;

/// Sorts a `table.sortable` by the clicked header: numbers by value (the number a cell starts
/// with), other cells as text; a second click reverses.
const SCRIPT: &str = r#"
document.querySelectorAll("table.sortable").forEach(function (t) {
  t.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      t.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (r) { var s = r.cells[col].textContent.trim(), n = parseFloat(s);
        return isNaN(n) ? [1, s] : [0, n]; };
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        var c = x[0] - y[0] || (x[1] < y[1] ? -1 : x[1] > y[1] ? 1 : 0);
        return asc ? c : -c; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"#;

/// The page.
pub fn render(p: &Page) -> Result<String, PlotError> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t} — cjepa report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>{t}</h1>\n<p class=\"sub\">cjepa report · store <code>{s}</code> · {n} records</p>\n",
        t = esc(p.title),
        s = esc(p.store),
        n = p.records.len()
    );
    h.push_str(
        "<nav><a href=\"#stages\">Stages</a><a href=\"#failed\">Failed stages</a>\
         <a href=\"#paper\">Paper tables</a><a href=\"#metrics\">Stored metrics</a>\
         <a href=\"#training\">Training</a><a href=\"#convergence\">Convergence</a></nav>\n",
    );
    stages(&mut h, p);
    failed(&mut h, p);
    h.push_str("<section id=\"paper\">\n<h2>Paper tables</h2>\n");
    if p.paper.is_empty() {
        h.push_str("<p class=\"note\">No paper table: no stored pretraining run.</p>\n");
    }
    for t in p.paper {
        table(&mut h, &t.table, false, &t.slug);
    }
    h.push_str("</section>\n<section id=\"metrics\">\n<h2>Stored metrics</h2>\n");
    h.push_str("<p class=\"note\">One table per stage kind; click a column to sort.</p>\n");
    let by_kind = metrics_tables_by_kind(p.records);
    if by_kind.is_empty() {
        h.push_str("<p class=\"note\">No stored metrics.</p>\n");
    }
    for (kind, t) in &by_kind {
        table(&mut h, t, true, &format!("metrics-{kind}"));
    }
    h.push_str("</section>\n");
    training(&mut h, p)?;
    h.push_str("<section id=\"convergence\">\n<h2>Convergence</h2>\n");
    let conv: Vec<&Plot> = p
        .plots
        .iter()
        .filter(|pl| pl.stem.starts_with("probe_vs_epochs"))
        .collect();
    if conv.is_empty() {
        h.push_str(
            "<p class=\"note\">No convergence plot: it needs linear-probe results of two or \
             more pretraining lengths (separate runs, or snapshots of one run).</p>\n",
        );
    }
    for pl in conv {
        img(&mut h, pl)?;
    }
    let _ = write!(
        h,
        "</section>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    );
    Ok(h)
}

fn badge(s: State) -> String {
    format!("<span class=\"state state-{0}\">{0}</span>", s.as_str())
}

fn stages(h: &mut String, p: &Page) {
    h.push_str("<section id=\"stages\">\n<h2>Stages</h2>\n");
    let Some(plan) = p.plan else {
        h.push_str(
            "<p class=\"note\">No pipeline given: the stage states need one.</p>\n</section>\n",
        );
        return;
    };
    let mut counts: BTreeMap<State, usize> = BTreeMap::new();
    for s in p.states {
        *counts.entry(s.state).or_default() += 1;
    }
    let summary: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{n} {}", badge(*s)))
        .collect();
    let _ = writeln!(h, "<p>{}</p>", summary.join(" · "));
    h.push_str(&dag_svg(plan, p.states));
    h.push_str(
        "<table class=\"sortable\" id=\"stage-table\"><thead><tr><th>stage</th><th>kind</th>\
         <th>needs</th><th>state</th><th>key</th><th>why</th></tr></thead><tbody>\n",
    );
    for st in p.states {
        let s = &plan.stages[st.index];
        let needs: Vec<String> = s
            .inst
            .upstream
            .iter()
            .map(|(_, u)| esc(&plan.stages[*u].inst.id))
            .collect();
        let mut why = st.why.iter().map(|w| esc(w)).collect::<Vec<_>>();
        if let Some(pr) = &st.progress {
            why.push(format!("step {}/{} {}", pr.step, pr.total, esc(&pr.msg)));
        }
        if let Some(c) = st.checkpoint {
            why.push(format!("checkpoint at step {c}"));
        }
        let _ = writeln!(
            h,
            "<tr data-state=\"{state}\"><td>{id}</td><td>{kind}</td><td>{needs}</td>\
             <td>{badge}</td><td><code title=\"{key}\">{short}</code></td><td>{why}</td></tr>",
            state = st.state.as_str(),
            id = esc(&s.inst.id),
            kind = esc(s.kind.name()),
            needs = needs.join(", "),
            badge = badge(st.state),
            key = esc(&s.key),
            short = esc(&s.key[..12.min(s.key.len())]),
            why = why.join("<br>"),
        );
    }
    h.push_str("</tbody></table>\n</section>\n");
}

/// Fill colour of a state in the DAG.
fn fill(s: State) -> &'static str {
    match s {
        State::Fresh => "#2e8b3e",
        State::Stale => "#c58a00",
        State::Missing => "#888888",
        State::Failed => "#c62828",
        State::Running => "#1f66b4",
    }
}

/// The DAG, upstream on the left: a column per depth, a box per stage with its id, state and
/// key, coloured by state.
pub fn dag_svg(plan: &Plan, states: &[StageState]) -> String {
    const BW: usize = 250;
    const BH: usize = 46;
    const GX: usize = 60;
    const GY: usize = 14;
    let n = plan.stages.len();
    // plan order is upstream first
    let mut depth = vec![0usize; n];
    for i in 0..n {
        depth[i] = plan.stages[i]
            .inst
            .upstream
            .iter()
            .map(|(_, u)| depth[*u] + 1)
            .max()
            .unwrap_or(0);
    }
    let mut row = vec![0usize; n];
    let mut per_col: BTreeMap<usize, usize> = BTreeMap::new();
    for i in 0..n {
        let c = per_col.entry(depth[i]).or_default();
        row[i] = *c;
        *c += 1;
    }
    let cols = per_col.len().max(1);
    let rows = per_col.values().copied().max().unwrap_or(1);
    let (w, ht) = (cols * (BW + GX) - GX + 20, rows * (BH + GY) - GY + 20);
    let pos = |i: usize| (10 + depth[i] * (BW + GX), 10 + row[i] * (BH + GY));
    let state_of: BTreeMap<usize, State> = states.iter().map(|s| (s.index, s.state)).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg class=\"dag\" width=\"{w}\" height=\"{ht}\" \
         viewBox=\"0 0 {w} {ht}\" font-family=\"sans-serif\" font-size=\"12\" role=\"img\" \
         aria-label=\"pipeline DAG\">"
    );
    for i in 0..n {
        for (_, u) in &plan.stages[i].inst.upstream {
            let ((ux, uy), (x, y)) = (pos(*u), pos(i));
            let _ = writeln!(
                s,
                "<path d=\"M{} {} C{} {} {} {} {} {}\" fill=\"none\" stroke=\"#999\" \
                 stroke-width=\"1.5\"/>",
                ux + BW,
                uy + BH / 2,
                ux + BW + GX / 2,
                uy + BH / 2,
                x - GX / 2,
                y + BH / 2,
                x,
                y + BH / 2
            );
        }
    }
    for (i, st) in plan.stages.iter().enumerate() {
        let (x, y) = pos(i);
        let state = state_of.get(&i).copied().unwrap_or(State::Missing);
        let id: String = if st.inst.id.chars().count() > 34 {
            st.inst.id.chars().take(33).collect::<String>() + "…"
        } else {
            st.inst.id.clone()
        };
        let _ = writeln!(
            s,
            "<g class=\"node\" data-state=\"{state}\"><title>{full} ({state}, key {key})</title>\
             <rect x=\"{x}\" y=\"{y}\" width=\"{BW}\" height=\"{BH}\" rx=\"6\" fill=\"{f}\" \
             fill-opacity=\"0.15\" stroke=\"{f}\" stroke-width=\"2\"/>\
             <text x=\"{tx}\" y=\"{ty1}\" font-weight=\"bold\">{id}</text>\
             <text x=\"{tx}\" y=\"{ty2}\" fill=\"{f}\">{state} · {short}</text></g>",
            state = state.as_str(),
            full = esc(&st.inst.id),
            key = esc(&st.key),
            f = fill(state),
            tx = x + 8,
            ty1 = y + 19,
            ty2 = y + 37,
            id = esc(&id),
            short = esc(&st.key[..12.min(st.key.len())]),
        );
    }
    s.push_str("</svg>\n");
    s
}

fn failed(h: &mut String, p: &Page) {
    h.push_str("<section id=\"failed\">\n<h2>Failed stages</h2>\n");
    let failed: Vec<&StageState> = p
        .states
        .iter()
        .filter(|s| s.state == State::Failed)
        .collect();
    if failed.is_empty() {
        h.push_str("<p class=\"note\">No failed stage.</p>\n");
    }
    for st in failed {
        let id = p
            .plan
            .map(|pl| pl.stages[st.index].inst.id.clone())
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "<div class=\"failed-stage\"><h3>{}</h3>\n<p>{}</p>",
            esc(&id),
            esc(&st.why.join("; "))
        );
        match &st.log {
            Some(path) => match log_tail(path, LOG_TAIL_LINES, 64 * 1024) {
                Ok(lines) => {
                    let _ = writeln!(
                        h,
                        "<p class=\"note\">Last {} lines of <code>{}</code>:</p>\n<pre class=\"log\">{}</pre>",
                        lines.len(),
                        esc(&path.display().to_string()),
                        esc(&lines.join("\n"))
                    );
                }
                Err(e) => {
                    let _ = writeln!(
                        h,
                        "<p class=\"note\">log unreadable: {}</p>",
                        esc(&e.to_string())
                    );
                }
            },
            None => h.push_str("<p class=\"note\">No stage log in its work folder.</p>\n"),
        }
        h.push_str("</div>\n");
    }
    h.push_str("</section>\n");
}

fn is_number(s: &str) -> bool {
    s.trim().parse::<f64>().is_ok()
}

fn table(h: &mut String, t: &Table, sortable: bool, id: &str) {
    let _ = writeln!(h, "<h3>{}</h3>", esc(&t.title));
    let _ = write!(
        h,
        "<table id=\"{}\"{}><thead><tr>",
        esc(id),
        if sortable { " class=\"sortable\"" } else { "" }
    );
    for c in &t.header {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr></thead><tbody>\n");
    for r in &t.rows {
        h.push_str("<tr>");
        for c in r {
            let class = if is_number(c) { " class=\"num\"" } else { "" };
            let _ = write!(h, "<td{class}>{}</td>", esc(c));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody></table>\n");
}

fn img(h: &mut String, p: &Plot) -> Result<(), PlotError> {
    let png = p.png(PNG_SCALE)?;
    let (w, ht) = super::plots::size(&p.chart);
    let _ = writeln!(
        h,
        "<figure id=\"plot-{stem}\"><img class=\"plot\" width=\"{w}\" height=\"{ht}\" alt=\"{alt}\" \
         src=\"data:image/png;base64,{data}\"></figure>",
        stem = esc(&p.stem),
        alt = esc(&p.chart.title),
        data = base64::engine::general_purpose::STANDARD.encode(png)
    );
    Ok(())
}

fn training(h: &mut String, p: &Page) -> Result<(), PlotError> {
    h.push_str("<section id=\"training\">\n<h2>Training</h2>\n");
    let pre: Vec<&Record> = p.records.iter().filter(|r| r.kind == "pretrain").collect();
    if pre.is_empty() {
        h.push_str("<p class=\"note\">No stored pretraining run.</p>\n");
    }
    for r in pre {
        let short = &r.key[..8.min(r.key.len())];
        let _ = writeln!(
            h,
            "<div class=\"pretrain\" id=\"train-{}\"><h3>{} <code>{}</code></h3>",
            esc(short),
            esc(&r.stage_id),
            esc(short)
        );
        let mine = |prefix: &str, pl: &&Plot| {
            pl.stem.starts_with(prefix) && pl.stem.ends_with(&format!("_{short}"))
        };
        for pl in p.plots.iter().filter(|pl| mine("loss_", pl)) {
            img(h, pl)?;
        }
        for pl in p.plots.iter().filter(|pl| mine("collapse_", pl)) {
            img(h, pl)?;
        }
        if !r.series.keys().any(|n| n.contains("rank")) {
            h.push_str(
                "<p class=\"note\">Effective rank: not recorded by this run (older runs log \
                 the target std only).</p>\n",
            );
        }
        h.push_str("</div>\n");
    }
    h.push_str("</section>\n");
    Ok(())
}

//! A plain table model rendered to markdown (tabled), CSV, JSON or LaTeX.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::Format;
use crate::store::Record;

/// A titled table of strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Title (a heading in markdown, a caption in LaTeX).
    pub title: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Render in a format.
    pub fn render(&self, f: Format) -> String {
        match f {
            Format::Md => self.markdown(),
            Format::Csv => self.csv(),
            Format::Json => serde_json::to_string_pretty(&self.json()).unwrap_or_default(),
            Format::Latex => self.latex(),
        }
    }

    fn markdown(&self) -> String {
        let mut b = tabled::builder::Builder::default();
        b.push_record(self.header.clone());
        for r in &self.rows {
            b.push_record(r.clone());
        }
        let mut t = b.build();
        t.with(tabled::settings::Style::markdown());
        format!("### {}\n\n{t}\n", self.title)
    }

    fn csv(&self) -> String {
        let esc = |s: &String| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.clone()
            }
        };
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            out.push_str(&r.iter().map(esc).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        out
    }

    /// Rows as JSON objects (numbers where a cell parses as one).
    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let mut m = Map::new();
                for (h, c) in self.header.iter().zip(r) {
                    let v = c
                        .parse::<f64>()
                        .ok()
                        .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number));
                    m.insert(h.clone(), v.unwrap_or_else(|| Value::String(c.clone())));
                }
                Value::Object(m)
            })
            .collect();
        serde_json::json!({ "title": self.title, "rows": rows })
    }

    fn latex(&self) -> String {
        let esc = |s: &str| {
            s.replace('\\', "\\textbackslash{}")
                .replace('_', "\\_")
                .replace('%', "\\%")
                .replace('&', "\\&")
                .replace('#', "\\#")
                .replace('^', "\\^{}")
                .replace('±', "$\\pm$")
                .replace('—', "--")
        };
        let mut out = String::from("\\begin{table}[h]\n\\centering\n");
        out.push_str(&format!(
            "\\begin{{tabular}}{{l{}}}\n\\toprule\n",
            "r".repeat(self.header.len().saturating_sub(1))
        ));
        out.push_str(
            &self
                .header
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" & "),
        );
        out.push_str(" \\\\\n\\midrule\n");
        for r in &self.rows {
            out.push_str(&r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" & "));
            out.push_str(" \\\\\n");
        }
        out.push_str(&format!(
            "\\bottomrule\n\\end{{tabular}}\n\\caption{{{}}}\n\\end{{table}}\n",
            esc(&self.title)
        ));
        out
    }
}

/// One row per record (stage instance), one column per metric name.
pub fn metrics_table(title: &str, records: &[Record]) -> Table {
    let names: BTreeSet<&String> = records.iter().flat_map(|r| r.metrics.keys()).collect();
    let mut header = vec!["stage".to_string(), "kind".to_string(), "key".to_string()];
    header.extend(names.iter().map(|s| s.to_string()));
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(records.len());
    for r in records {
        let mut row = vec![
            r.stage_id.clone(),
            r.kind.clone(),
            r.key[..12.min(r.key.len())].to_string(),
        ];
        let m: &BTreeMap<String, f64> = &r.metrics;
        row.extend(
            names
                .iter()
                .map(|n| m.get(*n).map(|v| fmt_num(*v)).unwrap_or_default()),
        );
        rows.push(row);
    }
    Table {
        title: title.to_string(),
        header,
        rows,
    }
}

/// The stored metrics as one table per stage kind (kind order of first appearance), each with
/// only the metrics its kind records: `(kind, table)`.
pub fn metrics_tables_by_kind(records: &[Record]) -> Vec<(String, Table)> {
    let mut kinds: Vec<&str> = Vec::new();
    for r in records {
        if !kinds.contains(&r.kind.as_str()) {
            kinds.push(&r.kind);
        }
    }
    kinds
        .into_iter()
        .map(|k| {
            let of_kind: Vec<Record> = records.iter().filter(|r| r.kind == k).cloned().collect();
            let mut t = metrics_table(k, &of_kind);
            // the kind is the table's title
            t.header.remove(1);
            for r in &mut t.rows {
                r.remove(1);
            }
            (k.to_string(), t)
        })
        .collect()
}

/// Numbers with up to 4 significant decimals, integers bare.
pub fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_formats() {
        let t = Table {
            title: "T_1".into(),
            header: vec!["a".into(), "b".into()],
            rows: vec![vec!["x,y".into(), "1.5".into()]],
        };
        assert!(t.render(Format::Md).contains("| a"));
        assert_eq!(t.render(Format::Csv), "a,b\n\"x,y\",1.5\n");
        assert!(t.render(Format::Json).contains("1.5"));
        assert!(t.render(Format::Latex).contains("T\\_1"));
    }
}

//! DAVIS results: per-object, per-sequence and global values, their JSON form (the layout of the
//! golden `expected.json`) and plain-text / CSV tables like the official `evaluation_method.py`
//! (values are fractions, printed with 3 decimals).

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::eval::segmentation::numpy_sum;

/// Mean / recall / decay of one per-frame series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DavisStats {
    pub mean: f64,
    pub recall: f64,
    pub decay: f64,
}

/// One object of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct DavisObject {
    pub sequence: String,
    pub object_id: u8,
    pub j_per_frame: Vec<f64>,
    pub f_per_frame: Vec<f64>,
    pub j: DavisStats,
    pub f: DavisStats,
}

impl DavisObject {
    /// `"<sequence>_<id>"`, the name the official tables use.
    pub fn name(&self) -> String {
        format!("{}_{}", self.sequence, self.object_id)
    }
}

/// One sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct DavisSequence {
    pub name: String,
    pub height: usize,
    pub width: usize,
    pub n_frames: usize,
    pub n_objects: usize,
    pub bound_pix: usize,
    pub evaluated_frames: Vec<String>,
    pub objects: Vec<DavisObject>,
}

/// Global values: means over all objects of all sequences.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DavisGlobal {
    pub jf_mean: f64,
    pub j_mean: f64,
    pub j_recall: f64,
    pub j_decay: f64,
    pub f_mean: f64,
    pub f_recall: f64,
    pub f_decay: f64,
}

impl DavisGlobal {
    /// `(name, value)` in the official column order.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("J&F-Mean", self.jf_mean),
            ("J-Mean", self.j_mean),
            ("J-Recall", self.j_recall),
            ("J-Decay", self.j_decay),
            ("F-Mean", self.f_mean),
            ("F-Recall", self.f_recall),
            ("F-Decay", self.f_decay),
        ]
    }
}

/// Whole evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct DavisReport {
    pub set: String,
    pub global: DavisGlobal,
    pub sequences: Vec<DavisSequence>,
}

fn mean(v: &[f64]) -> f64 {
    numpy_sum(v) / v.len() as f64
}

fn stats_json(s: &DavisStats) -> Value {
    json!({"mean": s.mean, "recall": s.recall, "decay": s.decay})
}

/// Right-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    let line = |s: &mut String, cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        let _ = writeln!(s, "{}", parts.join("  "));
    };
    line(&mut s, header.to_vec());
    for r in rows {
        line(&mut s, r.iter().map(String::as_str).collect());
    }
    s
}

impl DavisReport {
    /// Aggregate sequences (objects in sequence order, then id order).
    pub fn from_sequences(set: &str, sequences: Vec<DavisSequence>) -> Self {
        let objs: Vec<&DavisObject> = sequences.iter().flat_map(|s| &s.objects).collect();
        let col = |f: fn(&DavisObject) -> f64| mean(&objs.iter().map(|o| f(o)).collect::<Vec<_>>());
        let j_mean = col(|o| o.j.mean);
        let f_mean = col(|o| o.f.mean);
        let global = DavisGlobal {
            jf_mean: (j_mean + f_mean) / 2.0,
            j_mean,
            j_recall: col(|o| o.j.recall),
            j_decay: col(|o| o.j.decay),
            f_mean,
            f_recall: col(|o| o.f.recall),
            f_decay: col(|o| o.f.decay),
        };
        Self {
            set: set.to_string(),
            global,
            sequences,
        }
    }

    /// All objects in the official order (`"<seq>_<id>"` order of `per_object_order`).
    pub fn objects(&self) -> impl Iterator<Item = &DavisObject> {
        self.sequences.iter().flat_map(|s| &s.objects)
    }

    /// JSON in the layout of the golden `expected.json`:
    /// `{"set", "global": {"J&F-Mean", ...}, "sequences": {seq: {..., "objects": {"1": {...}}}},
    /// "per_object_order": [...]}`.
    pub fn to_json(&self) -> Value {
        let mut global = Map::new();
        for (k, v) in self.global.named() {
            global.insert(k.to_string(), json!(v));
        }
        let mut seqs = Map::new();
        for s in &self.sequences {
            let mut objs = Map::new();
            for o in &s.objects {
                objs.insert(
                    o.object_id.to_string(),
                    json!({
                        "J_per_frame": o.j_per_frame,
                        "F_per_frame": o.f_per_frame,
                        "J": stats_json(&o.j),
                        "F": stats_json(&o.f),
                    }),
                );
            }
            seqs.insert(
                s.name.clone(),
                json!({
                    "height": s.height,
                    "width": s.width,
                    "n_frames": s.n_frames,
                    "n_objects": s.n_objects,
                    "bound_pix": s.bound_pix,
                    "evaluated_frames": s.evaluated_frames,
                    "objects": objs,
                }),
            );
        }
        let order: Vec<String> = self.objects().map(DavisObject::name).collect();
        json!({
            "set": self.set,
            "global": global,
            "sequences": seqs,
            "per_object_order": order,
        })
    }

    /// Plain-text global table (the 7 official measures, 3 decimals).
    pub fn global_table(&self) -> String {
        let named = self.global.named();
        let header: Vec<&str> = named.iter().map(|n| n.0).collect();
        let row: Vec<String> = named.iter().map(|n| format!("{:.3}", n.1)).collect();
        format!(
            "Global results for {}\n{}",
            self.set,
            table(&header, &[row])
        )
    }

    /// Plain-text per-object table as the official "per-sequence" results
    /// (`Sequence` = `"<seq>_<id>"`, `J-Mean`, `F-Mean`).
    pub fn sequence_table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .objects()
            .map(|o| {
                vec![
                    o.name(),
                    format!("{:.3}", o.j.mean),
                    format!("{:.3}", o.f.mean),
                ]
            })
            .collect();
        format!(
            "Per sequence results for {}\n{}",
            self.set,
            table(&["Sequence", "J-Mean", "F-Mean"], &rows)
        )
    }

    /// `global_results-<set>.csv` content as the official script writes it.
    pub fn global_csv(&self) -> String {
        let named = self.global.named();
        let h: Vec<&str> = named.iter().map(|n| n.0).collect();
        let v: Vec<String> = named.iter().map(|n| format!("{:.3}", n.1)).collect();
        format!("{}\n{}\n", h.join(","), v.join(","))
    }

    /// `per-sequence_results-<set>.csv` content as the official script writes it.
    pub fn per_sequence_csv(&self) -> String {
        let mut s = String::from("Sequence,J-Mean,F-Mean\n");
        for o in self.objects() {
            let _ = writeln!(s, "{},{:.3},{:.3}", o.name(), o.j.mean, o.f.mean);
        }
        s
    }
}

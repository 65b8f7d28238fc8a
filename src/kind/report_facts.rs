//! What `cjepa report` reads from a stored stage's params, read by the kind that owns them
//! ([`super::Kind::report_facts`]), so the report never indexes params itself. Reads are lenient
//! (a missing or mistyped field is `None`): records written by older versions of a kind still
//! report.

use serde_json::Value;

/// The report's view of one stage's params.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportFacts {
    /// The protocol's name in `registry/baselines` when the params choose one (else the
    /// benchmark's own protocol applies).
    pub protocol: Option<String>,
    /// Schedule length and its unit (`ep`, `it`).
    pub schedule: Option<(f64, &'static str)>,
    /// The encoder a stage reads: `upstream`, `random` or a file.
    pub checkpoint: Option<String>,
    /// The pretraining snapshot epoch a stage probes.
    pub at_epoch: Option<u64>,
    /// Training image side, where the params set one.
    pub img_size: Option<u64>,
    /// A pretraining's method and schedule.
    pub pretrain: Option<PretrainFacts>,
    /// A `dataset` stage's source.
    pub dataset: Option<DatasetFacts>,
}

/// The method of a pretraining run, as its params state it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PretrainFacts {
    /// `ijepa`, `cjepa` or another name.
    pub method: String,
    /// `all`, `var_cov` or `invariance`.
    pub vic_terms: String,
    /// The loss weights `b_vic`, `b_sim`, `b_std`, `b_cov` as written (`None`: the default).
    pub weights: Vec<(&'static str, Option<f64>)>,
    /// Pretraining epochs.
    pub epochs: Option<u64>,
    /// Whether the run writes epoch snapshots.
    pub snapshots: bool,
}

/// Where a `dataset` stage's images come from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatasetFacts {
    /// Generated (`source: synth`).
    pub synth: bool,
    /// Its `path`.
    pub path: Option<String>,
    /// Its `format`.
    pub format: Option<String>,
}

/// Names of the loss weights, in report order.
pub const LOSS_WEIGHTS: [&str; 4] = ["b_vic", "b_sim", "b_std", "b_cov"];

impl ReportFacts {
    /// The fields every kind spells the same way: `protocol`, the schedule (`epochs`, else
    /// `iters`, `max_iters`, `steps`), `checkpoint`, `at_epoch`, `img_size` (or the old `img`).
    pub fn common(params: &Value) -> Self {
        let schedule = [
            ("epochs", "ep"),
            ("iters", "it"),
            ("max_iters", "it"),
            ("steps", "it"),
        ]
        .into_iter()
        .find_map(|(k, unit)| params.get(k)?.as_f64().map(|n| (n, unit)));
        let text = |k: &str| params.get(k)?.as_str().map(str::to_string);
        ReportFacts {
            protocol: text("protocol"),
            schedule,
            checkpoint: text("checkpoint"),
            at_epoch: params.get("at_epoch").and_then(Value::as_u64),
            img_size: params
                .get("img_size")
                .or_else(|| params.get("img"))
                .and_then(Value::as_u64),
            pretrain: None,
            dataset: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn common_fields_and_schedule_order() {
        let f = ReportFacts::common(&json!({"epochs": 50, "iters": 7, "checkpoint": "random",
            "at_epoch": 3, "img": 64, "protocol": "x"}));
        assert_eq!(f.schedule, Some((50.0, "ep")));
        assert_eq!(f.checkpoint.as_deref(), Some("random"));
        assert_eq!((f.at_epoch, f.img_size), (Some(3), Some(64)));
        assert_eq!(f.protocol.as_deref(), Some("x"));
        let f = ReportFacts::common(&json!({"max_iters": 160000, "epochs": "many"}));
        assert_eq!(f.schedule, Some((160000.0, "it")));
        assert_eq!(ReportFacts::common(&json!(null)), ReportFacts::default());
    }
}

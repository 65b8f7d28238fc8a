//! A stage record: status, the pre-hash config (so `status --explain` can say what changed),
//! metrics and series, the artifact manifest, timings and provenance.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Outcome of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Finished; a cache hit if its artifacts are present.
    Succeeded,
    /// Failed (kept for `status`; never a hit).
    Failed,
}

/// One artifact file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    /// Path relative to the artifact folder.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 hex digest.
    pub blake3: String,
}

/// Where and how a record was produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// cjepa version.
    pub version: String,
    /// Git commit of the pipeline's repository, if any.
    pub git_commit: Option<String>,
    /// Device used.
    pub device: String,
    /// Host name.
    pub host: String,
}

/// A stored stage record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Stage key.
    pub key: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Instance id.
    pub stage_id: String,
    /// Kind.
    pub kind: String,
    /// Outcome.
    pub status: Status,
    /// Resolved config.
    pub config: Value,
    /// The exact JSON that was hashed.
    pub key_input: Value,
    /// Scalar metrics.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Metric series.
    #[serde(default)]
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// Small outputs for downstream stages.
    #[serde(default)]
    pub info: Value,
    /// Artifact manifest.
    #[serde(default)]
    pub artifacts: Vec<ArtifactEntry>,
    /// True once `cjepa gc` removed the artifacts (metrics stay).
    #[serde(default)]
    pub artifacts_deleted: bool,
    /// Start time.
    pub started: chrono::DateTime<chrono::Utc>,
    /// End time.
    pub finished: chrono::DateTime<chrono::Utc>,
    /// Wall seconds of the stage itself.
    pub secs: f64,
    /// Error text of a failed stage.
    #[serde(default)]
    pub error: Option<String>,
    /// Provenance.
    #[serde(default)]
    pub provenance: Provenance,
}

impl Provenance {
    /// Provenance of this process for a stage that ran on `device`.
    pub fn here(device: &str, dir: &std::path::Path) -> Self {
        Provenance {
            version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: git_commit(dir),
            device: device.to_string(),
            host: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

fn git_commit(dir: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

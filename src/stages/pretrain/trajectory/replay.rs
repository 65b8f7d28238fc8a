//! What another implementation needs to replay a recorded run, in one folder:
//!
//! - `init.safetensors`: the initial weights of the three networks under their official names
//!   (`encoder.` / `predictor.` / `target_encoder.` prefixed `state_dict` keys, as the golden
//!   weights and `full.safetensors`; the fixed sin-cos position tables are not stored);
//! - `images.f32`: the batches as they enter the networks (cropped and normalised), little-endian
//!   f32, step after step, each `(B, C, H, W)`;
//! - `replay.json`: the method, architecture, loss weights, schedule settings, batch shape,
//!   steps, and the masks of every step (`masks[t].enc[j][b]`, `masks[t].pred[i][b]`: patch
//!   indices of context mask `j` / target mask `i` of image `b`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::json;

use super::record::Setup;
use super::TrajectoryError;
use crate::model::masks::Masks;
use crate::train::schedules::Schedules;

/// The weights file.
pub const INIT_FILE: &str = "init.safetensors";
/// The batches file.
pub const IMAGES_FILE: &str = "images.f32";
/// The description and the masks.
pub const REPLAY_FILE: &str = "replay.json";

/// Writes a replay folder while the run goes.
pub struct ReplayWriter {
    dir: PathBuf,
    images: std::io::BufWriter<fs_err::File>,
    masks: Vec<Masks>,
}

impl ReplayWriter {
    /// Creates `dir` and writes the initial weights.
    pub fn create(dir: &Path, weights: &HashMap<String, Tensor>) -> Result<Self, TrajectoryError> {
        fs_err::create_dir_all(dir)?;
        candle_core::safetensors::save(weights, dir.join(INIT_FILE))?;
        let images = std::io::BufWriter::new(fs_err::File::create(dir.join(IMAGES_FILE))?);
        Ok(Self {
            dir: dir.to_path_buf(),
            images,
            masks: Vec::new(),
        })
    }

    /// Appends one step's batch.
    pub fn push_images(&mut self, data: &[f32]) -> Result<(), TrajectoryError> {
        for v in data {
            self.images.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    }

    /// Appends one step's masks.
    pub fn push_masks(&mut self, masks: Masks) {
        self.masks.push(masks);
    }

    /// Writes `replay.json`; `shape` is one batch's `(B, C, H, W)`.
    pub fn finish(
        mut self,
        setup: &Setup,
        sched: &Schedules,
        iterations_per_epoch: u64,
        shape: [usize; 4],
    ) -> Result<(), TrajectoryError> {
        self.images.flush()?;
        let p = &setup.params;
        let loss = p.loss_config();
        let (w_sim, w_std, w_cov) = loss.term_weights();
        let masks: Vec<_> = self
            .masks
            .iter()
            .map(|m| json!({"enc": m.enc, "pred": m.pred}))
            .collect();
        let doc = json!({
            "method": setup.method_name(),
            "model": setup.model,
            "steps": self.masks.len(),
            "batch_shape": shape,
            "images": IMAGES_FILE,
            "init": INIT_FILE,
            "epochs": p.epochs,
            "iterations_per_epoch": iterations_per_epoch,
            "total_iterations": sched.total_iterations,
            "schedule": p.schedule_config(),
            "loss": {
                "kind": loss.kind,
                "smooth_l1_beta": loss.smooth_l1_beta,
                "target_ln_eps": loss.target_ln_eps,
                "w_sim": w_sim,
                "w_std": w_std,
                "w_cov": w_cov,
                "var_eps": loss.vic_var_eps,
            },
            "adamw": crate::train::optim::AdamWConfig::default(),
            "masks": masks,
        });
        fs_err::write(self.dir.join(REPLAY_FILE), serde_json::to_vec(&doc)?)?;
        Ok(())
    }
}

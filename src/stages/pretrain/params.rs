//! Params of the `pretrain` stage: serde structs with the paper's defaults (METHOD.md §3-§5),
//! `deny_unknown_fields`, and the range checks run when the pipeline is planned.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data::jpeg::Decode;
use crate::data::transforms::{RandomResizedCrop, Transform, IMAGENET_MEAN, IMAGENET_STD};
use crate::model::masks::{MaskConfig, MaskError};
use crate::train::loss::{JepaLossKind, LossConfig, Method, VicTerms};
use crate::train::schedules::{ScheduleConfig, Schedules};

/// Loss section (`loss:`); defaults = C-JEPA (METHOD.md §4). `method: ijepa` zeroes `b_vic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossParams {
    /// JEPA term: `smooth_l1` (official code) or `l2` (paper's formula).
    pub kind: JepaLossKind,
    /// Weight of the whole VICReg block.
    pub b_vic: f64,
    /// Invariance coefficient.
    pub b_sim: f64,
    /// Variance coefficient.
    pub b_std: f64,
    /// Covariance coefficient.
    pub b_cov: f64,
    /// `all`, `var_cov` or `invariance` (C-JEPA Table 3 ablation).
    pub vic_terms: VicTerms,
}

impl Default for LossParams {
    fn default() -> Self {
        let c = LossConfig::default();
        LossParams {
            kind: c.kind,
            b_vic: c.vic_weight,
            b_sim: c.vic_sim_coeff,
            b_std: c.vic_std_coeff,
            b_cov: c.vic_cov_coeff,
            vic_terms: c.vic_terms,
        }
    }
}

/// Mask section (`mask:`): the fields of [`MaskConfig`] (defaults = the paper, `min_keep` 10 as
/// well), plus one explicit rule, off by default: `scale_min_keep: true` scales `min_keep` down to
/// the grid ([`MaskConfig::scaled_for_grid`]). Without it `min_keep` is used as written, and a grid
/// too small for it is refused when planning with the value to write. Written flat (`mask: {
/// min_keep: 3, scale_min_keep: true }`); an unknown key is refused with the valid ones.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "Map<String, Value>")]
pub struct MaskParams {
    /// The sampler's own settings.
    #[serde(flatten)]
    pub sampler: MaskConfig,
    /// Scale `min_keep` by `grid² / 196` (never up) and below the smallest reachable block.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub scale_min_keep: bool,
}

impl TryFrom<Map<String, Value>> for MaskParams {
    type Error = String;

    /// `scale_min_keep`, then the rest as a [`MaskConfig`] (whose unknown-key error then lists
    /// `scale_min_keep` too).
    fn try_from(mut m: Map<String, Value>) -> std::result::Result<Self, String> {
        let scale_min_keep = match m.remove("scale_min_keep") {
            None => false,
            Some(v) => serde_json::from_value(v).map_err(|e| format!("`scale_min_keep`: {e}"))?,
        };
        let sampler = serde_json::from_value(Value::Object(m)).map_err(|e| {
            e.to_string().replacen(
                ", expected one of ",
                ", expected one of `scale_min_keep`, ",
                1,
            )
        })?;
        Ok(MaskParams {
            sampler,
            scale_min_keep,
        })
    }
}

impl MaskParams {
    /// The sampler settings for a `grid x grid` patch grid.
    pub fn config(&self, grid: usize) -> std::result::Result<MaskConfig, MaskError> {
        let c = self.sampler.clone();
        if self.scale_min_keep {
            c.scaled_for_grid(grid, grid)
        } else {
            c.validate(grid, grid).map(|_| c)
        }
    }
}

/// Params of a `pretrain` stage. Defaults = the paper (ViT-B/16 600-epoch run, METHOD.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// `ijepa` or `cjepa`.
    pub method: Method,
    /// Loss terms and coefficients.
    pub loss: LossParams,
    /// Epochs (sets the schedules' length).
    pub epochs: u64,
    /// Global batch size.
    #[serde(alias = "batch")]
    pub batch_size: usize,
    /// Training image side; overrides `model.img_size`.
    #[serde(alias = "img")]
    pub img_size: Option<usize>,
    /// Patch side; overrides `model.patch_size`.
    #[serde(alias = "patch")]
    pub patch_size: Option<usize>,
    /// Peak learning rate (end of warmup).
    pub lr: f64,
    /// Learning rate the warmup starts from.
    pub start_lr: f64,
    /// Learning rate at the end of the cosine.
    pub final_lr: f64,
    /// Warmup epochs (may be fractional).
    pub warmup_epochs: f64,
    /// Weight decay at the start of its cosine.
    pub wd: f64,
    /// Weight decay at the end.
    pub final_wd: f64,
    /// EMA momentum start and end.
    pub ema: [f64; 2],
    /// Horizon of the schedules relative to the training length.
    pub ipe_scale: f64,
    /// Clip the global gradient norm to this value (none by default, like the paper).
    pub clip_grad: Option<f64>,
    /// Multi-block masking.
    pub mask: MaskParams,
    /// RandomResizedCrop area range.
    pub crop_scale: [f64; 2],
    /// Split of the dataset to train on.
    pub split: String,
    /// Stop after this many steps (schedules still follow `epochs`); for quick runs.
    pub max_steps: Option<u64>,
    /// Checkpoint every N steps (0: by time only). Not hashed.
    pub checkpoint_every: u64,
    /// Checkpoint every N seconds. Not hashed.
    pub checkpoint_secs: u64,
    /// Log loss terms every N steps (also the last step). Not hashed.
    pub log_every: u64,
    /// Save the target encoder at the end of these epochs (each in `1..epochs`, increasing) as
    /// artifacts `snapshots/epoch-<k>/` for evaluation stages with `at_epoch: k`. Hashed when
    /// not empty (the artifacts differ); empty leaves the keys of existing runs unchanged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshot_epochs: Vec<u64>,
    /// How the training JPEGs are decoded: `exact` (whole image at full size, the default) or
    /// `scaled` (only the crop's region, at a 1/2, 1/4 or 1/8 DCT scale when the crop stays at
    /// least `img` pixels; faster, pixels within a few units). Hashed only when `scaled`, so an
    /// explicit `exact` keeps the key of a stage without the field.
    #[serde(skip_serializing_if = "Decode::is_exact")]
    pub decode: Decode,
}

impl Default for Params {
    fn default() -> Self {
        let s = ScheduleConfig::default();
        Params {
            method: Method::Cjepa,
            loss: LossParams::default(),
            epochs: 600,
            batch_size: 2048,
            img_size: None,
            patch_size: None,
            lr: s.ref_lr,
            start_lr: s.start_lr,
            final_lr: s.final_lr,
            warmup_epochs: s.warmup_epochs,
            wd: s.ref_wd,
            final_wd: s.final_wd,
            ema: s.ema,
            ipe_scale: s.ipe_scale,
            clip_grad: None,
            mask: MaskParams::default(),
            crop_scale: [0.3, 1.0],
            split: "train".into(),
            max_steps: None,
            checkpoint_every: 0,
            checkpoint_secs: 300,
            log_every: 10,
            snapshot_epochs: Vec::new(),
            decode: Decode::Exact,
        }
    }
}

impl Params {
    /// The loss settings.
    pub fn loss_config(&self) -> LossConfig {
        LossConfig {
            method: self.method,
            kind: self.loss.kind,
            vic_weight: self.loss.b_vic,
            vic_sim_coeff: self.loss.b_sim,
            vic_std_coeff: self.loss.b_std,
            vic_cov_coeff: self.loss.b_cov,
            vic_terms: self.loss.vic_terms,
            ..LossConfig::default()
        }
    }

    /// The schedule settings.
    pub fn schedule_config(&self) -> ScheduleConfig {
        ScheduleConfig {
            start_lr: self.start_lr,
            ref_lr: self.lr,
            final_lr: self.final_lr,
            warmup_epochs: self.warmup_epochs,
            ref_wd: self.wd,
            final_wd: self.final_wd,
            ema: self.ema,
            ipe_scale: self.ipe_scale,
        }
    }

    /// The pretraining augmentation: RandomResizedCrop(img, crop_scale), no flip, ImageNet norm.
    pub fn transform(&self, img: usize) -> Transform {
        Transform::RandomResizedCrop {
            rrc: RandomResizedCrop {
                scale: (self.crop_scale[0], self.crop_scale[1]),
                ..RandomResizedCrop::new(img as u32)
            },
            hflip: 0.0,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Range checks that need no model or data; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = [
            ("epochs", self.epochs as f64),
            ("batch_size", self.batch_size as f64),
            ("log_every", self.log_every as f64),
            ("img_size", self.img_size.unwrap_or(1) as f64),
            ("patch_size", self.patch_size.unwrap_or(1) as f64),
            ("max_steps", self.max_steps.unwrap_or(1) as f64),
            ("clip_grad", self.clip_grad.unwrap_or(1.0)),
        ];
        for (f, v) in pos {
            if v.is_nan() || v <= 0.0 {
                return Err(format!("`{f}` must be > 0 (got {v})"));
            }
        }
        let [a, b] = self.crop_scale;
        if !(a > 0.0 && a <= b && b <= 1.0) {
            return Err(format!(
                "`crop_scale` must be [min, max] with 0 < min <= max <= 1 (got [{a}, {b}])"
            ));
        }
        let mut prev = 0;
        for &k in &self.snapshot_epochs {
            if k == 0 || k >= self.epochs {
                return Err(format!(
                    "`snapshot_epochs`: epoch {k} must lie between 1 and {} (the weights after all \
                     {} epochs are the stage's own encoder artifacts)",
                    self.epochs.saturating_sub(1),
                    self.epochs
                ));
            }
            if k <= prev {
                return Err(format!(
                    "`snapshot_epochs` must be increasing without repeats (got {:?})",
                    self.snapshot_epochs
                ));
            }
            prev = k;
        }
        if self.split.is_empty() {
            return Err("`split` must name a folder of the dataset (e.g. `train`)".into());
        }
        self.loss_config()
            .validate()
            .map_err(|e| format!("{e} (keys `loss.b_*`)"))?;
        Schedules::from_config(&self.schedule_config(), 1, 1).map_err(|e| e.to_string())?;
        let (_, w_std, w_cov) = self.loss_config().term_weights();
        if self.batch_size < 2 && (w_std != 0.0 || w_cov != 0.0) {
            return Err(
                "`batch_size` must be >= 2 for the VICReg variance / covariance terms".into(),
            );
        }
        Ok(())
    }
}

/// Validate params (unknown keys rejected, ranges checked) and fill in the defaults.
pub fn resolve(params: &Map<String, Value>) -> std::result::Result<Value, String> {
    let v = crate::stages::resolve::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.validate()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::masks::MaskSampler;
    use serde_json::json;

    #[test]
    fn empty_params_are_the_paper_defaults() {
        let p: Params = serde_json::from_value(json!({})).unwrap();
        assert_eq!(p, Params::default());
        assert_eq!(p.loss_config(), LossConfig::cjepa());
        assert_eq!(p.schedule_config(), ScheduleConfig::default());
        p.validate().unwrap();
        let back: Params = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn unknown_and_bad_fields_are_named() {
        let e = resolve(json!({"epoch": 3}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("epoch"), "{e}");
        let e = resolve(json!({"loss": {"b_vik": 1}}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("b_vik"), "{e}");
        let e = resolve(json!({"crop_scale": [0.5, 0.2]}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("crop_scale"), "{e}");
        let e = resolve(json!({"batch": 1}).as_object().unwrap()).unwrap_err();
        assert!(e.contains("batch"), "{e}");
        let ok = resolve(json!({"batch": 1, "method": "ijepa"}).as_object().unwrap()).unwrap();
        assert_eq!(ok["loss"]["b_vic"], json!(0.001));
        let v = resolve(
            json!({"loss": {"vic_terms": "var_cov", "kind": "l2"}})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        let p: Params = serde_json::from_value(v).unwrap();
        assert_eq!(
            p.loss_config().term_weights(),
            (0.0, 0.001 * 25.0, 0.001 * 1.0)
        );
        assert_eq!(p.loss_config().kind, JepaLossKind::L2);
    }

    #[test]
    fn snapshot_epochs_are_checked_and_omitted_when_empty() {
        let ok = |v: Value| resolve(v.as_object().unwrap());
        let v = ok(json!({"epochs": 10, "snapshot_epochs": [2, 5, 9]})).unwrap();
        assert_eq!(v["snapshot_epochs"], json!([2, 5, 9]));
        for bad in [
            json!({"epochs": 10, "snapshot_epochs": [0]}),
            json!({"epochs": 10, "snapshot_epochs": [10]}),
            json!({"epochs": 10, "snapshot_epochs": [12]}),
            json!({"epochs": 10, "snapshot_epochs": [5, 2]}),
            json!({"epochs": 10, "snapshot_epochs": [2, 2]}),
        ] {
            let e = ok(bad.clone()).unwrap_err();
            assert!(e.contains("snapshot_epochs"), "{bad}: {e}");
        }
        let e = ok(json!({"epochs": 10, "snapshot_epochs": [12]})).unwrap_err();
        assert!(e.contains("between 1 and 9"), "{e}");
        // An empty list is not serialised: the resolved params (and so the keys of existing
        // runs) are those of a stage without the field.
        let none = ok(json!({"epochs": 10})).unwrap();
        assert!(none.get("snapshot_epochs").is_none(), "{none}");
        assert_eq!(
            ok(json!({"epochs": 10, "snapshot_epochs": []})).unwrap(),
            none
        );
        assert!(serde_json::to_value(Params::default())
            .unwrap()
            .get("snapshot_epochs")
            .is_none());
    }

    #[test]
    fn mask_min_keep_is_the_paper_value_unless_scaling_is_asked() {
        let m = MaskParams::default();
        assert_eq!(m.config(14).unwrap().min_keep, 10);
        // no hidden rescaling: a 4x4 grid with the paper's min_keep is refused
        let e = m.config(4).unwrap_err().to_string();
        assert!(
            e.contains("min_keep") && e.contains("scale_min_keep"),
            "{e}"
        );
        let scaled = MaskParams {
            scale_min_keep: true,
            ..MaskParams::default()
        };
        let small = scaled.config(4).unwrap();
        assert!(small.min_keep < 10);
        MaskSampler::new(small, 4, 4).unwrap();
        let given = MaskParams {
            sampler: MaskConfig {
                min_keep: 0,
                ..MaskConfig::default()
            },
            ..MaskParams::default()
        };
        assert_eq!(given.config(4).unwrap().min_keep, 0);
        // the default does not write the rule, so keys of stages without it stay as they are
        let v = serde_json::to_value(MaskParams::default()).unwrap();
        assert!(v.get("scale_min_keep").is_none(), "{v}");
        assert_eq!(v["min_keep"], 10);
        // written flat, read back the same; an unknown key names the valid ones, the rule's too
        let flat = serde_json::json!({ "min_keep": 3, "scale_min_keep": true, "pred_blocks": 2 });
        let m: MaskParams = serde_json::from_value(flat).unwrap();
        assert_eq!(
            (m.sampler.min_keep, m.sampler.pred_blocks, m.scale_min_keep),
            (3, 2, true)
        );
        let back = serde_json::to_value(&m).unwrap();
        assert_eq!(back["scale_min_keep"], true);
        assert_eq!(back["min_keep"], 3);
        let e = serde_json::from_value::<MaskParams>(serde_json::json!({ "min_kep": 3 }))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`min_kep`") && e.contains("`scale_min_keep`") && e.contains("`edge_quirk`"),
            "{e}"
        );
        let e = serde_json::from_value::<MaskParams>(serde_json::json!({ "scale_min_keep": 1 }))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`scale_min_keep`"), "{e}");
    }

    #[test]
    fn transform_is_rrc_without_flip() {
        let p = Params::default();
        match p.transform(32) {
            Transform::RandomResizedCrop { rrc, hflip, .. } => {
                assert_eq!(rrc.size, 32);
                assert_eq!(rrc.scale, (0.3, 1.0));
                assert_eq!(hflip, 0.0);
            }
            t => panic!("{t:?}"),
        }
    }
}

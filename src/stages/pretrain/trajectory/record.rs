//! Records the trajectory of a pretraining run on the CPU through the `pretrain` stage's own
//! iteration ([`crate::train::iteration`]): the same loader, crops, masks, schedules, step and
//! EMA. Every random draw derives from (`KEY`, seed), so both methods of one seed see the same
//! initial weights, batches and masks.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::crops::Crops;
use super::replay::ReplayWriter;
use super::{StepRecord, Trajectory, TrajectoryError};
use crate::data::imagefolder::ImageFolder;
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::synth::{synth, ImageFolderParams, SynthParams};
use crate::data::transforms::{Interpolation, RandomResizedCrop};
use crate::data::DataFormat;
use crate::model::masks::MaskSampler;
use crate::model::{JepaNetworks, VitConfig};
use crate::stages::pretrain::Params;
use crate::train::iteration::{Batches, Plan, Trainer};
use crate::train::loss::Method;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::comm::Single;
use crate::train::parallel::shards::ThreadShards;
use crate::train::schedules::Schedules;
use crate::util::rng::derive_seed;

/// The key of every random stream of a recorded run.
pub const KEY: &str = "trajectory";

/// What a recorded run trains.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The networks.
    pub model: VitConfig,
    /// The `pretrain` stage's parameters (method, loss, schedules, batch, epochs, masks, crops).
    pub params: Params,
    /// The synthetic images trained on (`train` split).
    pub images: ImageFolderParams,
    /// Seed of the images and of every random stream.
    pub seed: u64,
    /// Resize filter of the crops (the stage's is bicubic).
    pub interpolation: Interpolation,
    /// Thread shards of each batch (1: the whole batch in one pass).
    pub shards: usize,
}

impl Setup {
    /// The quickstart's pretraining (`pipelines/quickstart.yaml`: ViT-Tiny with 4 blocks, 64 px
    /// in 8 px patches, predictor 384 x 2; 10 epochs at batch 32, 1 warm-up epoch, `b_vic` 0.1)
    /// on 960 synthetic 64 px images (10 classes x 96): 30 steps per epoch, 300 steps.
    pub fn quickstart(method: Method) -> Self {
        let model = VitConfig {
            depth: 4,
            pred_depth: 2,
            img_size: 64,
            patch_size: 8,
            ..VitConfig::vit_tiny()
        };
        let mut params = Params {
            method,
            epochs: 10,
            batch_size: 32,
            warmup_epochs: 1.0,
            ..Params::default()
        };
        params.loss.b_vic = 0.1;
        // the quickstart's value on its 8x8 grid
        params.mask.sampler.min_keep = 3;
        Setup {
            model,
            params,
            images: ImageFolderParams {
                classes: 10,
                train_per_class: 96,
                val_per_class: 1,
                size: 64,
                ..ImageFolderParams::default()
            },
            seed: 0,
            interpolation: Interpolation::Bicubic,
            shards: 1,
        }
    }

    /// `ijepa` or `cjepa`.
    pub fn method_name(&self) -> &'static str {
        match self.params.method {
            Method::Ijepa => "ijepa",
            Method::Cjepa => "cjepa",
        }
    }
}

/// Trains `steps` steps (at most the schedule's length) of `setup` on the CPU with the images
/// generated into `work` (an empty or absent folder), calling `on_step` after each. With
/// `replay`, also writes into that folder what another implementation needs to replay the run
/// ([`ReplayWriter`]).
pub fn record(
    setup: &Setup,
    steps: u64,
    work: &Path,
    replay: Option<&Path>,
    on_step: &mut dyn FnMut(&StepRecord),
) -> Result<Trajectory, TrajectoryError> {
    let p = &setup.params;
    p.validate().map_err(TrajectoryError::Invalid)?;
    let cfg = &setup.model;
    cfg.validate()
        .map_err(|e| TrajectoryError::Invalid(e.to_string()))?;
    let root = work.join("images");
    let synth_params = SynthParams {
        imagefolder: setup.images.clone(),
        ..SynthParams::default()
    };
    synth(DataFormat::ImageFolder, &root, setup.seed, &synth_params)?;
    let source = Crops {
        samples: ImageFolder::open(&root, "train")?.samples,
        rrc: RandomResizedCrop {
            scale: (p.crop_scale[0], p.crop_scale[1]),
            ..RandomResizedCrop::new(cfg.img_size as u32)
        },
        interpolation: setup.interpolation,
    };
    let seed = setup.seed;
    let loader = Loader::new(
        &source,
        LoaderConfig {
            batch_size: p.batch_size,
            shuffle: true,
            drop_last: true,
            seed: derive_seed(KEY, seed, "data"),
        },
    )?;
    let ipe = loader.num_batches() as u64;
    let invalid = |e: String| TrajectoryError::Invalid(e);
    let sched = Schedules::from_config(&p.schedule_config(), ipe, p.epochs)
        .map_err(|e| invalid(e.to_string()))?;
    let grid = cfg.grid_size();
    let mask_cfg = p.mask.config(grid).map_err(|e| invalid(e.to_string()))?;
    let sampler = MaskSampler::new(mask_cfg, grid, grid).map_err(|e| invalid(e.to_string()))?;
    let loss = p.loss_config();
    let dev = Device::Cpu;
    let nets = JepaNetworks::new_random(cfg, derive_seed(KEY, seed, "init"), &dev)
        .map_err(|e| invalid(e.to_string()))?;
    let mut opt = AdamW::new(nets.online_vars(), AdamWConfig::default())
        .map_err(|e| invalid(e.to_string()))?;
    opt.measure_grad_norm(true);
    let pools = (setup.shards > 1)
        .then(|| ThreadShards::new(setup.shards, rayon::current_num_threads()))
        .transpose()
        .map_err(|e| invalid(e.to_string()))?;
    let total = steps.min(sched.total_iterations);
    let mut writer = replay
        .map(|d| ReplayWriter::create(d, &nets.state_tensors()))
        .transpose()?;
    let plan = Plan {
        sampler: &sampler,
        sched: &sched,
        loss: &loss,
        key: KEY,
        seed,
        batch: p.batch_size,
        rank: 0,
        world: 1,
    };
    let mut batches = Batches::new(&loader);
    let mut out = Vec::with_capacity(total as usize);
    for it in 0..total {
        let batch = batches
            .get(it)
            .ok_or_else(|| invalid(format!("the epoch ended before step {it}")))??;
        if let Some(w) = &mut writer {
            w.push_images(&batch.images)?;
        }
        let images = Tensor::from_vec(batch.images, batch.shape.to_vec(), &dev)?;
        let mut single = Single;
        let trainer = match &pools {
            Some(pools) => Trainer::Shards(pools),
            None => Trainer::Ranks(&mut single),
        };
        let done = plan.run(it, &images, &nets, &mut opt, trainer)?;
        let l = done.pending.read()?;
        let norms = param_norms(&nets)?;
        let rec = StepRecord {
            step: it + 1,
            loss: l.total as f64,
            loss_jepa: l.jepa as f64,
            loss_sim: l.sim as f64,
            loss_std: l.std as f64,
            loss_cov: l.cov as f64,
            target_std: l.target_std as f64,
            lr: done.hyper.lr,
            wd: done.hyper.wd,
            momentum: done.hyper.momentum,
            grad_norm: l.optim.grad_norm.unwrap_or(f64::NAN),
            param_norm_encoder: norms[0],
            param_norm_predictor: norms[1],
            param_norm_target: norms[2],
        };
        if let Some(w) = &mut writer {
            w.push_masks(done.masks);
        }
        on_step(&rec);
        out.push(rec);
    }
    if let Some(w) = writer {
        let shape = [p.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size];
        w.finish(setup, &sched, ipe, shape)?;
    }
    Ok(Trajectory {
        source: format!("cjepa {}", env!("CARGO_PKG_VERSION")),
        method: setup.method_name().into(),
        steps: out,
    })
}

/// 2-norms of the encoder's, the predictor's and the target encoder's parameters (summed in
/// f64, in name order).
fn param_norms(nets: &JepaNetworks) -> Result<[f64; 3], TrajectoryError> {
    use crate::model::jepa::{ENCODER, PREDICTOR, TARGET_ENCODER};
    let all: BTreeMap<String, Tensor> = nets.state_tensors().into_iter().collect();
    let mut sums = [0f64; 3];
    for (name, t) in &all {
        let group = [ENCODER, PREDICTOR, TARGET_ENCODER]
            .iter()
            .position(|g| name.strip_prefix(g).is_some_and(|r| r.starts_with('.')));
        if let Some(g) = group {
            sums[g] += t
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sums.map(f64::sqrt))
}

//! `pretrain` stage: I-JEPA / C-JEPA self-supervised pretraining (METHOD.md; I-JEPA arXiv
//! 2301.08243, C-JEPA arXiv 2410.19560) on the images of one split (`train` by default) of its
//! upstream datasets, labels unused: `imagefolder` (`<split>/<class>/*`), `clevr`
//! (`images/<split>/*.png`), `ade20k` (`images/training/*.jpg`) or `davis` (the frames of the
//! split's sequences); with several, the union of their images.
//!
//! Each iteration: a batch of `RandomResizedCrop(img, crop_scale)` + ImageNet-normalised images (no
//! flip), one multi-block mask draw for the batch, then [`crate::train::step::train_step`] (targets, context encoder,
//! predictor, JEPA (+ VICReg) loss, AdamW with this iteration's lr / wd, EMA with its momentum).
//! On the CPU in one process the batch trains as one shard per thread
//! ([`crate::train::parallel::shards::train_step_sharded`]; `CJEPA_SHARDS` sets the count): the
//! same step up to float rounding, the same from run to run.
//!
//! Every random draw derives from (stage key, seed): the init from stream `init`, the data order and
//! augmentations from stream `data` (per (epoch, sample) inside the loader), the masks of iteration
//! `i` from stream `masks/i`. So the training state is only: the three networks, the AdamW moments
//! and counts, the step and the logged series; that is what a checkpoint holds (`nets.safetensors`,
//! `optim.safetensors`, and the shared loop's `loop.json`; a `state.json` of the format before it
//! is still resumed), and a run interrupted at any point (SIGTERM, or kill -9 between checkpoints)
//! and rerun finishes bit-identical on CPU. The loop around the step (reads, NaN stop,
//! checkpoints, interrupts, ranks) is [`crate::train::run_loop`]; the step is [`step`].
//!
//! [`trajectory`] records this stage's per-step values through the same iteration, to compare
//! them with the official code's (`cjepa bench trajectory`, the golden trajectory tests).
//!
//! Artifacts: `encoder.safetensors` + `model.json` (the **target** encoder, official names, see
//! [`super::backbone`]), `full.safetensors` (`encoder.` / `predictor.` / `target_encoder.`
//! prefixed, like the golden weights) and `config.json` (resolved config + effective values).
//! With `snapshot_epochs: [k, ...]`, also the target encoder at the end of each epoch k as
//! `snapshots/epoch-<k>/{encoder.safetensors, model.json}` ([`backbone::snapshot_dir`]), read
//! by evaluation stages with `at_epoch: k`. A snapshot is written when training completes step
//! `k * iterations_per_epoch`, into the work folder (which survives interruptions: a resumed run
//! finds the snapshots of the steps before its checkpoint, and writes the later ones when it
//! gets there, from bit-identical weights), and is copied into the artifacts at the end.
//!
//! Metrics: the last step's `loss`, `loss_jepa`, `loss_sim`, `loss_std`, `loss_cov` (raw VICReg
//! terms, also computed for I-JEPA where they carry no weight), `target_std` (collapse monitor:
//! mean over feature dims of the batch std of the pooled, layer-normed target features; 0 =
//! collapse), `lr`, `steps`, `epochs`, and `images_per_sec` (wall clock of the steps run by this
//! process: the only value a resumed run does not reproduce). The same terms plus `wd`,
//! `target_eff_rank` (second collapse monitor: effective rank of the same features over the
//! global batch, see [`crate::train::step::effective_rank`]) and (with `clip_grad`) `grad_norm`
//! are series every `log_every` steps, the first and the last.

mod params;

use std::path::PathBuf;

use serde_json::Value;

pub use params::{resolve, LossParams, MaskParams, Params};

use super::{backbone, params_of, StageContext, StageOutput};
use crate::data::clevr::Clevr;
use crate::data::imagefolder::ImageFolder;
use crate::data::loader::{DecodedImageSamples, ImageSamples, Loader, LoaderConfig};
use crate::data::{DataError, DataFormat};
use crate::error::{Error, Result};
use crate::model::masks::MaskSampler;
use crate::model::VitConfig;
use crate::train::iteration::{Batches, Plan};
use crate::train::optim::AdamWConfig;
use crate::train::parallel::shards::{shard_count, ThreadShards, SHARDS_ENV};
use crate::train::run_loop::{self, LoopConfig, Points};
use crate::train::schedules::Schedules;
use crate::util::rng::derive_seed;

/// Implementation version (part of the key). 2: `mask.min_keep` is the paper's 10 unless written;
/// scaling it to the grid is the explicit `mask.scale_min_keep: true`.
pub const VERSION: u32 = 2;

/// Full checkpoint of the three networks (prefixed names).
pub const FULL_FILE: &str = "full.safetensors";

mod checkpoints;
mod step;
pub mod trajectory;
use checkpoints::{finish, snapshots_reached};
use step::{JepaStep, NAMES};
/// Resolved config written next to the weights.
pub const CONFIG_FILE: &str = "config.json";
/// Run the pretraining.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let id = ctx.job.id.clone();
    let fail = |m: String| Error::stage(&id, m);
    let p: Params = params_of(ctx)?;
    p.validate().map_err(&fail)?;
    let cfg = model_config(ctx, &p)?;
    let grid = cfg.grid_size();
    let mask_cfg = p.mask.config(grid).map_err(|e| fail(e.to_string()))?;
    let sampler =
        MaskSampler::new(mask_cfg.clone(), grid, grid).map_err(|e| fail(e.to_string()))?;
    let loss_cfg = p.loss_config();
    let dev = backbone::device(ctx)?;
    let (key, seed) = (ctx.job.key.clone(), ctx.job.seed);
    // Data parallel: this process holds every `world`-th image of each global batch (the
    // global batch, its masks and the schedules are those of a one-process run).
    let mut ranks = crate::train::parallel::ranks::Ranks::connect(ctx, &dev)?;
    let (rank, world) = (ranks.rank(), ranks.world());
    ranks.check_divides("batch_size", p.batch_size)?;

    let (source, roots) = image_source(ctx, &p, &cfg)?;
    let n_images = source.images.samples.len();
    let loader = batch_loader(ctx, &p, &source, &roots, (rank, world))?;
    let ipe = loader.num_batches() as u64;
    let sched = Schedules::from_config(&p.schedule_config(), ipe, p.epochs)
        .map_err(|e| fail(e.to_string()))?;
    let total = p
        .max_steps
        .map_or(sched.total_iterations, |m| m.min(sched.total_iterations));

    let shards = thread_shards(ctx, &p, &dev, world).map_err(fail)?;
    let adam = AdamWConfig {
        clip_grad_norm: p.clip_grad,
        ..AdamWConfig::default()
    };
    // a resumed run replaces these with the checkpoint's
    let (nets, opt) =
        step::fresh(&cfg, &adam, derive_seed(&key, seed, "init"), &dev).map_err(&fail)?;
    let snapshots = snapshots_reached(ctx, &p, ipe, total);
    ctx.log(format!(
        "{:?} on {n_images} images: {ipe} steps/epoch x {} epochs, training {total} steps; \
         grid {grid}x{grid}, mask min_keep {}, device {:?}",
        p.method, p.epochs, mask_cfg.min_keep, dev
    ));
    let mut step = JepaStep {
        id: id.clone(),
        plan: Plan {
            sampler: &sampler,
            sched: &sched,
            loss: &loss_cfg,
            key: &key,
            seed,
            batch: p.batch_size,
            rank,
            world,
        },
        batches: Batches::new(&loader),
        nets,
        opt,
        adam,
        cfg: cfg.clone(),
        shards,
        dev,
        rank,
        ipe,
        snapshots,
        work_dir: ctx.job.work_dir.clone(),
        latest: None,
    };
    let done = run_loop::run(ctx, &mut ranks, &loop_config(&p, total), &mut step)?;
    if rank > 0 {
        // rank 0 holds the same weights and writes the artifacts and the metrics
        return Ok(StageOutput::default());
    }

    finish(ctx, &step, &mask_cfg, done, (p.batch_size, n_images, world))
}

/// The shared loop's settings for pretraining: series of the logged steps' own values, the
/// values already the ranks' means, the throughput in images.
fn loop_config(p: &Params, total: u64) -> LoopConfig {
    LoopConfig {
        log_every: p.log_every,
        points: Points::Logged,
        nan_hint: Some("lower `lr` or set `clip_grad`".into()),
        rank_means: true,
        images_per_step: Some(p.batch_size),
        ..LoopConfig::new(total, NAMES.to_vec())
    }
}

/// This rank's batches of the global batch over the images, one shuffled order per epoch; an
/// error when the split holds fewer images than one batch.
fn batch_loader<'s>(
    ctx: &StageContext,
    p: &Params,
    source: &'s DecodedImageSamples,
    roots: &str,
    (rank, world): (usize, usize),
) -> Result<Loader<'s, DecodedImageSamples>> {
    let fail = |m: String| Error::stage(&ctx.job.id, m);
    let loader = Loader::new(
        source,
        LoaderConfig {
            batch_size: p.batch_size / world,
            shuffle: true,
            drop_last: true,
            seed: derive_seed(&ctx.job.key, ctx.job.seed, "data"),
        },
    )
    .and_then(|l| l.sharded(rank, world))
    .map_err(|e| fail(e.to_string()))?;
    if loader.num_batches() == 0 {
        return Err(fail(format!(
            "split `{}` of {} has {} images, fewer than one batch of {}; lower `batch_size`",
            p.split,
            roots,
            source.images.samples.len(),
            p.batch_size
        )));
    }
    Ok(loader)
}

/// The images of the upstream datasets' split with this stage's transform, and the roots they
/// came from (for messages).
fn image_source(
    ctx: &StageContext,
    p: &Params,
    cfg: &VitConfig,
) -> Result<(DecodedImageSamples, String)> {
    let mut samples = Vec::new();
    let mut roots = Vec::new();
    for (root, format) in dataset_roots(ctx)? {
        samples.extend(
            pretraining_images(&root, format, &p.split)
                .map_err(|e| Error::stage(&ctx.job.id, e.to_string()))?,
        );
        roots.push(root.display().to_string());
    }
    let source = DecodedImageSamples {
        images: ImageSamples {
            samples,
            transform: p.transform(cfg.img_size),
        },
        decode: p.decode,
    };
    Ok((source, roots.join(" + ")))
}

/// On the CPU in one process, each batch is cut into shards trained on separate threads.
fn thread_shards(
    ctx: &mut StageContext,
    p: &Params,
    dev: &candle_core::Device,
    world: usize,
) -> std::result::Result<Option<ThreadShards>, String> {
    if !(dev.is_cpu() && world == 1) {
        return Ok(None);
    }
    let threads = rayon::current_num_threads();
    let setting = std::env::var(SHARDS_ENV).ok();
    let n = shard_count(SHARDS_ENV, setting.as_deref(), threads, p.batch_size)?;
    if n <= 1 {
        return Ok(None);
    }
    let pools = ThreadShards::new(n, threads).map_err(|e| e.to_string())?;
    ctx.log(format!(
        "each batch of {} trains as {n} shards on separate threads ({threads} threads)",
        p.batch_size
    ));
    Ok(Some(pools))
}

/// The architecture: `config["model"]` with `img_size` / `patch_size` applied.
fn model_config(ctx: &StageContext, p: &Params) -> Result<VitConfig> {
    let id = &ctx.job.id;
    let m = ctx
        .job
        .config
        .get("model")
        .filter(|m| !m.is_null())
        .ok_or_else(|| {
            Error::stage(
                id,
                "a pretrain stage needs `model:` (e.g. `model: vit_tiny` or \
                 `model: { preset: vit_tiny, depth: 2 }`)",
            )
        })?;
    let mut cfg: VitConfig = serde_json::from_value(m.clone())
        .map_err(|e| Error::stage(id, format!("`model:` is not a valid ViT config: {e}")))?;
    if let Some(i) = p.img_size {
        cfg.img_size = i;
    }
    if let Some(s) = p.patch_size {
        cfg.patch_size = s;
    }
    cfg.validate().map_err(|e| {
        Error::stage(
            id,
            format!("model (with `img_size` / `patch_size` applied): {e}"),
        )
    })?;
    Ok(cfg)
}

/// Dataset formats a pretrain stage reads images from.
const PRETRAIN_FORMATS: [DataFormat; 4] = [
    DataFormat::ImageFolder,
    DataFormat::Clevr,
    DataFormat::Ade20k,
    DataFormat::Davis,
];

/// Root and format of each upstream dataset (one of [`PRETRAIN_FORMATS`]), in the order of their
/// ids; pretraining reads the union of their images (labels unused).
fn dataset_roots(ctx: &StageContext) -> Result<Vec<(PathBuf, DataFormat)>> {
    let ds: Vec<_> = ctx
        .job
        .upstream
        .values()
        .filter(|u| u.kind == "dataset")
        .collect();
    let fmt = |u: &crate::kind::job::UpstreamRef| {
        u.info
            .get("format")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let mut roots = Vec::new();
    for u in &ds {
        let f = fmt(u);
        match PRETRAIN_FORMATS.into_iter().find(|k| k.as_str() == f) {
            Some(k) => roots.push((super::dataset::root_of(u), k)),
            None => return Err(Error::stage(&ctx.job.id, unreadable_format(&u.id, &f))),
        }
    }
    if roots.is_empty() {
        return Err(Error::stage(&ctx.job.id, no_dataset()));
    }
    Ok(roots)
}

/// The formats of [`PRETRAIN_FORMATS`], listed for messages.
fn format_names() -> String {
    PRETRAIN_FORMATS
        .map(|f| format!("`{}`", f.as_str()))
        .join(", ")
}

/// The refusal of upstream dataset `id` of format `f` (when planning and when the stage starts).
fn unreadable_format(id: &str, f: &str) -> String {
    format!(
        "upstream dataset `{id}` has format `{f}`; pretraining reads the images of {} datasets: \
         drop it from `needs`",
        format_names()
    )
}

/// The refusal of a pretrain stage without a dataset upstream.
fn no_dataset() -> String {
    format!(
        "needs a `dataset` stage ({}) in `needs` (the images it learns from); add one",
        format_names()
    )
}

/// Plan-time check of `needs`: at least one dataset, each of a format pretraining reads.
fn check_plan_datasets(stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
    let mut any = false;
    for u in stage
        .upstream
        .iter()
        .filter(|u| u.kind == crate::kind::StageKind::Dataset)
    {
        let f = u.config["params"]["format"].as_str().unwrap_or("");
        if !PRETRAIN_FORMATS.iter().any(|k| k.as_str() == f) {
            return Err(crate::kind::PlanIssue::at(
                "needs",
                unreadable_format(u.id, f),
            ));
        }
        any = true;
    }
    if any {
        Ok(())
    } else {
        Err(crate::kind::PlanIssue::at("needs", no_dataset()))
    }
}

/// The images of `split` of a dataset of `format` (labels, where there are any, are unused).
fn pretraining_images(
    root: &std::path::Path,
    format: DataFormat,
    split: &str,
) -> std::result::Result<Vec<(PathBuf, usize)>, DataError> {
    match format {
        DataFormat::Clevr => {
            let c = Clevr::open(root, split)?;
            Ok(c.scenes.iter().map(|s| (c.image_path(s), 0)).collect())
        }
        DataFormat::ImageFolder => Ok(ImageFolder::open(root, split)?.samples),
        DataFormat::Ade20k => Ok(crate::data::ade20k::Ade20k::open(root, split)?
            .samples
            .into_iter()
            .map(|(image, _)| (image, 0))
            .collect()),
        DataFormat::Davis => Ok(crate::data::davis::Davis::open(root, split)?
            .sequences
            .into_iter()
            .flat_map(|q| q.frames)
            .map(|frame| (frame, 0))
            .collect()),
        other => Err(DataError::param(
            "format",
            format!(
                "pretraining reads `imagefolder`, `clevr`, `ade20k` or `davis` images, not `{}`",
                other.as_str()
            ),
        )),
    }
}

/// The `pretrain` kind.
pub struct Pretrain;

impl crate::kind::Kind for Pretrain {
    fn renamed_params(&self) -> &'static [crate::kind::Rename] {
        &[
            crate::kind::hooks::BATCH,
            crate::kind::hooks::IMG,
            crate::kind::hooks::PATCH,
        ]
    }

    kind_basics!(resolve);

    fn report_facts(&self, params: &Value) -> crate::kind::report_facts::ReportFacts {
        use crate::kind::report_facts::{PretrainFacts, ReportFacts, LOSS_WEIGHTS};
        let mut f = ReportFacts::common(params);
        // the loss weights sit in `loss:`; records of older versions held them at the top
        let get = |name: &str| {
            params
                .get("loss")
                .and_then(|l| l.get(name))
                .or_else(|| params.get(name))
        };
        f.pretrain = Some(PretrainFacts {
            method: params
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("cjepa")
                .to_string(),
            vic_terms: get("vic_terms")
                .and_then(Value::as_str)
                .unwrap_or("all")
                .to_string(),
            weights: LOSS_WEIGHTS
                .iter()
                .map(|&n| (n, get(n).and_then(Value::as_f64)))
                .collect(),
            epochs: params.get("epochs").and_then(Value::as_u64),
            snapshots: params
                .get("snapshot_epochs")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty()),
        });
        f
    }

    /// `model:` with `params.img_size` / `params.patch_size` applied.
    fn planned_model(
        &self,
        model: &serde_json::Map<String, serde_json::Value>,
        params: &serde_json::Value,
    ) -> Option<crate::model::VitConfig> {
        let mut cfg: crate::model::VitConfig =
            serde_json::from_value(serde_json::Value::Object(model.clone())).ok()?;
        if let Some(i) =
            crate::kind::param(params, crate::kind::hooks::IMG).and_then(serde_json::Value::as_u64)
        {
            cfg.img_size = i as usize;
        }
        if let Some(s) = crate::kind::param(params, crate::kind::hooks::PATCH)
            .and_then(serde_json::Value::as_u64)
        {
            cfg.patch_size = s as usize;
        }
        Some(cfg)
    }

    fn check_plan(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
        crate::train::parallel::ranks::check_plan(stage, |p: &Params, world, rf| {
            crate::train::parallel::ranks::batch_divides("batch_size", p.batch_size, world, rf)
        })?;
        check_plan_datasets(stage)?;
        // the masks on this stage's patch grid (a `min_keep` too large for it is refused here,
        // not when the stage starts)
        let model = stage
            .model
            .and_then(|m| self.planned_model(m, stage.params));
        if let (Some(cfg), Ok(p)) = (
            model,
            serde_json::from_value::<Params>(stage.params.clone()),
        ) {
            p.mask
                .config(cfg.grid_size())
                .map_err(|e| crate::kind::PlanIssue::params("mask", e.to_string()))?;
        }
        Ok(())
    }

    /// A `CJEPA_SHARDS` setting must be a shard count that divides the batch.
    fn check_environment(&self, stage: &crate::kind::PlanView) -> crate::kind::PlanCheck {
        use crate::train::parallel::shards::{shard_count, SHARDS_ENV};
        let Ok(v) = std::env::var(SHARDS_ENV) else {
            return Ok(());
        };
        let batch = stage.params["batch_size"].as_u64().unwrap_or(1) as usize;
        shard_count(SHARDS_ENV, Some(&v), 1, batch)
            .map(|_| ())
            .map_err(|m| crate::kind::PlanIssue::params("batch_size", m))
    }

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| {
            Cost::of(Pass::Jepa, p.img_size, Schedule::Epochs(p.epochs as f64))
        })
    }

    /// The step trains shards of each batch on separate threads (`train::parallel::shards`), whose
    /// kernels share out their work through rayon; candle's own element-wise thread pool would
    /// make the shards queue for it. Set before the first candle op starts that pool.
    fn prepare_process(&self, _job: &crate::kind::job::Job, rank: Option<usize>) {
        use crate::train::parallel::shards::SHARDS_ENV;
        if rank.is_none()
            && std::env::var_os(SHARDS_ENV) != Some("1".into())
            && std::env::var_os("CANDLE_NUM_THREADS").is_none()
        {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<StageOutput> {
        run(ctx)
    }
}

#[cfg(test)]
mod tests;

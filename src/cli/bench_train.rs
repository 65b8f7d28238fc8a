//! `cjepa bench train-step`: the full C-JEPA training step (target encoder forward without
//! gradient, context encoder on the context tokens, predictor, JEPA + VICReg loss, backward,
//! AdamW, EMA) on random images and masks from the multi-block sampler, timed per phase.
//!
//! With `--fused both` (the default) the fused kernels and candle's unfused composition run in
//! the same process on the same masks and weights, fused first, and the speed ratio between them
//! is printed: the in-repo baseline. `--masks-out` writes the masks of every step (warm-up
//! included) as JSON for `bench/torch_step.py`, so the PyTorch twin runs the very same shapes.

use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use cjepa::model::masks::{MaskConfig, MaskSampler, Masks};
use cjepa::model::{fused, JepaNetworks, VitConfig};
use cjepa::train::loss::LossConfig;
use cjepa::train::optim::{AdamW, AdamWConfig};
use cjepa::train::parallel::shards::{shard_count, train_step_sharded, ThreadShards};
use cjepa::train::step::{train_step_timed, Batch, PhaseTimes, StepHyper};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Arguments of `cjepa bench train-step`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Registry preset (`vit_tiny` ... `vit_huge`) or `quick` (the quickstart's small model:
    /// ViT-Tiny width, 4 blocks, 64 px, patch 8, a 2-block predictor of width 384, as in `pipelines/quickstart.yaml`).
    #[arg(long, default_value = "vit_small")]
    model: String,
    /// Image side in pixels (default: the preset's).
    #[arg(long)]
    img: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps per mode.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed warm-up steps per mode.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Threads (rayon and candle); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Shards of the batch trained on separate threads (`cjepa::train::parallel::shards`): a number,
    /// `auto` (one per thread, at most 4, dividing the batch; 1 on CUDA) or a comma list of
    /// numbers, each timed in turn on the same masks and weights (e.g. `1,2`: the baseline first).
    #[arg(long, default_value = "auto")]
    shards: String,
    /// `on`, `off` or `both` (fused first, then unfused, and their ratio). On CUDA: our CUDA
    /// kernels (`model::cuda_kernels`: row gathers, AdamW, EMA) against candle's ops.
    #[arg(long, default_value = "both")]
    fused: String,
    /// Seed of weights, images and masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the masks of every step as JSON (for `bench/torch_step.py --masks`).
    #[arg(long)]
    masks_out: Option<std::path::PathBuf>,
    /// cpu, cuda, cuda:N or auto. On CUDA the fused CPU kernels do not apply; `--fused` picks
    /// our CUDA kernels instead.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// `f32` (TF32 matmuls on CUDA) or `bf16` (autocast of the matrix products, f32 master
    /// weights; see `model::precision`).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Peak FLOP/s (in TFLOP/s) for the model FLOP utilisation; default on CUDA: the H100 dense
    /// bf16 peak (989.4, what `cjepa run --dry-run` estimates assume), on the CPU: none.
    #[arg(long)]
    peak_tflops: Option<f64>,
}

/// Model FLOPs of one training step on `masks` (cost model of `plan::cost`): context encoder
/// forward + backward on the context tokens, target encoder forward on all tokens, predictor
/// forward + backward per target block, per image.
fn step_flops(cfg: &VitConfig, m: &Masks, batch: usize) -> f64 {
    use cjepa::plan::cost::{encoder_forward_flops, predictor_forward_flops};
    let n = cfg.num_patches() as f64;
    let (ke, kp) = (m.k_enc() as f64, m.k_pred() as f64);
    let (nenc, npred) = (m.enc.len() as f64, m.pred.len() as f64);
    let per_image = nenc * 3.0 * encoder_forward_flops(cfg, ke)
        + encoder_forward_flops(cfg, n)
        + nenc * npred * 3.0 * predictor_forward_flops(cfg, ke, kp);
    per_image * batch as f64
}

/// The architecture the bench runs.
fn config(a: &Args) -> anyhow::Result<VitConfig> {
    let mut cfg = match a.model.as_str() {
        "quick" => VitConfig {
            img_size: 64,
            patch_size: 8,
            depth: 4,
            pred_depth: 2,
            ..VitConfig::vit_tiny()
        },
        name => VitConfig::by_name(name).with_context(|| {
            format!("unknown --model `{name}`: use quick, vit_tiny, vit_small, vit_base, vit_large or vit_huge")
        })?,
    };
    if let Some(img) = a.img {
        cfg.img_size = img;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Peak resident memory of this process in MiB (`VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let s = fs_err::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs` 5); false where that is not possible.
fn reset_peak_rss() -> bool {
    fs_err::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU seconds (user + system) used by this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        tv(u.ru_utime) + tv(u.ru_stime)
    }
}

/// What one mode measured.
struct Run {
    label: String,
    wall: Vec<f64>,
    cpu: Vec<f64>,
    phases: PhaseTimes,
    peak_mib: Option<f64>,
    loss: f32,
}

impl Run {
    fn mean_wall(&self) -> f64 {
        self.wall.iter().sum::<f64>() / self.wall.len().max(1) as f64
    }
    fn mean_cpu(&self) -> f64 {
        self.cpu.iter().sum::<f64>() / self.cpu.len().max(1) as f64
    }
}

/// Runs warm-up + timed steps with fresh networks and optimiser in one mode.
fn run_mode(
    label: String,
    on: bool,
    shards: usize,
    cfg: &VitConfig,
    a: &Args,
    images: &Tensor,
    masks: &[Masks],
) -> anyhow::Result<Run> {
    fused::set_enabled(on);
    cjepa::model::cuda_kernels::set_enabled(on);
    let dev = images.device().clone();
    let nets = JepaNetworks::new_random(cfg, a.seed, &dev)?;
    let mut opt = AdamW::new(nets.online_vars(), AdamWConfig::default())?;
    let loss_cfg = LossConfig::cjepa();
    let hyper = StepHyper {
        lr: 1e-4,
        wd: 0.04,
        momentum: 0.996,
    };
    let pools = (shards > 1)
        .then(|| ThreadShards::new(shards, rayon::current_num_threads()))
        .transpose()?;
    let can_reset = reset_peak_rss();
    let mut run = Run {
        label: label.clone(),
        wall: Vec::new(),
        cpu: Vec::new(),
        phases: PhaseTimes::default(),
        peak_mib: None,
        loss: f32::NAN,
    };
    for (i, m) in masks.iter().enumerate() {
        // masks are host data (the networks read their index lists without a device sync)
        let enc = cjepa::model::masks::mask_tensors(&m.enc, &Device::Cpu)?;
        let pred = cjepa::model::masks::mask_tensors(&m.pred, &Device::Cpu)?;
        let batch = Batch {
            images,
            masks_enc: &enc,
            masks_pred: &pred,
        };
        let timed = i >= a.warmup;
        let mut ph = PhaseTimes::default();
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let l = match &pools {
            Some(p) => {
                train_step_sharded(&nets, &batch, &loss_cfg, &mut opt, hyper, p, Some(&mut ph))?
                    .read()?
            }
            None => train_step_timed(&nets, &batch, &loss_cfg, &mut opt, hyper, Some(&mut ph))?,
        };
        dev.synchronize()?;
        let (dt, dc) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        eprintln!(
            "  {label} step {i}{}: {dt:.3} s wall, {dc:.3} s cpu, loss {:.5}",
            if timed { "" } else { " (warm-up)" },
            l.total
        );
        run.loss = l.total;
        if timed {
            run.wall.push(dt);
            run.cpu.push(dc);
            run.phases += ph;
        }
    }
    if can_reset {
        run.peak_mib = peak_rss_mib();
    }
    Ok(run)
}

/// The shard counts of `--shards`: `auto`, a number or a comma list of them (see
/// [`shard_count`]); on CUDA only one batch.
fn parse_shards(arg: &str, threads: usize, batch: usize, cpu: bool) -> anyhow::Result<Vec<usize>> {
    if !cpu {
        anyhow::ensure!(
            arg == "auto" || arg == "1",
            "--shards {arg}: shards train on the CPU only"
        );
        return Ok(vec![1]);
    }
    arg.split(',')
        .map(|p| shard_count("--shards", Some(p), threads, batch).map_err(anyhow::Error::msg))
        .collect()
}

fn json_masks(masks: &[Masks], cfg: &VitConfig, batch: usize) -> serde_json::Value {
    serde_json::json!({
        "config": cfg,
        "batch_size": batch,
        "grid": cfg.grid_size(),
        "steps": masks.iter().map(|m| serde_json::json!({"enc": m.enc, "pred": m.pred})).collect::<Vec<_>>(),
    })
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let dev = cjepa::stages::backbone::parse_device(&a.device)?;
    let precision =
        cjepa::model::precision::Precision::parse(&a.precision).map_err(anyhow::Error::msg)?;
    cjepa::model::precision::set_process(precision);
    let tf32 = cjepa::model::precision::allow_tf32_from_env();
    let threads = a.threads.unwrap_or_else(rayon::current_num_threads);
    anyhow::ensure!(threads > 0, "--threads must be at least 1");
    let shard_counts = parse_shards(&a.shards, threads, a.batch, dev.is_cpu())?;
    // candle reads these for its own thread count; set before any pool starts. Shards run their
    // kernels on rayon pools of their own; candle's element-wise pool would make them queue.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let sharded = shard_counts.iter().any(|&n| n > 1);
        let candle = if sharded { 1 } else { threads };
        std::env::set_var("CANDLE_NUM_THREADS", candle.to_string());
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    let modes: Vec<(&'static str, bool)> = match a.fused.as_str() {
        // on CUDA "fused" means our CUDA kernels (`model::cuda_kernels`), "unfused" candle's ops
        "on" if !dev.is_cpu() => vec![("cuda-kernels", true)],
        "off" if !dev.is_cpu() => vec![("candle", false)],
        "both" if !dev.is_cpu() => vec![("cuda-kernels", true), ("candle", false)],
        "on" => vec![("fused", true)],
        "off" => vec![("unfused", false)],
        "both" => vec![("fused", true), ("unfused", false)],
        o => anyhow::bail!("--fused {o}: use on, off or both"),
    };
    let peak = a
        .peak_tflops
        .map(|t| t * 1e12)
        .or((!dev.is_cpu()).then_some(cjepa::plan::cost::H100_BF16_PEAK_FLOPS));
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(a.batch >= 2, "--batch must be at least 2 (VICReg variance)");
    let cfg = config(&a)?;
    let g = cfg.grid_size();
    let sampler = MaskSampler::new(MaskConfig::default().scaled_for_grid(g, g)?, g, g)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let masks: Vec<Masks> = (0..a.warmup + a.steps)
        .map(|_| sampler.sample(&mut rng, a.batch))
        .collect();
    // pixel values from the seeded generator (their values do not change the timing; the same
    // seed gives the same losses run after run)
    let shape = (a.batch, cfg.in_chans, cfg.img_size, cfg.img_size);
    let pixels: Vec<f32> = (0..a.batch * cfg.in_chans * cfg.img_size * cfg.img_size)
        .map(|_| rng.gen_range(-2.0f32..2.0))
        .collect();
    let images = Tensor::from_vec(pixels, shape, &Device::Cpu)?.to_device(&dev)?;
    if let Some(p) = &a.masks_out {
        fs_err::write(
            p,
            serde_json::to_string(&json_masks(&masks, &cfg, a.batch))?,
        )?;
    }
    let mean_k =
        |f: fn(&Masks) -> usize| masks.iter().map(f).sum::<usize>() as f64 / masks.len() as f64;
    outln!(
        "bench train-step: model {} (D {}, depth {}, predictor {}x{}), {} px, patch {}, batch {}, \
         {} threads, {} timed steps after {} warm-up, device {}, precision {}{}",
        a.model,
        cfg.embed_dim,
        cfg.depth,
        cfg.pred_embed_dim,
        cfg.pred_depth,
        cfg.img_size,
        cfg.patch_size,
        a.batch,
        threads,
        a.steps,
        a.warmup,
        a.device,
        precision.name(),
        if tf32 && !dev.is_cpu() && precision == cjepa::model::precision::Precision::F32 {
            " (TF32 matmuls)"
        } else {
            ""
        }
    )?;
    outln!(
        "  masks: {} tokens, mean context keep {:.1}, mean target keep {:.1} x {} targets",
        g * g,
        mean_k(Masks::k_enc),
        mean_k(Masks::k_pred),
        masks[0].pred.len()
    )?;
    let timed = &masks[a.warmup..];
    let flops = timed
        .iter()
        .map(|m| step_flops(&cfg, m, a.batch))
        .sum::<f64>()
        / timed.len() as f64;
    outln!(
        "  model FLOPs per step: {:.1} GFLOP (forward + backward, plan::cost model)",
        flops / 1e9
    )?;
    outln!(
        "  shards of the batch on separate threads: {}",
        shard_counts
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let mut runs = Vec::new();
    for (label, on) in modes.iter().copied() {
        for &n in &shard_counts {
            let name = if shard_counts.len() > 1 {
                format!("{label}-shards{n}")
            } else {
                label.to_string()
            };
            runs.push(run_mode(name, on, n, &cfg, &a, &images, &masks)?);
        }
    }
    for r in &runs {
        outln!(
            "  {}: {:.3} s/step wall ({:.2} images/s), {:.3} s/step cpu, peak RSS {}, final loss {:.5}",
            r.label,
            r.mean_wall(),
            a.batch as f64 / r.mean_wall(),
            r.mean_cpu(),
            r.peak_mib
                .map_or("n/a".into(), |m| format!("{m:.0} MiB")),
            r.loss
        )?;
        let n = r.wall.len() as f64;
        let parts: Vec<String> = r
            .phases
            .named()
            .iter()
            .map(|(name, t)| format!("{name} {:.0} ms", 1e3 * t / n))
            .collect();
        outln!("    phases: {}", parts.join(", "))?;
        let achieved = flops / r.mean_wall();
        match peak {
            Some(p) => outln!(
                "    {:.2} TFLOP/s achieved, model FLOP utilisation {:.2}% of {:.1} TFLOP/s",
                achieved / 1e12,
                100.0 * achieved / p,
                p / 1e12
            )?,
            None => outln!("    {:.1} GFLOP/s achieved", achieved / 1e9)?,
        }
    }
    if shard_counts.len() > 1 {
        for group in runs.chunks(shard_counts.len()) {
            for r in &group[1..] {
                outln!(
                    "  {} / {} speed: {:.2}x (wall), {:.2}x (cpu)",
                    r.label,
                    group[0].label,
                    group[0].mean_wall() / r.mean_wall(),
                    group[0].mean_cpu() / r.mean_cpu()
                )?;
            }
        }
    } else if let [f, u] = runs.as_slice() {
        outln!(
            "  fused/unfused speed: {:.2}x (wall), {:.2}x (cpu)",
            u.mean_wall() / f.mean_wall(),
            u.mean_cpu() / f.mean_cpu()
        )?;
    }
    for r in &runs {
        // one machine-readable line per mode, for bench/compare.sh
        outln!(
            "RESULT impl=candle-{} images_per_s={:.4} s_per_step={:.4} cpu_s_per_step={:.4} peak_rss_mib={:.1} threads={threads} tflops={:.4} mfu={:.4}",
            r.label,
            a.batch as f64 / r.mean_wall(),
            r.mean_wall(),
            r.mean_cpu(),
            r.peak_mib.unwrap_or(f64::NAN),
            flops / r.mean_wall() / 1e12,
            peak.map_or(f64::NAN, |p| flops / r.mean_wall() / p)
        )?;
    }
    fused::set_enabled(true);
    cjepa::model::cuda_kernels::set_enabled(true);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    /// The masks file `--masks-out` writes holds every key the PyTorch twin
    /// (`bench/torch_step.py`) reads from it, but for a fallback after `else` (`batch`, for files
    /// written before `batch_size`): a rename on one side broke `bench/compare.sh` unseen.
    #[test]
    fn the_masks_file_holds_what_the_twin_reads() {
        let cfg = VitConfig::toy();
        let v = json_masks(&[], &cfg, 4);
        let twin = include_str!("../../bench/torch_step.py");
        let mut read = 0;
        for (at, _) in twin.match_indices("data[\"") {
            let key = twin[at + 6..].split('"').next().unwrap();
            // `... else data["batch"]`: the fallback for older files
            if !twin[..at].ends_with("else ") {
                assert!(v.get(key).is_some(), "torch_step.py reads `{key}`: {v}");
                read += 1;
            }
        }
        assert!(read >= 3, "torch_step.py reads {read} keys");
        assert_eq!(v["batch_size"], 4);
    }

    /// `--model quick` is the architecture the quickstart pretrains, so its figures are the
    /// quickstart's.
    #[test]
    fn quick_is_the_quickstarts_pretrain_model() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let p = cjepa::spec::load_pipeline(
            &root.join("pipelines/quickstart.yaml"),
            &Default::default(),
        )
        .unwrap();
        let plan = cjepa::plan::build(&p, cjepa::stages::table).unwrap();
        let s = plan
            .stages
            .iter()
            .find(|s| s.kind.name() == "pretrain")
            .unwrap();
        let quickstart: VitConfig = serde_json::from_value(s.config["model"].clone()).unwrap();
        let a = Cli::parse_from(["bench", "--model", "quick"]).args;
        assert_eq!(config(&a).unwrap(), quickstart);
    }
}

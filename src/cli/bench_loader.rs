//! `cjepa bench loader`: decode + RandomResizedCrop(224, bicubic) + normalise of JPEGs, in
//! images/s per core, with the library's loader (the same code the training stages use).
//! `bench/loader_compare.sh` runs this and the Pillow (+ torchvision when installed) twin on the
//! same files and prints the ratio. `--decode scaled` reads the JPEGs as the `decode: scaled`
//! pretraining option does (the crop's region at a DCT scale); `--diff` prints how far its
//! pixels are from the exact path's on the same crops.

use std::path::PathBuf;
use std::time::Instant;

use cjepa::data::jpeg::{self, Decode};
use cjepa::data::loader::{sample_rng, DecodedImageSamples, ImageSamples, Loader, LoaderConfig};
use cjepa::data::transforms::{RandomResizedCrop, Transform};

/// Arguments of `cjepa bench loader`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder of an ImageFolder dataset to read (default: generate one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Images to generate when no --dir is given.
    #[arg(long, default_value_t = 256)]
    images: usize,
    /// Side of the generated JPEGs.
    #[arg(long, default_value_t = 320)]
    src_size: u32,
    /// Output crop size.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// Threads (default: all cores); images/s per core is also printed for 1 thread.
    #[arg(long)]
    threads: Option<usize>,
    /// Keep the generated folder here (for the Pillow twin).
    #[arg(long)]
    keep: Option<PathBuf>,
    /// How the JPEGs are decoded: `exact` (whole image, full size) or `scaled` (the crop's region
    /// at the smallest DCT scale that keeps it >= the output size).
    #[arg(long, default_value = "exact")]
    decode: Decode,
    /// Also compare the scaled decode's output with the exact one on the same crops (8-bit
    /// pixel units, before normalisation) and count the crops per DCT scale.
    #[arg(long)]
    diff: bool,
}

/// CPU seconds used by this process so far (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Images per wall-clock second and per CPU second of one epoch.
fn time_epoch(samples: &DecodedImageSamples, threads: usize) -> anyhow::Result<(f64, f64)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let cfg = LoaderConfig {
        batch_size: 32,
        shuffle: true,
        drop_last: false,
        seed: 0,
    };
    let loader = Loader::new(samples, cfg)?;
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let mut n = 0usize;
    pool.install(|| -> anyhow::Result<()> {
        for b in loader.iter_epoch(0, 0) {
            n += b?.labels.len();
        }
        Ok(())
    })?;
    Ok((
        n as f64 / t0.elapsed().as_secs_f64(),
        n as f64 / (cpu_seconds() - c0),
    ))
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let tmp = tempfile::tempdir()?;
    let dir = match (&a.dir, &a.keep) {
        (Some(d), _) => d.clone(),
        (None, keep) => {
            let d = keep.clone().unwrap_or_else(|| tmp.path().join("data"));
            if !d.join("train").is_dir() {
                let per_class = a.images.div_ceil(4);
                let mut p = cjepa::data::synth::SynthParams::default();
                p.imagefolder.classes = 4;
                p.imagefolder.train_per_class = per_class;
                p.imagefolder.val_per_class = 1;
                p.imagefolder.size = a.src_size;
                cjepa::data::synth::synth(cjepa::data::DataFormat::ImageFolder, &d, 0, &p)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            d
        }
    };
    let folder = cjepa::data::imagefolder::ImageFolder::open(&dir, "train")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let samples = DecodedImageSamples {
        images: ImageSamples {
            samples: folder.samples.clone(),
            transform: Transform::imagenet_train(a.size),
        },
        decode: a.decode,
    };
    let threads = a.threads.unwrap_or_else(num_cpus::get);
    let _warm = time_epoch(&samples, threads)?;
    let (one, one_cpu) = time_epoch(&samples, 1)?;
    let (all, _) = time_epoch(&samples, threads)?;
    let src = match &a.dir {
        Some(d) => d.display().to_string(),
        None => format!("{}px", a.src_size),
    };
    outln!(
        "bench loader: {} JPEGs ({src}) -> RandomResizedCrop({}) bicubic + flip + normalise, \
         decode {}",
        folder.samples.len(),
        a.size,
        a.decode.name()
    )?;
    outln!("  1 thread:  {one:.1} images/s (per core), {one_cpu:.1} images per CPU second")?;
    outln!(
        "  {threads} threads: {all:.1} images/s ({:.2}x of 1 thread)",
        all / one
    )?;
    outln!("RESULT rust_per_core={one:.2} rust_all={all:.2} rust_per_cpu_s={one_cpu:.2}")?;
    if a.diff {
        diff(&folder.samples, a.size)?;
    }
    Ok(0)
}

/// Scaled vs exact decode on the same crops (the same per-sample RNG), in 8-bit units.
fn diff(samples: &[(PathBuf, usize)], size: u32) -> anyhow::Result<()> {
    // mean 0, std 1/255: the "normalised" values are the 8-bit pixel values.
    let t = Transform::RandomResizedCrop {
        rrc: RandomResizedCrop::new(size),
        hflip: 0.0,
        mean: [0.0; 3],
        std: [1.0 / 255.0; 3],
    };
    let rrc = RandomResizedCrop::new(size);
    // Per DCT scale: crops, values, sum of |diff|, max |diff|, values differing by > 1.
    let mut by_scale: std::collections::BTreeMap<u32, (usize, usize, f64, f64, usize)> =
        Default::default();
    for (i, (path, _)) in samples.iter().enumerate() {
        let exact = t.load(path, Decode::Exact, &mut sample_rng(0, 0, i))?;
        let scaled = t.load(path, Decode::Scaled, &mut sample_rng(0, 0, i))?;
        let bytes = std::fs::read(path)?;
        let (w, h) = jpeg::jpeg_size(&bytes, &path.to_string_lossy())?;
        let b = rrc.get_params(w, h, &mut sample_rng(0, 0, i));
        let e = by_scale
            .entry(jpeg::draft_scale(b.width, b.height, size, size))
            .or_default();
        e.0 += 1;
        for (x, y) in exact.data.iter().zip(&scaled.data) {
            let d = ((x - y).abs() as f64).round();
            e.1 += 1;
            e.2 += d;
            e.3 = e.3.max(d);
            e.4 += (d > 1.0) as usize;
        }
    }
    let n = samples.len();
    let tot = by_scale.values().fold((0, 0.0, 0.0f64), |acc, v| {
        (acc.0 + v.1, acc.1 + v.2, acc.2.max(v.3))
    });
    outln!("scaled vs exact decode on the same {n} crops (8-bit pixel values):")?;
    for (a, (crops, vals, sum, max, big)) in &by_scale {
        outln!(
            "  scale 1/{a}: {crops} crops ({:.0}%), mean |diff| {:.3}, max {max}, {:.2}% of values off by > 1",
            100.0 * *crops as f64 / n as f64,
            sum / *vals as f64,
            100.0 * *big as f64 / *vals as f64
        )?;
    }
    outln!(
        "RESULT diff_mean={:.4} diff_max={}",
        tot.1 / tot.0.max(1) as f64,
        tot.2
    )?;
    Ok(())
}

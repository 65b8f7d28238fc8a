//! `cjepa bench loader`: decode + RandomResizedCrop(224, bicubic) + normalise of JPEGs, in
//! images/s per core, with the library's loader (the same code the training stages use).
//! `bench/loader_compare.sh` runs this and the Pillow (+ torchvision when installed) twin on the
//! same files and prints the ratio.

use std::path::PathBuf;
use std::time::Instant;

use cjepa::data::loader::{ImageSamples, Loader, LoaderConfig};
use cjepa::data::transforms::Transform;

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
}

fn time_epoch(samples: &ImageSamples, threads: usize) -> anyhow::Result<f64> {
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
    let t0 = Instant::now();
    let mut n = 0usize;
    pool.install(|| -> anyhow::Result<()> {
        for b in loader.iter_epoch(0, 0) {
            n += b?.labels.len();
        }
        Ok(())
    })?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
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
    let samples = ImageSamples {
        samples: folder.samples.clone(),
        transform: Transform::imagenet_train(a.size),
    };
    let threads = a.threads.unwrap_or_else(num_cpus::get);
    let _warm = time_epoch(&samples, threads)?;
    let one = time_epoch(&samples, 1)?;
    let all = time_epoch(&samples, threads)?;
    outln!(
        "bench loader: {} JPEGs ({}px) -> RandomResizedCrop({}) bicubic + flip + normalise",
        folder.samples.len(),
        a.src_size,
        a.size
    )?;
    outln!("  1 thread:  {one:.1} images/s (per core)")?;
    outln!(
        "  {threads} threads: {all:.1} images/s ({:.2}x of 1 thread)",
        all / one
    )?;
    outln!("RESULT rust_per_core={one:.2} rust_all={all:.2}")?;
    Ok(0)
}

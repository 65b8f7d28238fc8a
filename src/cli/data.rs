//! `cjepa data check FORMAT PATH`, `cjepa data synth FORMAT OUT --seed S [--set k=v]` and
//! `cjepa data import idx OUT --train-images .. --train-labels .. --val-images .. --val-labels ..`.

use std::path::PathBuf;

use cjepa::data::DataFormat;

/// The subcommands of `cjepa data`.
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// Validate a dataset: counts, missing or unreadable files, mismatched ids, PNG modes.
    Check {
        /// imagefolder, coco, ade20k, davis or clevr.
        format: String,
        /// Dataset root.
        path: PathBuf,
        /// Decode every image (slower; catches truncated files).
        #[arg(long)]
        decode: bool,
    },
    /// Write a deterministic synthetic dataset in the real layout of FORMAT.
    Synth {
        /// imagefolder, coco, ade20k, davis or clevr.
        format: String,
        /// Output folder (must be empty or absent).
        out: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Generator parameter, e.g. `--size classes=4` (repeatable).
        #[arg(long = "size", value_name = "KEY=VALUE")]
        sizes: Vec<String>,
    },
    /// Convert a dataset in another format into one of the layouts above.
    Import {
        #[command(subcommand)]
        from: Import,
    },
}

/// The formats `cjepa data import` reads.
#[derive(Debug, clap::Subcommand)]
pub enum Import {
    /// IDX `*-ubyte[.gz]` files (MNIST, Fashion-MNIST) -> imagefolder
    /// (`OUT/{train,val}/<label>[_<name>]/<index>.png`, the first N images of each class, RGB).
    Idx {
        /// Output folder (must be empty or absent).
        out: PathBuf,
        /// Training images (`[n, rows, cols]`), e.g. train-images-idx3-ubyte.gz.
        #[arg(long)]
        train_images: PathBuf,
        /// Training labels (`[n]`), e.g. train-labels-idx1-ubyte.gz.
        #[arg(long)]
        train_labels: PathBuf,
        /// Validation images, e.g. t10k-images-idx3-ubyte.gz.
        #[arg(long)]
        val_images: PathBuf,
        /// Validation labels, e.g. t10k-labels-idx1-ubyte.gz.
        #[arg(long)]
        val_labels: PathBuf,
        /// Training images kept per class (the first ones in file order).
        #[arg(long, default_value_t = 300)]
        train_per_class: usize,
        /// Validation images kept per class.
        #[arg(long, default_value_t = 100)]
        val_per_class: usize,
        /// Output side in pixels (bilinear resize).
        #[arg(long, default_value_t = 32)]
        size: u32,
        /// Class names in label order, comma-separated (folder `<label>_<name>`).
        #[arg(long, value_delimiter = ',')]
        class_names: Vec<String>,
    },
}

fn parse_format(s: &str) -> anyhow::Result<DataFormat> {
    s.parse::<DataFormat>()
        .map_err(|e| cjepa::Error::Usage(e.to_string()).into())
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a {
        Args::Check {
            format,
            path,
            decode,
        } => {
            let fmt = parse_format(&format)?;
            let opts = cjepa::data::check::CheckOptions {
                decode_images: decode,
            };
            let r = cjepa::data::check::check_with(fmt, &path, &opts)
                .map_err(|e| cjepa::Error::Data(e.to_string()))?;
            outln!("{}", r.summary())?;
            for p in &r.problems {
                outln!("problem: {}: {}", p.path.display(), p.message)?;
            }
            Ok(if r.is_ok() { 0 } else { 1 })
        }
        Args::Synth {
            format,
            out,
            seed,
            sizes,
        } => {
            let fmt = parse_format(&format)?;
            let mut given = serde_json::Map::new();
            for s in &sizes {
                let (k, v) = s.split_once('=').ok_or_else(|| {
                    cjepa::Error::Usage(format!("--size {s}: expected KEY=VALUE"))
                })?;
                let v: serde_json::Value = serde_yaml::from_str(v)
                    .map_err(|e| cjepa::Error::Usage(format!("--size {s}: {e}")))?;
                given.insert(k.to_string(), v);
            }
            let section =
                cjepa::stages::dataset::synth_params(fmt, &given).map_err(cjepa::Error::Usage)?;
            let mut all = serde_json::to_value(cjepa::data::synth::SynthParams::default())?;
            all[fmt.as_str()] = serde_json::Value::Object(section);
            let params: cjepa::data::synth::SynthParams = serde_json::from_value(all)?;
            cjepa::data::synth::synth(fmt, &out, seed, &params)
                .map_err(|e| cjepa::Error::Data(e.to_string()))?;
            let r = cjepa::data::check::check(fmt, &out)
                .map_err(|e| cjepa::Error::Data(e.to_string()))?;
            outln!("{}", r.summary())?;
            Ok(0)
        }
        Args::Import {
            from:
                Import::Idx {
                    out,
                    train_images,
                    train_labels,
                    val_images,
                    val_labels,
                    train_per_class,
                    val_per_class,
                    size,
                    class_names,
                },
        } => {
            use cjepa::data::idx::{import_imagefolder, IdxSplit};
            let train = IdxSplit {
                images: train_images,
                labels: train_labels,
                per_class: train_per_class,
            };
            let val = IdxSplit {
                images: val_images,
                labels: val_labels,
                per_class: val_per_class,
            };
            let s = import_imagefolder(&train, &val, &out, size, &class_names)
                .map_err(|e| cjepa::Error::Data(e.to_string()))?;
            outln!(
                "wrote {}: {} classes, {} train / {} val images of {size} px",
                out.display(),
                s.classes.len(),
                s.train,
                s.val
            )?;
            let r = cjepa::data::check::check(DataFormat::ImageFolder, &out)
                .map_err(|e| cjepa::Error::Data(e.to_string()))?;
            outln!("{}", r.summary())?;
            Ok(if r.is_ok() { 0 } else { 1 })
        }
    }
}

//! `cjepa data check FORMAT PATH` and `cjepa data synth FORMAT OUT --seed S [--set k=v]`.

use std::path::PathBuf;

use cjepa::data::DataFormat;

/// Arguments of `cjepa data`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
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
}

fn parse_format(s: &str) -> anyhow::Result<DataFormat> {
    s.parse::<DataFormat>()
        .map_err(|e| cjepa::Error::Usage(e.to_string()).into())
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    match a.cmd {
        Cmd::Check {
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
        Cmd::Synth {
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
    }
}

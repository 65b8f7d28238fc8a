//! `command` stage: runs an external program, DVC-style. Declared input files are hashed into
//! the key; declared outputs are collected as artifacts; metrics are read from a JSON file the
//! program writes. This is how outside tools (e.g. a Python detector) plug into a pipeline.
//!
//! The program runs with `sh -c CMD` in the stage's work folder, which survives interruptions
//! (so a program can resume from its own files there), with these variables:
//! `CJEPA_WORK`, `CJEPA_OUT` (extra artifacts go here), `CJEPA_CHECKPOINT_DIR`, `CJEPA_PARAMS`
//! (the resolved params as JSON), `CJEPA_SEED`, `CJEPA_STAGE_KEY`, `CJEPA_PIPELINE_DIR` and
//! `CJEPA_UPSTREAM_<STAGE>` (artifact folder of each upstream stage, upper-cased).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{params_of, StageContext, StageOutput};
use crate::error::{Error, Result};
use crate::kind::job::Job;

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// Params of a `command` stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Shell command line.
    #[serde(default)]
    pub cmd: String,
    /// Input files (relative to the pipeline file); their contents are part of the key.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Output paths relative to the work folder, collected as artifacts.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// JSON file (relative to the work folder) of `{name: number}` metrics. Default `metrics.json`, optional.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Free values passed to the program in `CJEPA_PARAMS` (part of the key).
    #[serde(default)]
    pub vars: Map<String, Value>,
}

/// Key inputs: blake3 of every declared input file.
pub fn key_inputs(params: &Value, pipeline_dir: &Path) -> crate::kind::KeyInputs {
    let cmd = params["cmd"].as_str().unwrap_or("");
    if cmd.trim().is_empty() {
        return Err("`cmd` is required: the command line to run".into());
    }
    let mut digests = Map::new();
    for inp in params["inputs"].as_array().into_iter().flatten() {
        let rel = inp.as_str().unwrap_or("");
        let p = pipeline_dir.join(rel);
        let bytes = std::fs::read(&p).map_err(|e| {
            format!(
                "input `{rel}` ({}) cannot be read: {e}; fix `inputs`",
                p.display()
            )
        })?;
        digests.insert(
            rel.to_string(),
            Value::String(blake3::hash(&bytes).to_hex().to_string()),
        );
    }
    Ok(if digests.is_empty() {
        Value::Null
    } else {
        json!({ "inputs": digests })
    })
}

/// Run the command, collect outputs and metrics.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    fs_err::create_dir_all(&ctx.job.work_dir)?;
    fs_err::create_dir_all(&ctx.job.out_dir)?;
    let mut cmd = shell_command(ctx, &p.cmd)?;
    ctx.log(format!("$ {}", p.cmd));
    let child = cmd
        .spawn()
        .map_err(|e| Error::stage(&ctx.job.id, format!("cannot start `sh -c {}`: {e}", p.cmd)))?;
    let status = wait_or_interrupt(ctx, child)?;
    if !status.success() {
        let msg = format!("command exited with {status}: {}", p.cmd);
        return Err(Error::stage(&ctx.job.id, msg));
    }
    move_outputs(&ctx.job, &p.outputs)?;
    Ok(StageOutput {
        metrics: read_metrics(&ctx.job, p.metrics.as_deref())?,
        ..StageOutput::default()
    })
}

/// `sh -c cmd` in the work folder, with the stage's `CJEPA_*` environment, in its own process
/// group.
fn shell_command(ctx: &StageContext, cmd_line: &str) -> Result<Command> {
    let job = &ctx.job;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(cmd_line)
        .current_dir(&job.work_dir)
        .env("CJEPA_WORK", &job.work_dir)
        .env("CJEPA_OUT", &job.out_dir)
        .env("CJEPA_CHECKPOINT_DIR", ctx.ckpt.dir())
        .env(
            "CJEPA_PARAMS",
            serde_json::to_string(&job.config["params"])?,
        )
        .env("CJEPA_SEED", job.seed.to_string())
        .env("CJEPA_STAGE_KEY", &job.key)
        .env("CJEPA_PIPELINE_DIR", &job.pipeline_dir)
        .stdin(Stdio::null());
    for (name, u) in &job.upstream {
        let var = format!("CJEPA_UPSTREAM_{}", name.to_uppercase().replace('-', "_"));
        cmd.env(var, &u.artifacts);
    }
    crate::util::proc::own_process_group(&mut cmd);
    Ok(cmd)
}

/// The child's exit status; on an interrupt its process group is terminated first.
fn wait_or_interrupt(ctx: &StageContext, mut child: std::process::Child) -> Result<ExitStatus> {
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if ctx.is_interrupted() {
            crate::util::proc::terminate_group(child.id());
            let _ = child.wait();
            return Err(Error::Interrupted);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Moves the declared outputs from the work folder to the artifact folder.
fn move_outputs(job: &Job, outputs: &[String]) -> Result<()> {
    for o in outputs {
        let src = job.work_dir.join(o);
        if !src.exists() {
            return Err(Error::stage(
                &job.id,
                format!("declared output `{o}` was not written by the command"),
            ));
        }
        let dst = job.out_dir.join(o);
        if let Some(parent) = dst.parent() {
            fs_err::create_dir_all(parent)?;
        }
        fs_err::rename(&src, &dst)?;
    }
    Ok(())
}

/// The numbers of the metrics file (`metrics.json` unless `declared`; optional unless declared).
fn read_metrics(job: &Job, declared: Option<&str>) -> Result<BTreeMap<String, f64>> {
    let mfile = declared.unwrap_or("metrics.json");
    let mpath = job.work_dir.join(mfile);
    if !mpath.is_file() {
        return match declared {
            Some(_) => Err(Error::stage(
                &job.id,
                format!("declared metrics file `{mfile}` was not written"),
            )),
            None => Ok(BTreeMap::new()),
        };
    }
    let text = fs_err::read_to_string(&mpath)?;
    let v: BTreeMap<String, Value> = serde_json::from_str(&text).map_err(|e| {
        Error::stage(
            &job.id,
            format!(
                "metrics file {}: expected a JSON object of numbers: {e}",
                mpath.display()
            ),
        )
    })?;
    Ok(v.into_iter()
        .filter_map(|(k, x)| x.as_f64().map(|f| (k, f)))
        .collect())
}

/// The `command` kind.
pub struct CommandStage;

impl crate::kind::Kind for CommandStage {
    kind_basics!(super::resolve::<Params>, run);

    key_inputs_by!(key_inputs);
}

//! Test-only `counter` stage (feature `test-stages`): a multi-step loop with a seeded value,
//! checkpointed through the engine's checkpointer, used by the resume tests.

use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{params_of, StageContext, StageOutput};
use crate::error::{Error, Result};

/// Implementation version.
pub const VERSION: u32 = 1;

/// Params of a `counter` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Number of steps.
    #[serde(default = "five")]
    pub steps: u64,
    /// Sleep per step (ms), so tests can interrupt mid-stage.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Fail (once per attempt) when reaching this step.
    #[serde(default)]
    pub fail_at: Option<u64>,
    /// Checkpoint every N steps (not hashed).
    #[serde(default = "one")]
    pub checkpoint_every: u64,
}

fn five() -> u64 {
    5
}
fn one() -> u64 {
    1
}

impl Default for Params {
    fn default() -> Self {
        Params {
            steps: 5,
            sleep_ms: 0,
            fail_at: None,
            checkpoint_every: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    step: u64,
    acc: f64,
}

/// Run the counter.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let mut st = State { step: 0, acc: 0.0 };
    let mut resumed = 0;
    if let Some(c) = ctx.ckpt.load()? {
        st = serde_json::from_slice(&fs_err::read(c.path.join("state.json"))?)?;
        resumed = st.step;
        ctx.log(format!("resumed from step {}", st.step));
    }
    let mut series = Vec::new();
    while st.step < p.steps {
        if ctx.is_interrupted() {
            save(ctx, &st)?;
            return Err(Error::Interrupted);
        }
        if p.fail_at == Some(st.step) {
            return Err(Error::stage(
                &ctx.job.id,
                format!("counter told to fail at step {}", st.step),
            ));
        }
        let mut rng =
            crate::util::rng::stage_rng(&ctx.job.key, ctx.job.seed, &format!("step{}", st.step));
        st.acc = st.acc * 0.5 + rng.gen::<f64>();
        st.step += 1;
        series.push((st.step, st.acc));
        ctx.progress.set(st.step, p.steps, "counting");
        std::thread::sleep(std::time::Duration::from_millis(p.sleep_ms));
        if st.step % p.checkpoint_every.max(1) == 0 {
            save(ctx, &st)?;
        }
    }
    let mut out = StageOutput::default();
    out.metrics.insert("acc".into(), st.acc);
    out.metrics.insert("steps".into(), st.step as f64);
    out.series.insert("acc".into(), series);
    out.info = json!({ "resumed_from": resumed });
    fs_err::write(ctx.job.out_dir.join("final.json"), serde_json::to_vec(&st)?)?;
    Ok(out)
}

fn save(ctx: &mut StageContext, st: &State) -> Result<()> {
    let bytes = serde_json::to_vec(st)?;
    ctx.ckpt.save(st.step, |dir| {
        Ok(fs_err::write(dir.join("state.json"), &bytes)?)
    })
}

/// The test-only `counter` kind.
pub struct Counter;

impl crate::kind::Kind for Counter {
    kind_basics!(super::resolve::<Params>, run);
}

//! The all-reduce group of a running stage: [`Single`] for a one-process stage; for a rank of a
//! data-parallel stage, NCCL on a CUDA device (`nccl` feature) or TCP between CPU processes,
//! meeting in the job's `dist/` folder.

use std::time::Duration;

use candle_core::Device;

use super::launch as ranks;
use crate::error::{Error, Result};
use crate::kind::StageContext;
use crate::train::parallel::comm::{tcp::TcpHub, AllReduce, Single};

/// How long ranks wait for each other to start (process start, CUDA init, srun scheduling).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// Join the stage's group on `dev`.
pub fn connect(ctx: &StageContext, dev: &Device) -> Result<Box<dyn AllReduce>> {
    let job = &ctx.job;
    let Some(role) = job.dist.filter(|_| job.ranks > 1) else {
        return Ok(Box::new(Single));
    };
    let dir = ranks::dist_dir(job);
    let fail = |e: crate::train::parallel::comm::DistError| Error::stage(&job.id, e.to_string());
    if dev.is_cuda() {
        #[cfg(feature = "nccl")]
        {
            let c = crate::train::parallel::comm::nccl::Nccl::connect(
                dev,
                role.rank,
                job.ranks,
                &dir,
                RENDEZVOUS_TIMEOUT,
            )
            .map_err(fail)?;
            return Ok(Box::new(c));
        }
        #[cfg(not(feature = "nccl"))]
        return Err(Error::stage(
            &job.id,
            format!(
                "{} ranks on CUDA need the NCCL all-reduce: build with `--features cuda,nccl`",
                job.ranks
            ),
        ));
    }
    let (bind, advertise) = if role.multi_host {
        let host = hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "127.0.0.1".into());
        ("0.0.0.0", host)
    } else {
        ("127.0.0.1", "127.0.0.1".to_string())
    };
    let c = TcpHub::connect(
        role.rank,
        job.ranks,
        &dir,
        bind,
        &advertise,
        RENDEZVOUS_TIMEOUT,
    )
    .map_err(fail)?;
    Ok(Box::new(c))
}

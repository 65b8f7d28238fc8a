//! Our own CUDA kernels (`--features cuda`): CUDA C sources compiled once per process with NVRTC
//! and launched on the stream of a candle device. Used where candle's kernels are serial
//! (`index_add`, see `model::gather`) or where candle's chain of element-wise ops takes a dozen
//! passes over memory for one formula (the AdamW update and the EMA, see
//! `train::fused_update`). Every user falls back to candle's ops when a source fails to compile
//! (the error is kept and reported by [`available`]), and `CJEPA_CUDA_KERNELS=0` turns them all
//! off (the baseline of `bench train-step --fused both` on CUDA).

static SWITCH: crate::util::switch::EnvSwitch =
    crate::util::switch::EnvSwitch::new("CJEPA_CUDA_KERNELS");

/// Whether our CUDA kernels are used (first call reads `CJEPA_CUDA_KERNELS`: `0`/`off` = off).
pub fn enabled() -> bool {
    SWITCH.get()
}

/// Turns our CUDA kernels on or off for the whole process.
pub fn set_enabled(on: bool) {
    SWITCH.set(on)
}

#[cfg(feature = "cuda")]
pub use imp::{available, launch_config, ptx};

/// Launches kernel `$name` of the source `($module, $src)` on `$dev` (a candle `CudaDevice`)
/// with the launch configuration `$cfg`, pushing each argument as given (`&slice`, `&mut out`,
/// `&scalar`); a `candle_core::Result<()>`. The launch is unsafe: every use states why its
/// arguments fit the kernel.
#[cfg(feature = "cuda")]
macro_rules! launch {
    ($dev:expr, ($module:expr, $src:expr), $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        let name: &str = $name;
        let ptx = $crate::model::cuda_kernels::ptx($module, $src)?;
        let func = $dev.get_or_load_custom_func(name, $module, ptx)?;
        let cfg = $cfg;
        let mut builder = func.builder();
        $( builder.arg($arg); )*
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|e| candle_core::Error::Msg(format!("{name}: {e:?}")))
    }};
}
#[cfg(feature = "cuda")]
pub(crate) use launch;

/// Without CUDA there is nothing to compile.
#[cfg(not(feature = "cuda"))]
pub fn available(_module: &'static str, _src: &'static str) -> bool {
    false
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::Result;

    type Compiled = HashMap<&'static str, std::result::Result<&'static str, String>>;
    static MODULES: Mutex<Option<Compiled>> = Mutex::new(None);

    /// The PTX of `src` (compiled with NVRTC on first use; the text lives for the process).
    pub fn ptx(module: &'static str, src: &'static str) -> Result<&'static str> {
        let mut guard = MODULES.lock().unwrap_or_else(|p| p.into_inner());
        let map = guard.get_or_insert_with(HashMap::new);
        let entry = map.entry(module).or_insert_with(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(src)
                .map(|p| &*Box::leak(p.to_src().into_boxed_str()))
                .map_err(|e| format!("compiling the CUDA kernels `{module}` with NVRTC: {e:?}"))
        });
        entry.clone().map_err(candle_core::Error::Msg)
    }

    /// Whether our kernels are on and `src` compiles.
    pub fn available(module: &'static str, src: &'static str) -> bool {
        super::enabled() && ptx(module, src).is_ok()
    }

    /// A grid-stride launch over `total` elements: 256 threads a block, at most 2^19 blocks.
    pub fn launch_config(total: u64) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 1 << 19) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

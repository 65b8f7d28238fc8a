//! Tuning of the C allocator for the training step's allocation pattern.
//!
//! A training step allocates and frees many tensors of one to tens of MiB (activations, their
//! gradients, gemm outputs), the same sizes every step. glibc serves blocks above its mmap
//! threshold (128 KiB at start, raised dynamically up to 32 MiB) with fresh `mmap`s and returns
//! freed memory above its trim threshold to the kernel, so each step pays page faults and the
//! kernel's zeroing of every page again: 13% of the perf samples of a one-thread step of the
//! quickstart model (`clear_page_erms`, `do_anonymous_page` under the tensors' allocations).
//! [`keep_freed_memory`] keeps blocks up to 32 MiB on the heap and freed memory in the process,
//! so later steps reuse pages that are already mapped. The peak resident memory stays that of
//! the largest step.

/// Largest block served from the heap (glibc's ceiling for the threshold on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap kept before returning it to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;
/// Extra heap requested at each growth.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: i32 = 64 << 20;

/// Sets the glibc allocator to keep freed memory in the process (see the module doc); returns
/// whether every setting was accepted. A no-op returning false on other C libraries and when
/// the environment sets `CJEPA_MALLOC=default` (glibc's own policy, the benchmark baseline).
/// Call it once at start-up, before the threads that allocate are spawned.
pub fn keep_freed_memory() -> bool {
    if std::env::var("CJEPA_MALLOC").as_deref() == Ok("default") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; all three are valid settings.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn settings_are_accepted_and_allocation_works() {
        assert!(keep_freed_memory());
        // a block under the threshold, freed and allocated again
        for _ in 0..3 {
            let v = vec![1f32; 3 << 20];
            assert_eq!(v.iter().sum::<f32>(), (3 << 20) as f32);
        }
    }
}

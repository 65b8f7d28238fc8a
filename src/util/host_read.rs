//! Device-to-host reads, counted. On a GPU every read of a tensor's values (`to_vec*`,
//! `to_scalar`) waits for all queued work to finish: inside a training step one such read stalls
//! the device once per step. The training code reads values only through these functions, which
//! count the reads per thread (whatever the device, so a test on the CPU sees the reads a GPU
//! run would make) and let a test assert how many a step makes.
//!
//! Mask index lists are host data from the start (the sampler builds them on the CPU), so reading
//! a mask tensor that lives on the CPU is no device read; [`is_host`] says when that holds.

use std::cell::Cell;

use candle_core::{Result, Tensor, WithDType};

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    READS.with(|c| c.set(c.get() + 1));
}

/// Device-to-host reads made by this thread so far.
pub fn reads() -> u64 {
    READS.with(|c| c.get())
}

/// True when `t` lives in host memory (reading it waits for no device).
pub fn is_host(t: &Tensor) -> bool {
    t.device().is_cpu()
}

/// `t.to_scalar()`, counted.
pub fn scalar<T: WithDType>(t: &Tensor) -> Result<T> {
    count();
    t.to_scalar::<T>()
}

/// `t.to_vec1()`, counted.
pub fn vec1<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    count();
    t.to_vec1::<T>()
}

/// `t.to_vec2()`, counted.
pub fn vec2<T: WithDType>(t: &Tensor) -> Result<Vec<Vec<T>>> {
    count();
    t.to_vec2::<T>()
}

/// `t.to_vec3()`, counted.
pub fn vec3<T: WithDType>(t: &Tensor) -> Result<Vec<Vec<Vec<T>>>> {
    count();
    t.to_vec3::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_read_counts_once_on_this_thread() {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let before = reads();
        assert_eq!(vec1::<f32>(&t).unwrap(), vec![1.0, 2.0]);
        assert_eq!(scalar::<f32>(&t.sum_all().unwrap()).unwrap(), 3.0);
        assert_eq!(reads() - before, 2);
        let other = std::thread::spawn(reads).join().unwrap();
        assert_eq!(other, 0, "counts are per thread");
        assert!(is_host(&t));
    }
}

//! NCCL on a GPU (`--features cuda,nccl`; `scripts/gpu-check.sh` runs it with
//! `CJEPA_TEST_DEVICE=cuda:0`): a world of one through NCCL returns its buffer, offsets of a
//! narrowed tensor included. Without a CUDA device in `CJEPA_TEST_DEVICE` it says so and passes:
//! the build machines have no GPU.

use std::time::Duration;

use candle_core::Tensor;
use cjepa::train::parallel::comm::nccl::{Nccl, ID_FILE};
use cjepa::train::parallel::comm::AllReduce;

#[test]
fn nccl_world_of_one() {
    let d = std::env::var("CJEPA_TEST_DEVICE").unwrap_or_default();
    if !d.starts_with("cuda") {
        eprintln!("nccl_world_of_one: CJEPA_TEST_DEVICE is not a CUDA device; nothing to check");
        return;
    }
    let dev = cjepa::stages::backbone::parse_device(&d).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Nccl::connect(&dev, 0, 1, dir.path(), Duration::from_secs(60)).unwrap();
    assert_eq!((c.rank(), c.world()), (0, 1));
    assert!(
        dir.path().join(ID_FILE).is_file(),
        "rank 0 published the id"
    );
    let t = Tensor::new(&[0f32, 1.0, -2.5, 3.0], &dev).unwrap();
    let s = c.all_reduce_sum(&t.narrow(0, 1, 3).unwrap()).unwrap();
    assert_eq!(s.to_vec1::<f32>().unwrap(), vec![1.0, -2.5, 3.0]);
}

//! A small deterministic parallel batch loader.
//!
//! * The sample order of epoch `e` is a Fisher-Yates shuffle driven by ChaCha8 seeded from
//!   blake3(seed, e) (or the identity order when shuffling is off).
//! * Each sample's augmentation RNG is ChaCha8 seeded from blake3(seed, e, sample index), so a
//!   batch does not depend on thread scheduling, on the batch size, or on which batches were
//!   loaded before it: a resumed run can start at batch `k` of epoch `e` and reproduce it exactly.
//! * Samples of a batch are loaded in parallel with rayon; results keep the batch order.

use std::path::PathBuf;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::jpeg::Decode;
use super::transforms::{decode_rgb, Chw, Transform};
use super::DataError;

/// Something that can produce sample `index` as a CHW image plus a class label.
pub trait Source: Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Load sample `index`; all randomness must come from `rng`.
    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<(Chw, usize), DataError>;
}

/// `(path, label)` samples decoded from disk and passed through a [`Transform`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSamples {
    /// The samples (e.g. `ImageFolder::samples`, `Clevr::samples(task)`).
    pub samples: Vec<(PathBuf, usize)>,
    /// Preprocessing applied to every sample.
    pub transform: Transform,
}

impl Source for ImageSamples {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<(Chw, usize), DataError> {
        let (path, label) = self.samples.get(index).ok_or_else(|| {
            DataError::param(
                "index",
                format!("sample {index} out of range (0..{})", self.samples.len()),
            )
        })?;
        let img = decode_rgb(path)?;
        Ok((self.transform.apply(&img, rng), *label))
    }
}

/// [`ImageSamples`] read with a chosen [`Decode`] mode (`Decode::Exact` loads exactly what
/// [`ImageSamples`] loads).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedImageSamples {
    /// The samples and their transform.
    pub images: ImageSamples,
    /// How the files are decoded.
    pub decode: Decode,
}

impl Source for DecodedImageSamples {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn get(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<(Chw, usize), DataError> {
        let (path, label) = self.images.samples.get(index).ok_or_else(|| {
            DataError::param(
                "index",
                format!(
                    "sample {index} out of range (0..{})",
                    self.images.samples.len()
                ),
            )
        })?;
        Ok((self.images.transform.load(path, self.decode, rng)?, *label))
    }
}

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Shuffle every epoch (train) or keep the source order (eval).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Base seed for shuffling and augmentation.
    pub seed: u64,
}

/// One batch, images stacked as `[B, C, H, W]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `B * C * H * W` values.
    pub images: Vec<f32>,
    /// `[B, C, H, W]`.
    pub shape: [usize; 4],
    /// Class label per sample.
    pub labels: Vec<usize>,
    /// Source index per sample.
    pub indices: Vec<usize>,
}

fn derive_seed(parts: &[u64]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"cjepa.data.loader.v1");
    for p in parts {
        h.update(&p.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

/// The augmentation RNG of sample `index` in epoch `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(derive_seed(&[seed, epoch, index as u64]))
}

/// Deterministic permutation of `0..n` for one epoch (Fisher-Yates on ChaCha8).
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::from_seed(derive_seed(&[seed, epoch, u64::MAX]));
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
        v.swap(i, j);
    }
    v
}

/// Load the given sample indices as one batch, in parallel, deterministically.
pub fn load_batch<S: Source + ?Sized>(
    source: &S,
    indices: &[usize],
    seed: u64,
    epoch: u64,
) -> Result<Batch, DataError> {
    let items: Vec<Result<(Chw, usize), DataError>> = indices
        .par_iter()
        .map(|&i| source.get(i, &mut sample_rng(seed, epoch, i)))
        .collect();
    let mut images = Vec::new();
    let mut labels = Vec::with_capacity(indices.len());
    let mut shape = [indices.len(), 0, 0, 0];
    for (k, item) in items.into_iter().enumerate() {
        let (chw, label) = item?;
        let s = chw.shape();
        if k == 0 {
            shape[1..].copy_from_slice(&s);
            images.reserve(indices.len() * chw.data.len());
        } else if s[..] != shape[1..] {
            return Err(DataError::param(
                "transform",
                format!("sample {} has shape {s:?} but the batch has {:?}; use a transform with a fixed output size", indices[k], &shape[1..]),
            ));
        }
        images.extend_from_slice(&chw.data);
        labels.push(label);
    }
    Ok(Batch {
        images,
        shape,
        labels,
        indices: indices.to_vec(),
    })
}

/// Batches over a [`Source`].
pub struct Loader<'a, S: Source + ?Sized> {
    source: &'a S,
    cfg: LoaderConfig,
    rank: usize,
    world: usize,
}

impl<'a, S: Source + ?Sized> Loader<'a, S> {
    /// A loader; `batch_size` must be > 0.
    pub fn new(source: &'a S, cfg: LoaderConfig) -> Result<Self, DataError> {
        if cfg.batch_size == 0 {
            return Err(DataError::param("batch_size", "must be at least 1"));
        }
        Ok(Loader {
            source,
            cfg,
            rank: 0,
            world: 1,
        })
    }

    /// This rank's shard for data-parallel training: every rank walks the same global epoch order
    /// and takes positions `rank, rank + world, ...` (the tail that does not divide evenly is
    /// dropped, so all ranks see the same number of samples).
    pub fn sharded(mut self, rank: usize, world: usize) -> Result<Self, DataError> {
        if world == 0 || rank >= world {
            return Err(DataError::param(
                "rank",
                format!("rank {rank} of world {world}"),
            ));
        }
        self.rank = rank;
        self.world = world;
        Ok(self)
    }

    fn shard_len(&self) -> usize {
        self.source.len() / self.world
    }

    /// Iterate the batches of `epoch` from batch `start`, loading up to `depth` batches ahead on
    /// a background thread while `f` consumes them in order; `f` returns `false` to stop early.
    pub fn for_each_prefetched<E: From<DataError>>(
        &self,
        epoch: u64,
        start: usize,
        depth: usize,
        mut f: impl FnMut(usize, Batch) -> Result<bool, E>,
    ) -> Result<(), E> {
        let order = self.epoch_order(epoch);
        let n = self.num_batches();
        std::thread::scope(|scope| {
            let (tx, rx) =
                std::sync::mpsc::sync_channel::<(usize, Result<Batch, DataError>)>(depth.max(1));
            let order = &order;
            scope.spawn(move || {
                for k in start..n {
                    if tx
                        .send((k, self.batch_from_order(order, epoch, k)))
                        .is_err()
                    {
                        break; // consumer stopped
                    }
                }
            });
            for (k, b) in rx {
                if !f(k, b?)? {
                    break;
                }
            }
            Ok(())
        })
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Sample order of an epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let all: Vec<usize> = if self.cfg.shuffle {
            epoch_permutation(self.source.len(), self.cfg.seed, epoch)
        } else {
            (0..self.source.len()).collect()
        };
        if self.world == 1 {
            return all;
        }
        all.into_iter()
            .skip(self.rank)
            .step_by(self.world)
            .take(self.shard_len())
            .collect()
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.shard_len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    /// Batch `k` of epoch `epoch` (random access, e.g. to resume).
    pub fn batch(&self, epoch: u64, k: usize) -> Result<Batch, DataError> {
        self.batch_from_order(&self.epoch_order(epoch), epoch, k)
    }

    fn batch_from_order(&self, order: &[usize], epoch: u64, k: usize) -> Result<Batch, DataError> {
        if k >= self.num_batches() {
            return Err(DataError::param(
                "batch",
                format!(
                    "batch {k} out of range (epoch has {} batches)",
                    self.num_batches()
                ),
            ));
        }
        let b = self.cfg.batch_size;
        let end = ((k + 1) * b).min(order.len());
        load_batch(self.source, &order[k * b..end], self.cfg.seed, epoch)
    }

    /// Iterate the batches of `epoch` starting at batch `start`.
    pub fn iter_epoch(&self, epoch: u64, start: usize) -> EpochIter<'_, 'a, S> {
        EpochIter {
            loader: self,
            order: self.epoch_order(epoch),
            epoch,
            next: start,
        }
    }
}

/// Iterator over one epoch's batches.
pub struct EpochIter<'l, 'a, S: Source + ?Sized> {
    loader: &'l Loader<'a, S>,
    order: Vec<usize>,
    epoch: u64,
    next: usize,
}

impl<S: Source + ?Sized> Iterator for EpochIter<'_, '_, S> {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.loader.num_batches() {
            return None;
        }
        let k = self.next;
        self.next += 1;
        Some(self.loader.batch_from_order(&self.order, self.epoch, k))
    }
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    struct Ids(usize);
    impl Source for Ids {
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize, _rng: &mut ChaCha8Rng) -> Result<(Chw, usize), DataError> {
            Ok((
                Chw {
                    channels: 1,
                    height: 1,
                    width: 1,
                    data: vec![index as f32],
                },
                index,
            ))
        }
    }

    fn shuffled(batch_size: usize, drop_last: bool, seed: u64) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last,
            seed,
        }
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_epoch() {
        let src = Ids(103);
        let cfg = shuffled(4, false, 3);
        let mut seen = Vec::new();
        for r in 0..3 {
            let l = Loader::new(&src, cfg).unwrap().sharded(r, 3).unwrap();
            assert_eq!(l.epoch_order(2).len(), 34);
            seen.extend(l.epoch_order(2));
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 102, "disjoint, one sample of the tail dropped");
        assert!(Loader::new(&src, cfg).unwrap().sharded(3, 3).is_err());
    }

    #[test]
    fn prefetch_yields_the_same_batches_in_order() {
        let src = Ids(37);
        let cfg = shuffled(5, true, 9);
        let l = Loader::new(&src, cfg).unwrap();
        let direct: Vec<Vec<usize>> = l.iter_epoch(1, 2).map(|b| b.unwrap().labels).collect();
        let mut pre = Vec::new();
        l.for_each_prefetched::<DataError>(1, 2, 2, |_, b| {
            pre.push(b.labels);
            Ok(true)
        })
        .unwrap();
        assert_eq!(direct, pre);
        let mut n = 0;
        l.for_each_prefetched::<DataError>(1, 0, 2, |_, _| {
            n += 1;
            Ok(n < 3)
        })
        .unwrap();
        assert_eq!(n, 3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_deterministic_permutation() {
        let a = epoch_permutation(100, 7, 3);
        assert_eq!(a, epoch_permutation(100, 7, 3));
        assert_ne!(a, epoch_permutation(100, 7, 4));
        assert_ne!(a, epoch_permutation(100, 8, 3));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert!(epoch_permutation(0, 1, 1).is_empty());
    }
}

//! Seeded generators derived from a stage key, so every random draw is reproducible.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A 64-bit seed from (stage key, base seed, stream name).
pub fn derive_seed(key: &str, seed: u64, stream: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(key.as_bytes());
    h.update(&seed.to_le_bytes());
    h.update(stream.as_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// A ChaCha8 generator for one named stream of a stage.
pub fn stage_rng(key: &str, seed: u64, stream: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(key, seed, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_differ_and_repeat() {
        let a: u64 = stage_rng("k", 0, "masks").gen();
        let b: u64 = stage_rng("k", 0, "masks").gen();
        let c: u64 = stage_rng("k", 0, "data").gen();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

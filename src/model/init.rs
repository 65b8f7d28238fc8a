//! Random initialisation shared by every network: PyTorch's `trunc_normal_`.

use rand::Rng;

/// Normal draws with std `std`, resampled outside `[-2, 2]` (timm / PyTorch `trunc_normal_`
/// with its default absolute bounds, as the official init does), Box-Muller on `rng`.
pub fn trunc_normal(rng: &mut impl Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [
            r * (std::f64::consts::TAU * u2).cos(),
            r * (std::f64::consts::TAU * u2).sin(),
        ] {
            let v = z * std;
            if out.len() < n && v.abs() <= 2.0 {
                out.push(v as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trunc_normal_is_bounded_and_seeded() {
        use rand::SeedableRng;
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let a = trunc_normal(&mut r, 1000, 0.01);
        let mean = a.iter().sum::<f32>() / 1000.0;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.002 && (var.sqrt() - 0.01).abs() < 0.001);
        assert!(trunc_normal(&mut r, 1000, 5.0)
            .iter()
            .all(|x| x.abs() <= 2.0));
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(a, trunc_normal(&mut r, 1000, 0.01));
    }
}

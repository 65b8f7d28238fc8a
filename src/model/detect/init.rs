//! Seeded parameter creation for the detector: a `VarBuilder` backend that creates each variable
//! on first request from its `Init` hint, drawing from a ChaCha8 generator seeded with
//! (base seed, variable name). The values therefore depend only on the seed and the name, never
//! on construction order or on thread scheduling, and a fresh run of a stage is reproducible.
//! The variables land in a [`VarMap`] (for the optimiser and for saving).

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `SimpleBackend` that initialises missing variables from a seed.
pub struct SeededInit {
    vars: VarMap,
    seed: u64,
}

impl SeededInit {
    /// A `VarBuilder` whose variables are created in `vars` with values drawn from `seed`.
    pub fn var_builder(vars: &VarMap, seed: u64, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(SeededInit {
                vars: vars.clone(),
                seed,
            }),
            DType::F32,
            dev.clone(),
        )
    }

    /// A fresh `VarMap` and its seeded `VarBuilder` on the CPU (tests).
    #[cfg(test)]
    pub(crate) fn cpu_vars(seed: u64) -> (VarMap, VarBuilder<'static>) {
        let vars = VarMap::new();
        let vb = Self::var_builder(&vars, seed, &Device::Cpu);
        (vars, vb)
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"cjepa.detect.init\0");
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// `n` standard normals (Box-Muller).
fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        out.push(r * (std::f64::consts::TAU * u2).cos());
        out.push(r * (std::f64::consts::TAU * u2).sin());
    }
    out.truncate(n);
    out
}

/// The values of `init` for a tensor of `shape`, drawn from `rng`.
pub fn init_values(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => normals(rng, n)
            .into_iter()
            .map(|z| (mean + stdev * z) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.gen::<f64>()) as f32)
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let f = fan.for_shape(shape).max(1) as f64;
            let std = non_linearity.gain() / f.sqrt();
            match dist {
                NormalOrUniform::Normal => normals(rng, n)
                    .into_iter()
                    .map(|z| (std * z) as f32)
                    .collect(),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| (-b + 2.0 * b * rng.gen::<f64>()) as f32)
                        .collect()
                }
            }
        }
    }
}

/// Kaiming-normal with fan-out and ReLU gain (detectron2's `c2_msra_fill`).
pub const MSRA_FILL: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: candle_nn::init::NonLinearity::ReLU,
};

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.vars.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "variable `{name}` exists with shape {:?}, requested {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return v.as_tensor().to_dtype(dtype);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.seed, name));
        let vals = init_values(h, &s, &mut rng);
        let t = Tensor::from_vec(vals, s, dev)?.to_dtype(dtype)?;
        let v = Var::from_tensor(&t)?;
        data.insert(name.to_string(), v.clone());
        Ok(v.as_tensor().clone())
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self.vars.data().lock().expect("varmap lock");
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("no variable `{name}` (its shape is unknown)"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_depend_on_seed_and_name_only() {
        let dev = Device::Cpu;
        let draw = |seed: u64, order: &[&str]| {
            let vm = VarMap::new();
            let vb = SeededInit::var_builder(&vm, seed, &dev);
            for n in order {
                vb.get_with_hints(
                    (3, 4),
                    n,
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                )
                .unwrap();
            }
            let d = vm.data().lock().unwrap();
            d["a"].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(draw(1, &["a", "b"]), draw(1, &["b", "a"]));
        assert_ne!(draw(1, &["a"]), draw(2, &["a"]));
    }

    #[test]
    fn normal_init_has_the_asked_spread() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let v = init_values(
            Init::Randn {
                mean: 1.0,
                stdev: 0.5,
            },
            &Shape::from(20000),
            &mut rng,
        );
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((m - 1.0).abs() < 0.02 && (s - 0.5).abs() < 0.02, "{m} {s}");
    }
}

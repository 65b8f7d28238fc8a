//! The three I-JEPA networks and their parameters: context `encoder` + `predictor` (trained, held
//! as `Var`s) and the EMA `target_encoder` (its own `Var`s, updated in place by the EMA; its forward
//! pass uses detached views, so it never records a graph).
//!
//! Parameter names are the official `state_dict` names with the prefixes `encoder.`, `predictor.`
//! and `target_encoder.` (as in `golden/model/*/weights.safetensors`). The frozen sin-cos position
//! embeddings are not parameters: they are recomputed, and a stored copy is only checked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::config::VitConfig;
use super::error::{ModelError, Result};
use super::pos_embed::sincos_2d;
use super::predictor::Predictor;
use super::vit::VisionTransformer;

/// Prefix of the context encoder's parameters.
pub const ENCODER: &str = "encoder";
/// Prefix of the predictor's parameters.
pub const PREDICTOR: &str = "predictor";
/// Prefix of the target encoder's parameters.
pub const TARGET_ENCODER: &str = "target_encoder";

/// Context encoder, predictor and target encoder with their variables.
#[derive(Debug)]
pub struct JepaNetworks {
    /// Architecture.
    pub cfg: VitConfig,
    /// Context encoder (trained).
    pub encoder: VisionTransformer,
    /// Predictor (trained).
    pub predictor: Predictor,
    /// Target encoder (EMA of the context encoder; no gradient).
    pub target_encoder: VisionTransformer,
    online: BTreeMap<String, Var>,
    target: BTreeMap<String, Var>,
}

/// A VarBuilder backend that records every requested name and shape and hands out a broadcast
/// zero (no allocation), to learn a network's parameter list without building it for real.
struct ShapeRecorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.to_string(), s.dims().to_vec());
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: `{name}` requested without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Names and shapes of the trainable parameters (`encoder.*`, `predictor.*`) of `cfg`.
pub fn parameter_shapes(cfg: &VitConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    cfg.validate()?;
    let rec = Arc::new(Mutex::new(BTreeMap::new()));
    {
        let backend: Box<dyn SimpleBackend> = Box::new(ShapeRecorder(rec.clone()));
        let vb = VarBuilder::from_backend(backend, DType::F32, Device::Cpu);
        VisionTransformer::new(cfg, vb.pp(ENCODER))?;
        Predictor::new(cfg, vb.pp(PREDICTOR))?;
    }
    let m = rec.lock().map_err(|_| ModelError::Weights {
        msg: "shape recorder lock poisoned".into(),
    })?;
    Ok(m.clone())
}

/// Official init rule by name: biases 0, 1-D weights (LayerNorm) 1, everything else (Linear and conv
/// weights, `mask_token`) N(0, std^2) truncated at +-2 absolute, as `trunc_normal_(std=0.02)` does.
fn init_value(name: &str, shape: &[usize], std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if name.ends_with("bias") {
        return vec![0.0; n];
    }
    if shape.len() == 1 {
        return vec![1.0; n];
    }
    super::init::trunc_normal(rng, n, std)
}

impl JepaNetworks {
    /// Fresh networks with the official init, drawn from a ChaCha8 generator seeded with `seed`
    /// (names visited in sorted order, so the init is reproducible); the target starts as a copy.
    pub fn new_random(cfg: &VitConfig, seed: u64, device: &Device) -> Result<Self> {
        let shapes = parameter_shapes(cfg)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in shapes {
            let v = init_value(&name, &shape, cfg.init_std, &mut rng);
            tensors.insert(name, Tensor::from_vec(v, shape, device)?);
        }
        Self::from_tensors(cfg, &tensors, device)
    }

    /// Networks from named tensors (`encoder.*`, `predictor.*`, optionally `target_encoder.*`; the
    /// target is copied from the encoder when absent). Every parameter must be present with its
    /// shape, no unknown name is accepted, and a stored `pos_embed` / `predictor_pos_embed` must equal
    /// the sin-cos formula. The tensors are copied: the networks never alias the caller's storage.
    pub fn from_tensors(
        cfg: &VitConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let shapes = parameter_shapes(cfg)?;
        let g = cfg.grid_size();
        let frozen = [
            (format!("{ENCODER}.pos_embed"), cfg.embed_dim),
            (format!("{TARGET_ENCODER}.pos_embed"), cfg.embed_dim),
            (
                format!("{PREDICTOR}.predictor_pos_embed"),
                cfg.pred_embed_dim,
            ),
        ];
        for (name, dim) in &frozen {
            if let Some(t) = tensors.get(name) {
                let want = sincos_2d(*dim, g, g)?;
                let got = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let max = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                if got.len() != want.len() || max > 1e-5 {
                    return Err(ModelError::Weights {
                        msg: format!("`{name}` is not the fixed sin-cos embedding of a {g}x{g} grid at width {dim}"),
                    });
                }
            }
        }
        let has_target = tensors
            .keys()
            .any(|k| k.starts_with(&format!("{TARGET_ENCODER}.")));
        let mut expected: BTreeMap<String, Vec<usize>> = shapes.clone();
        if has_target {
            for (k, s) in &shapes {
                if let Some(rest) = k.strip_prefix(&format!("{ENCODER}.")) {
                    expected.insert(format!("{TARGET_ENCODER}.{rest}"), s.clone());
                }
            }
        }
        for k in tensors.keys() {
            if !expected.contains_key(k) && !frozen.iter().any(|(n, _)| n == k) {
                return Err(ModelError::Weights {
                    msg: format!(
                        "unknown tensor `{k}` for this architecture (embed_dim {}, depth {})",
                        cfg.embed_dim, cfg.depth
                    ),
                });
            }
        }
        let mut online = BTreeMap::new();
        let mut target = BTreeMap::new();
        for (k, shape) in &expected {
            let t = tensors.get(k).ok_or_else(|| ModelError::Weights {
                msg: format!("missing parameter `{k}`"),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::Weights {
                    msg: format!(
                        "`{k}` has shape {:?}, the architecture needs {shape:?}",
                        t.dims()
                    ),
                });
            }
            let var = Var::from_tensor(&t.to_device(device)?.to_dtype(DType::F32)?.copy()?)?;
            if k.starts_with(&format!("{TARGET_ENCODER}.")) {
                target.insert(k.clone(), var);
            } else {
                online.insert(k.clone(), var);
            }
        }
        if !has_target {
            for (k, v) in &online {
                if let Some(rest) = k.strip_prefix(&format!("{ENCODER}.")) {
                    target.insert(
                        format!("{TARGET_ENCODER}.{rest}"),
                        Var::from_tensor(&v.as_tensor().copy()?)?,
                    );
                }
            }
        }
        // Online networks see the variables themselves (gradients recorded); the target network
        // sees detached views of its variables (same storage, no graph).
        let on: HashMap<String, Tensor> = online
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let vb = VarBuilder::from_tensors(on, DType::F32, device);
        let encoder = VisionTransformer::new(cfg, vb.pp(ENCODER))?;
        let predictor = Predictor::new(cfg, vb.pp(PREDICTOR))?;
        let tt: HashMap<String, Tensor> = target
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        let tvb = VarBuilder::from_tensors(tt, DType::F32, device);
        let target_encoder = VisionTransformer::new(cfg, tvb.pp(TARGET_ENCODER))?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            predictor,
            target_encoder,
            online,
            target,
        })
    }

    /// Loads `from_tensors` from a safetensors file.
    pub fn from_safetensors(
        cfg: &VitConfig,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<Self> {
        let t = candle_core::safetensors::load(path, device).map_err(|e| ModelError::Weights {
            msg: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::from_tensors(cfg, &t, device)
    }

    /// Trainable parameters (encoder + predictor), sorted by name.
    pub fn online_vars(&self) -> Vec<(String, Var)> {
        self.online
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Target-encoder variables, sorted by name.
    pub fn target_vars(&self) -> Vec<(String, Var)> {
        self.target
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// `(target var, encoder var)` pairs for the EMA, sorted by name.
    pub fn ema_pairs(&self) -> Vec<(Var, Var)> {
        self.target
            .iter()
            .filter_map(|(k, t)| {
                let rest = k.strip_prefix(&format!("{TARGET_ENCODER}."))?;
                let s = self.online.get(&format!("{ENCODER}.{rest}"))?;
                Some((t.clone(), s.clone()))
            })
            .collect()
    }

    /// Every parameter with its prefixed official name (detached views; copy before mutating).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.online
            .iter()
            .chain(self.target.iter())
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect()
    }

    /// The target encoder's parameters under the encoder's own names (`blocks.0.attn.qkv.weight`,
    /// no prefix): what an `encoder.safetensors` artifact holds (detached views).
    pub fn target_encoder_tensors(&self) -> HashMap<String, Tensor> {
        let prefix = format!("{TARGET_ENCODER}.");
        self.target
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&prefix)
                    .map(|k| (k.to_string(), v.as_detached_tensor()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        VitConfig {
            embed_dim: 12,
            num_heads: 3,
            ..VitConfig::toy()
        }
    }

    #[test]
    fn random_init_is_seeded_and_official() {
        let dev = Device::Cpu;
        let a = JepaNetworks::new_random(&tiny(), 7, &dev).unwrap();
        let b = JepaNetworks::new_random(&tiny(), 7, &dev).unwrap();
        let (sa, sb) = (a.state_tensors(), b.state_tensors());
        assert_eq!(sa.len(), sb.len());
        for (k, t) in &sa {
            let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let y = sb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(x, y, "{k}");
            if k.ends_with("bias") {
                assert!(x.iter().all(|v| *v == 0.0));
            }
            if k.ends_with("norm1.weight") {
                assert!(x.iter().all(|v| *v == 1.0));
            }
        }
        let w = sa["encoder.blocks.0.mlp.fc1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let std = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.006, "std {std}");
        assert_eq!(sa["encoder.norm.weight"].dims(), &[12]);
        assert!(sa.contains_key("target_encoder.patch_embed.proj.weight"));
        assert_eq!(a.ema_pairs().len(), a.target_vars().len());
    }

    #[test]
    fn missing_and_unknown_tensors_are_errors() {
        let dev = Device::Cpu;
        let a = JepaNetworks::new_random(&tiny(), 1, &dev).unwrap();
        let mut s = a.state_tensors();
        s.remove("predictor.mask_token");
        assert!(JepaNetworks::from_tensors(&tiny(), &s, &dev).is_err());
        let mut s = a.state_tensors();
        s.insert(
            "foo.bar".into(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        assert!(JepaNetworks::from_tensors(&tiny(), &s, &dev).is_err());
    }
}

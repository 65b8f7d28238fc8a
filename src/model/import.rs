//! Reading official I-JEPA PyTorch checkpoints (facebookresearch/ijepa `save_checkpoint`:
//! `torch.save({'encoder', 'predictor', 'target_encoder', 'opt', 'scaler', 'epoch', 'loss',
//! 'batch_size', 'world_size', 'lr'}, '*.pth.tar')`).
//!
//! The three networks' state dicts carry the `module.` prefix of DDP-wrapped modules; it is
//! stripped and the official network prefix added, so the result uses the crate's names
//! (`encoder.*`, `predictor.*`, `target_encoder.*`, as [`super::JepaNetworks::from_tensors`]
//! takes them). Every tensor is checked against the architecture before its data is read: a
//! missing, unknown or mis-shaped tensor is an error that names the file, the entry, the key and
//! both shapes, with a guess of the architecture the file holds. The frozen sin-cos position
//! embeddings must equal the formula (within [`POS_EMBED_TOL`]), with one exception: the
//! official training loop's EMA (`param_k.mul_(m).add_((1 - m) * param_q)` over all of
//! `target_encoder.parameters()`) also visits the frozen `target_encoder.pos_embed`, and f32
//! rounding makes it drift from the table (about 1e-5 after ~900 steps, more after long runs).
//! A target table within [`EMA_POS_EMBED_MAX_DRIFT`] of the formula is accepted, replaced by the
//! exact table (what the official model holds at init) and reported in
//! [`IjepaCheckpoint::warnings`] with the measured drift. The optimiser state and the scaler are
//! not read.
//!
//! Only the zip format of `torch.save` (PyTorch >= 1.6) is supported; candle's pickle reader does
//! the unpickling.

use std::collections::BTreeMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::config::VitConfig;
use super::jepa::{parameter_shapes, ENCODER, PREDICTOR, TARGET_ENCODER};
use super::pos_embed::sincos_2d;
use crate::error::{Error, Result};

/// The state-dict entries of a checkpoint, in the order they are read.
pub const NETWORKS: [&str; 3] = [ENCODER, PREDICTOR, TARGET_ENCODER];

/// Largest difference from the sin-cos formula of a frozen position embedding that counts as
/// the formula (f32 rounding of a table computed in f64 or f32).
pub const POS_EMBED_TOL: f32 = 1e-5;

/// Largest drift of `target_encoder.pos_embed` from the formula accepted as EMA drift. Each EMA
/// step `t <- m t + (1 - m) e` (with `e` the exact table of the context encoder) adds about one
/// f32 rounding (~1e-7 for values in [-1, 1]) and pulls the drift back by a factor `m`, so the
/// drift hovers around `1e-7 / (1 - m)`: ~1e-5 early in a run (m = 0.996), more as the momentum
/// schedule approaches 1 in long runs, still orders of magnitude below this bound. A table that
/// is plainly something else (another grid order or size, a learned embedding, zeros) differs
/// from the formula by far more (0.1 to 2).
pub const EMA_POS_EMBED_MAX_DRIFT: f32 = 1e-2;

/// An imported checkpoint.
#[derive(Debug, Clone)]
pub struct IjepaCheckpoint {
    /// Every tensor under its prefixed official name (`encoder.*`, `predictor.*`,
    /// `target_encoder.*`, the frozen `pos_embed`s included), f32 on the CPU.
    pub tensors: BTreeMap<String, Tensor>,
    /// Scalar entries of the top-level dict (`epoch`, `loss`, `lr`, `batch_size`, ...).
    pub meta: Map<String, Value>,
    /// What was accepted but is worth telling the user (e.g. an EMA-drifted target position
    /// embedding that was replaced by the exact table); the caller decides how to show them.
    pub warnings: Vec<String>,
}

impl IjepaCheckpoint {
    /// The tensors of one network without its prefix (`"target_encoder"` -> `blocks.0.*`, ...),
    /// the frozen position embedding left out (it is recomputed from the architecture).
    pub fn network(&self, name: &str) -> BTreeMap<String, Tensor> {
        let prefix = format!("{name}.");
        self.tensors
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(&prefix)?;
                (rest != "pos_embed" && rest != "predictor_pos_embed")
                    .then(|| (rest.to_string(), v.clone()))
            })
            .collect()
    }
}

/// Names and shapes every checkpoint of `cfg` holds: the parameters of the three networks and
/// the frozen position embeddings.
pub fn expected_shapes(cfg: &VitConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    let mut out = parameter_shapes(cfg).map_err(|e| Error::Data(e.to_string()))?;
    let enc: Vec<(String, Vec<usize>)> = out
        .iter()
        .filter_map(|(k, s)| {
            k.strip_prefix(&format!("{ENCODER}."))
                .map(|r| (format!("{TARGET_ENCODER}.{r}"), s.clone()))
        })
        .collect();
    out.extend(enc);
    let n = cfg.num_patches();
    for net in [ENCODER, TARGET_ENCODER] {
        out.insert(format!("{net}.pos_embed"), vec![1, n, cfg.embed_dim]);
    }
    out.insert(
        format!("{PREDICTOR}.predictor_pos_embed"),
        vec![1, n, cfg.pred_embed_dim],
    );
    Ok(out)
}

/// Read and check an official I-JEPA checkpoint against the architecture `cfg`.
pub fn read_ijepa_checkpoint(path: &Path, cfg: &VitConfig) -> Result<IjepaCheckpoint> {
    cfg.validate()
        .map_err(|e| Error::Data(format!("{e} (the architecture given for the import)")))?;
    let file = path.display().to_string();
    let top = read_top_level(path)?;
    let keys: Vec<String> = top.iter().map(|(k, _)| k.clone()).collect();
    let meta: Map<String, Value> = top
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), scalar(v)?)))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    for net in NETWORKS {
        if !keys.iter().any(|k| k == net) {
            return Err(Error::Data(format!(
                "{file}: no `{net}` entry; an I-JEPA checkpoint holds `encoder`, `predictor` and `target_encoder` state dicts (this file has: {})",
                keys.join(", ")
            )));
        }
    }
    let expected = expected_shapes(cfg)?;
    // Pass 1: names and shapes only (no tensor data read).
    let mut sources: Vec<(String, PthTensors)> = Vec::new();
    let mut found: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    for net in NETWORKS {
        let pth = PthTensors::new(path, Some(net))
            .map_err(|e| Error::Data(format!("{file}: cannot read the `{net}` state dict: {e}")))?;
        if pth.tensor_infos().is_empty() {
            return Err(Error::Data(format!(
                "{file}: `{net}` holds no tensors (is it a state dict?)"
            )));
        }
        for (key, info) in pth.tensor_infos() {
            let name = format!("{net}.{}", key.strip_prefix("module.").unwrap_or(key));
            found.insert(name, (key.clone(), info.layout.dims().to_vec()));
        }
        sources.push((net.to_string(), pth));
    }
    let guess = describe(&found);
    let hint = |msg: String| -> Error {
        Error::Data(format!(
            "{msg}; the model given has embed_dim {}, depth {}, patch {}, img {}, pred_embed_dim {}, pred_depth {}{guess}",
            cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.img_size, cfg.pred_embed_dim, cfg.pred_depth
        ))
    };
    for (name, (key, dims)) in &found {
        let net = name.split('.').next().unwrap_or_default();
        match expected.get(name) {
            None => {
                return Err(hint(format!(
                    "{file}: `{net}` key `{key}` is not a parameter of the model (shape {dims:?})"
                )))
            }
            Some(want) if want != dims => {
                return Err(hint(format!(
                    "{file}: `{net}` key `{key}`: the model wants shape {want:?}, the file has {dims:?}"
                )))
            }
            _ => {}
        }
    }
    let missing: Vec<&String> = expected
        .keys()
        .filter(|k| !found.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().take(5).map(|k| format!("`{k}`")).collect();
        return Err(hint(format!(
            "{file}: {} tensor(s) of the model are missing, e.g. {}",
            missing.len(),
            list.join(", ")
        )));
    }
    // Pass 2: the data.
    let mut tensors = BTreeMap::new();
    for (net, pth) in &sources {
        for key in pth.tensor_infos().keys() {
            let name = format!("{net}.{}", key.strip_prefix("module.").unwrap_or(key));
            let t = pth
                .get(key)
                .and_then(|t| {
                    t.ok_or_else(|| candle_core::Error::Msg("no data".into()))?
                        .to_dtype(DType::F32)
                })
                .map_err(|e| Error::Data(format!("{file}: `{net}` key `{key}`: {e}")))?;
            tensors.insert(name, t);
        }
    }
    let warnings = check_pos_embeds(&file, cfg, &mut tensors)?;
    Ok(IjepaCheckpoint {
        tensors,
        meta,
        warnings,
    })
}

/// The largest `|a - b|` (infinite when a value is not finite).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_finite() {
                d
            } else {
                f32::INFINITY
            }
        })
        .fold(0f32, f32::max)
}

/// The frozen position embeddings must be the sin-cos formula of the model's grid; the target
/// encoder's may have drifted under the EMA by up to [`EMA_POS_EMBED_MAX_DRIFT`], and is then
/// replaced by the exact table (the returned warning gives the drift). Shapes were checked
/// before.
fn check_pos_embeds(
    file: &str,
    cfg: &VitConfig,
    t: &mut BTreeMap<String, Tensor>,
) -> Result<Vec<String>> {
    let g = cfg.grid_size();
    let mut warnings = Vec::new();
    for (name, dim, ema) in [
        (format!("{ENCODER}.pos_embed"), cfg.embed_dim, false),
        (format!("{TARGET_ENCODER}.pos_embed"), cfg.embed_dim, true),
        (
            format!("{PREDICTOR}.predictor_pos_embed"),
            cfg.pred_embed_dim,
            false,
        ),
    ] {
        let want = sincos_2d(dim, g, g).map_err(|e| Error::Data(e.to_string()))?;
        let got = t[&name].flatten_all()?.to_vec1::<f32>()?;
        let max = max_abs_diff(&got, &want);
        if max <= POS_EMBED_TOL {
            continue;
        }
        if ema && max <= EMA_POS_EMBED_MAX_DRIFT {
            let shape = t[&name].dims().to_vec();
            t.insert(name.clone(), Tensor::from_vec(want, shape, &Device::Cpu)?);
            warnings.push(format!(
                "{file}: `{name}` differs from the fixed 2-D sin-cos embedding of a {g}x{g} grid by up to {max:.3e} (drift of the training loop's EMA, which also updates this frozen table); imported as the exact table"
            ));
            continue;
        }
        let why = if ema {
            format!(
                "; more than the {EMA_POS_EMBED_MAX_DRIFT:.0e} an EMA drift of the target encoder can reach"
            )
        } else {
            String::new()
        };
        return Err(Error::Data(format!(
            "{file}: `{name}` is not the fixed 2-D sin-cos embedding of a {g}x{g} grid (max difference {max:.3e}{why})"
        )));
    }
    Ok(warnings)
}

/// What the checkpoint's tensors say about its architecture, for error messages.
fn describe(found: &BTreeMap<String, (String, Vec<usize>)>) -> String {
    let dims = |n: &str| found.get(n).map(|(_, d)| d.clone());
    let count = |prefix: &str| {
        found
            .keys()
            .filter_map(|k| {
                k.strip_prefix(prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1)
    };
    let mut parts = Vec::new();
    if let Some(d) = dims("encoder.patch_embed.proj.weight").filter(|d| d.len() == 4) {
        parts.push(format!("embed_dim {}, patch {}", d[0], d[2]));
        if let Some(p) = dims("encoder.pos_embed").filter(|p| p.len() == 3) {
            let side = (p[1] as f64).sqrt().round() as usize;
            if side * side == p[1] {
                parts.push(format!("img {}", side * d[2]));
            }
        }
    }
    let depth = count("encoder.blocks.");
    if depth > 0 {
        parts.push(format!("depth {depth}"));
    }
    if let Some(d) = dims("predictor.predictor_embed.weight").filter(|d| d.len() == 2) {
        parts.push(format!("pred_embed_dim {}", d[0]));
    }
    let pd = count("predictor.predictor_blocks.");
    if pd > 0 {
        parts.push(format!("pred_depth {pd}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("; the file looks like {}", parts.join(", "))
    }
}

/// The top-level dict of a `torch.save` zip archive as `(key, value)` pairs.
fn read_top_level(path: &Path) -> Result<Vec<(String, Object)>> {
    let file = path.display().to_string();
    let f = fs_err::File::open(path)?;
    let mut zip = zip::ZipArchive::new(BufReader::new(f)).map_err(|e| {
        Error::Data(format!(
            "{file}: not a PyTorch zip checkpoint ({e}); files written by torch.save before PyTorch 1.6 must be re-saved: torch.save(torch.load(f), f)"
        ))
    })?;
    let raw = zip
        .file_names_raw()
        .find(|n| n.ends_with(b"data.pkl"))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| Error::Data(format!("{file}: no data.pkl in the archive")))?;
    let pkl = String::from_utf8_lossy(&raw).into_owned();
    let entry = zip
        .by_name_raw(&raw)
        .map_err(|e| Error::Data(format!("{file}: {pkl}: {e}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut BufReader::new(entry))
        .map_err(|e| Error::Data(format!("{file}: cannot unpickle {pkl}: {e}")))?;
    let obj = stack
        .finalize()
        .map_err(|e| Error::Data(format!("{file}: cannot unpickle {pkl}: {e}")))?;
    match obj {
        Object::Dict(kv) => Ok(kv
            .into_iter()
            .filter_map(|(k, v)| match k {
                Object::Unicode(s) => Some((s, v)),
                _ => None,
            })
            .collect()),
        other => Err(Error::Data(format!(
            "{file}: the saved object is not a dict but {}; an I-JEPA checkpoint is a dict of state dicts",
            kind_of(&other)
        ))),
    }
}

fn kind_of(o: &Object) -> &'static str {
    match o {
        Object::Class { .. } => "a class",
        Object::Int(_) | Object::Long(_) => "an integer",
        Object::Float(_) => "a float",
        Object::Unicode(_) => "a string",
        Object::Bool(_) => "a bool",
        Object::None => "None",
        Object::Tuple(_) => "a tuple",
        Object::List(_) => "a list",
        Object::Mark => "a mark",
        Object::Dict(_) => "a dict",
        Object::Reduce { .. } | Object::Build { .. } => "an object",
        Object::PersistentLoad(_) => "a tensor storage",
    }
}

fn scalar(o: &Object) -> Option<Value> {
    Some(match o {
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(f) => Value::from(*f),
        Object::Unicode(s) => Value::from(s.clone()),
        Object::Bool(b) => Value::from(*b),
        Object::None => Value::Null,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_shapes_mirror_the_encoder_and_describe_guesses() {
        let cfg = VitConfig {
            patch_size: 8,
            embed_dim: 16,
            depth: 2,
            mlp_ratio: 4.0,
            ..VitConfig::toy()
        };
        let s = expected_shapes(&cfg).unwrap();
        let count = |p: &str| s.keys().filter(|k| k.starts_with(p)).count();
        assert_eq!(count("encoder."), count("target_encoder."));
        assert_eq!(s["target_encoder.pos_embed"], vec![1, 16, 16]);
        assert_eq!(s["predictor.predictor_pos_embed"], vec![1, 16, 8]);
        assert_eq!(s["target_encoder.blocks.1.mlp.fc1.weight"], vec![64, 16]);
        let found: BTreeMap<String, (String, Vec<usize>)> = s
            .iter()
            .map(|(k, v)| (k.clone(), (format!("module.{k}"), v.clone())))
            .collect();
        assert_eq!(
            describe(&found),
            "; the file looks like embed_dim 16, patch 8, img 32, depth 2, pred_embed_dim 8, pred_depth 1"
        );
    }

    #[test]
    fn a_file_that_is_not_a_zip_archive_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("legacy.pth.tar");
        std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
        let e = read_ijepa_checkpoint(&p, &VitConfig::vit_tiny())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("legacy.pth.tar") && e.contains("not a PyTorch zip checkpoint"),
            "{e}"
        );
    }
}

//! `knn` stage: weighted k-nearest-neighbour classification on frozen features, as DINO's
//! `eval_knn.py` (`knn_classifier`): train and val features L2-normalised, cosine similarity,
//! the `k` (20) most similar train images vote for their class with weight
//! `exp(similarity / T)` (T = 0.07); the class with the largest vote is the prediction. `top1`
//! and `top5` (top-min(5, k) as DINO) in percent.
//!
//! Features come from the shared cache (`features.rs`): by default the patch-mean of the last
//! block (`feature: last`), or the last-4 concatenation (`feature: last4`).
//! `at_epoch: k` probes the upstream pretrain stage's snapshot of epoch k (see
//! [`super::backbone`]) instead of its final weights.

use candle_core::{Tensor, D};
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::features::{FeatureSet, FrozenEncoder};
use super::{params_of, StageContext, StageOutput};
use crate::error::{Error, Result};

/// Implementation version (part of the key).
pub const VERSION: u32 = 1;

/// Params of a `knn` stage (defaults: DINO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// The frozen encoder (`checkpoint`, `at_epoch`, `img_size`, `extract_batch`).
    #[serde(flatten)]
    pub encoder: FrozenEncoder,
    /// Neighbours.
    pub k: usize,
    /// Temperature of the vote weights.
    pub temperature: f64,
    /// `last` or `last4`.
    pub feature: FeatureSet,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            encoder: FrozenEncoder::default(),
            k: 20,
            temperature: 0.07,
            feature: FeatureSet::Last,
        }
    }
}

/// Validate params.
pub fn resolve(params: &serde_json::Map<String, Value>) -> std::result::Result<Value, String> {
    let v = super::resolve_flattened::<Params>(params)?;
    let p: Params = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    p.encoder.check()?;
    if p.k == 0 {
        return Err("`k` must be at least 1".into());
    }
    if p.temperature <= 0.0 || p.temperature.is_nan() {
        return Err("`temperature` must be > 0".into());
    }
    Ok(v)
}

/// Top-1 and top-5 hit counts of the weighted k-NN vote. `train` `(N, D)` and `val` `(M, D)`
/// must be L2-normalised already.
pub fn knn_hits(
    train: &Tensor,
    train_labels: &[usize],
    val: &Tensor,
    val_labels: &[usize],
    classes: usize,
    k: usize,
    temperature: f64,
) -> Result<(usize, usize)> {
    let device_topk = !val.device().is_cpu();
    knn_hits_with(
        train,
        train_labels,
        val,
        val_labels,
        (classes, k, temperature),
        device_topk,
    )
}

/// [`knn_hits`] with the top-k taken where the similarities live (`device_topk`, the GPU path)
/// or over the whole rows on the host.
fn knn_hits_with(
    train: &Tensor,
    train_labels: &[usize],
    val: &Tensor,
    val_labels: &[usize],
    (classes, k, temperature): (usize, usize, f64),
    device_topk: bool,
) -> Result<(usize, usize)> {
    let n = train.dim(0)?;
    let m = val.dim(0)?;
    let k = k.min(n);
    let top = 5.min(k);
    let chunk = (64 * 1024 * 1024 / n.max(1)).clamp(1, 1024);
    let train_t = train.t()?;
    let (mut h1, mut h5) = (0, 0);
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let sim = val.narrow(0, start, len)?.matmul(&train_t)?;
        let labels = &val_labels[start..start + len];
        if device_topk {
            // on a GPU only the k best of each row come back (see `eval::topk`)
            let (vals, idxs) = crate::eval::topk::topk_rows(&sim, k)?;
            for ((row_v, row_i), &y) in vals.iter().zip(&idxs).zip(labels) {
                let mut votes = vec![0f64; classes];
                for (&v, &i) in row_v.iter().zip(row_i) {
                    votes[train_labels[i as usize]] += (v as f64 / temperature).exp();
                }
                let above = votes.iter().filter(|&&v| v > votes[y]).count();
                h1 += usize::from(above == 0);
                h5 += usize::from(above < top);
            }
            start += len;
            continue;
        }
        let sim = sim.to_vec2::<f32>()?;
        let hits: Vec<(bool, bool)> = sim
            .par_iter()
            .zip(labels.par_iter())
            .map(|(row, &y)| {
                let mut idx: Vec<usize> = (0..n).collect();
                if k < n {
                    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
                    idx.truncate(k);
                }
                let mut votes = vec![0f64; classes];
                for &i in &idx {
                    votes[train_labels[i]] += (row[i] as f64 / temperature).exp();
                }
                let above = votes.iter().filter(|&&v| v > votes[y]).count();
                (above == 0, above < top)
            })
            .collect();
        h1 += hits.iter().filter(|h| h.0).count();
        h5 += hits.iter().filter(|h| h.1).count();
        start += len;
    }
    Ok((h1, h5))
}

/// L2-normalise rows.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Run the k-NN evaluation.
pub fn run(ctx: &mut StageContext) -> Result<StageOutput> {
    let p: Params = params_of(ctx)?;
    let dev = super::backbone::device(ctx)?;
    let bb = p.encoder.load(ctx, &dev)?;
    let (train, val, feats) = p.encoder.imagefolder_features(ctx, &bb, &dev)?;
    let xt = l2_normalize(&p.feature.select(&feats.train)?.to_device(&dev)?)?;
    let xv = l2_normalize(&p.feature.select(&feats.val)?.to_device(&dev)?)?;
    let ty: Vec<usize> = train.samples.iter().map(|s| s.1).collect();
    let vy: Vec<usize> = val.samples.iter().map(|s| s.1).collect();
    if ty.is_empty() || vy.is_empty() {
        return Err(Error::stage(&ctx.job.id, "empty train or val split"));
    }
    ctx.progress.set(0, 1, "k-NN vote");
    let (h1, h5) = knn_hits(&xt, &ty, &xv, &vy, train.num_classes(), p.k, p.temperature)?;
    ctx.progress.set(1, 1, "k-NN vote");
    let mut out = StageOutput::default();
    let top1 = 100.0 * h1 as f64 / vy.len() as f64;
    let top5 = 100.0 * h5 as f64 / vy.len() as f64;
    ctx.log(format!(
        "k-NN (k {}, T {}): top1 {top1:.2} top5 {top5:.2}",
        p.k, p.temperature
    ));
    out.metrics.insert("top1".into(), top1);
    out.metrics.insert("top5".into(), top5);
    feats.add_metrics(&mut out);
    out.info = json!({
        "protocol": "frozen-knn",
        "backbone": bb.source,
        "k": p.k,
        "temperature": p.temperature,
        "feature": p.feature,
        "features": feats.info(),
    });
    Ok(out)
}

/// The `knn` kind.
pub struct Knn;

impl crate::kind::Kind for Knn {
    kind_basics!(resolve, run);

    encoder_hooks!(None);

    fn cost(&self, params: &serde_json::Value) -> crate::kind::Cost {
        use crate::kind::{Cost, Pass, Schedule};
        Cost::from_params(params, |p: Params| {
            let img = p.encoder.img_size.map(|i| i as usize);
            Cost::of(Pass::Forward, img, Schedule::OnePass)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weighted_vote() {
        let dev = Device::Cpu;
        // Train: two class-0 points near e1, three class-1 points near e2.
        let train = l2_normalize(
            &Tensor::new(
                &[[1f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]],
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let tl = [0, 0, 1, 1, 1];
        let val = l2_normalize(&Tensor::new(&[[1f32, 0.05], [0.05, 1.0]], &dev).unwrap()).unwrap();
        // k = 5: the plain count would say class 1 for the first query (3 vs 2); the weights
        // at T = 0.07 say class 0.
        let (h1, h5) = knn_hits(&train, &tl, &val, &[0, 1], 2, 5, 0.07).unwrap();
        assert_eq!((h1, h5), (2, 2));
        // At a huge temperature the weights are equal: the majority (class 1) wins both.
        let (h1, _) = knn_hits(&train, &tl, &val, &[0, 1], 2, 5, 1e6).unwrap();
        assert_eq!(h1, 1);
        // k = 1: nearest neighbour.
        let (h1, _) = knn_hits(&train, &tl, &val, &[1, 1], 2, 1, 0.07).unwrap();
        assert_eq!(h1, 1);
    }

    /// The GPU path (top-k on the device, `eval::topk`) counts the hits of the host path.
    #[test]
    fn device_topk_path_gives_the_host_hits() {
        let dev = Device::Cpu;
        let train = l2_normalize(&Tensor::randn(0f32, 1.0, (200, 8), &dev).unwrap()).unwrap();
        let val = l2_normalize(&Tensor::randn(0f32, 1.0, (50, 8), &dev).unwrap()).unwrap();
        let tl: Vec<usize> = (0..200).map(|i| (i * 7) % 6).collect();
        let vl: Vec<usize> = (0..50).map(|i| (i * 5) % 6).collect();
        for k in [1, 5, 20] {
            let host = knn_hits_with(&train, &tl, &val, &vl, (6, k, 0.07), false).unwrap();
            let device = knn_hits_with(&train, &tl, &val, &vl, (6, k, 0.07), true).unwrap();
            assert_eq!(host, device, "k {k}");
        }
    }
}

//! Mask sampler statistics vs `model/mask_stats.json` (official `MaskCollator`, README §9).
//!
//! Our RNG differs from torch's, so only statistics can match. Exact checks: the reachable
//! block-size sets, the theoretical size distribution (enumerating every float32 draw), the
//! context block geometry, zero coverage of the last row/column and zero context∩target overlap.
//! Statistical checks use tolerances derived from the sample size of each run: batches are the
//! independent units (all images of a batch share one block size), so every mean is compared
//! with `z · √2 · SE`, where SE = sd(per-batch values)/√n_batches is measured on our own run and
//! `√2` accounts for the golden value carrying the same sampling noise; z = 4 for scalars and
//! z = 5 for the 14×14 coverage maps (max over ~170 cells). Frequencies and K_pred are compared
//! with the exact theoretical distribution using its exact binomial / discrete SE (z = 4). On the
//! golden runs (B=128×500, B=16×200) this gives roughly the README's suggested bounds
//! (±0.07/±0.11 for sizes, ±1.5/±2.5 for K_enc), which were checked against two official runs.
use super::golden::roots;
use cjepa::model::masks::{block_size, possible_block_sizes, MaskConfig, MaskSampler, RawMasks};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const MAPS: [&str; 5] = [
    "context_after_truncation",
    "context_before_truncation",
    "context_block_raw",
    "target_union_per_image",
    "target_per_block",
];
/// Scalars per batch: K_pred, K_enc after, K_enc before (mean), ctx∩tgt overlap, pairwise overlap.
const NS: usize = 5;

fn pair(v: &Value) -> [f64; 2] {
    let a = v.as_array().expect("pair");
    [a[0].as_f64().unwrap(), a[1].as_f64().unwrap()]
}

fn hw_key(s: &str) -> (usize, usize) {
    let (h, w) = s.split_once('x').expect("HxW key");
    (h.parse().unwrap(), w.parse().unwrap())
}

/// Per-component running sums over batches.
struct Acc {
    n: f64,
    sum: Vec<f64>,
    sq: Vec<f64>,
}

impl Acc {
    fn add(&mut self, x: &[f64]) {
        self.n += 1.0;
        for (i, v) in x.iter().enumerate() {
            self.sum[i] += v;
            self.sq[i] += v * v;
        }
    }
    fn mean(&self, i: usize) -> f64 {
        self.sum[i] / self.n
    }
    fn se(&self, i: usize) -> f64 {
        let m = self.mean(i);
        let var = ((self.sq[i] / self.n - m * m) * self.n / (self.n - 1.0)).max(0.0);
        (var / self.n).sqrt()
    }
}

/// Per-batch statistic vector: NS scalars, then the 5 maps of H·W cells each.
fn batch_stats(raw: &RawMasks, gh: usize, gw: usize) -> Vec<f64> {
    let n = gh * gw;
    let m = raw.collate();
    let b = raw.enc[0].len();
    let (nenc, npred) = (raw.enc.len(), raw.pred.len());
    let mut v = vec![0.0; NS + 5 * n];
    v[0] = m.k_pred() as f64;
    v[1] = m.k_enc() as f64;
    let lists = (nenc * b) as f64;
    v[2] = raw
        .enc
        .iter()
        .flatten()
        .map(|l| l.len() as f64)
        .sum::<f64>()
        / lists;
    let (mut ov, mut pw, mut pairs) = (0.0, 0.0, 0.0);
    for img in 0..b {
        let mut union = vec![false; n];
        for (i, blocks) in raw.pred.iter().enumerate() {
            for &k in &blocks[img] {
                union[k as usize] = true;
                v[NS + 4 * n + k as usize] += 1.0 / (b * npred) as f64;
            }
            for other in &raw.pred[i + 1..] {
                let set: BTreeSet<u32> = other[img].iter().copied().collect();
                let inter = blocks[img].iter().filter(|k| set.contains(k)).count();
                pw += inter as f64 / blocks[img].len() as f64;
                pairs += 1.0;
            }
        }
        for (k, &u) in union.iter().enumerate() {
            v[NS + 3 * n + k] += f64::from(u8::from(u)) / b as f64;
        }
        for j in 0..nenc {
            let w = 1.0 / lists;
            let ctx = &raw.enc[j][img];
            ov += ctx.iter().filter(|&&k| union[k as usize]).count() as f64 / ctx.len() as f64;
            for &k in &m.enc[j][img] {
                v[NS + k as usize] += w;
            }
            for &k in ctx {
                v[NS + n + k as usize] += w;
            }
            let blk = raw.enc_blocks[j][img];
            for r in blk.top..blk.top + blk.h {
                for c in blk.left..blk.left + blk.w {
                    v[NS + 2 * n + r * gw + c] += w;
                }
            }
        }
    }
    v[3] = ov / lists;
    v[4] = if pairs > 0.0 { pw / pairs } else { 0.0 };
    v
}

/// Exact size distribution of one float32 draw: every u = k / 2^24.
fn exact_distribution(
    gh: usize,
    gw: usize,
    s: [f64; 2],
    a: [f64; 2],
) -> BTreeMap<(usize, usize), f64> {
    let mut counts = vec![0u64; gh * gw];
    let steps = 1u32 << 24;
    for k in 0..steps {
        let (h, w) = block_size(gh, gw, s, a, k as f64 / steps as f64);
        counts[h * gw + w] += 1;
    }
    let mut out = BTreeMap::new();
    for (i, c) in counts.into_iter().enumerate().filter(|(_, c)| *c > 0) {
        out.insert((i / gw, i % gw), c as f64 / steps as f64);
    }
    out
}

fn check_file(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).expect("read mask_stats.json");
    let v: Value = serde_json::from_str(&text).expect("parse mask_stats.json");
    let c = &v["config"];
    let g = c["grid"].as_array().expect("grid");
    let (gh, gw) = (
        g[0].as_u64().unwrap() as usize,
        g[1].as_u64().unwrap() as usize,
    );
    let n = gh * gw;
    let cfg = MaskConfig {
        enc_blocks: c["nenc"].as_u64().unwrap() as usize,
        enc_scale: pair(&c["enc_mask_scale"]),
        enc_aspect: [1.0, 1.0],
        pred_blocks: c["npred"].as_u64().unwrap() as usize,
        pred_scale: pair(&c["pred_mask_scale"]),
        pred_aspect: pair(&c["aspect_ratio"]),
        min_keep: c["min_keep"].as_u64().unwrap() as usize,
        allow_overlap: c["allow_overlap"].as_bool().unwrap(),
        edge_quirk: true,
    };
    let sampler = MaskSampler::new(cfg.clone(), gh, gw).expect("golden config validates");
    let ctx = path.display().to_string();

    // Exact: reachable sizes and the theoretical distribution.
    let theo: BTreeMap<(usize, usize), f64> = v["theoretical_pred_block_size_distribution"]
        .as_object()
        .expect("theoretical dist")
        .iter()
        .map(|(k, p)| (hw_key(k), p.as_f64().unwrap()))
        .collect();
    let exact = exact_distribution(gh, gw, cfg.pred_scale, cfg.pred_aspect);
    let reach = possible_block_sizes(gh, gw, cfg.pred_scale, cfg.pred_aspect);
    assert_eq!(
        exact.keys().copied().collect::<BTreeSet<_>>(),
        reach,
        "{ctx}"
    );
    assert_eq!(
        exact.keys().collect::<Vec<_>>(),
        theo.keys().collect::<Vec<_>>(),
        "{ctx}"
    );
    for (k, p) in &exact {
        // The golden sweep is rounded to 6 decimals.
        assert!(
            (p - theo[k]).abs() < 1e-5,
            "{ctx}: P({k:?}) = {p}, golden {}",
            theo[k]
        );
    }
    let enc_theo: BTreeSet<(usize, usize)> = v["theoretical_enc_block_size_distribution"]
        .as_object()
        .expect("enc dist")
        .keys()
        .map(|k| hw_key(k))
        .collect();
    assert_eq!(
        possible_block_sizes(gh, gw, cfg.enc_scale, cfg.enc_aspect),
        enc_theo
    );
    let kp_mean: f64 = exact.iter().map(|((h, w), p)| (h * w) as f64 * p).sum();
    let kp_var: f64 = exact
        .iter()
        .map(|((h, w), p)| ((h * w) as f64 - kp_mean).powi(2) * p)
        .sum();

    for (ri, run) in v["runs"].as_array().expect("runs").iter().enumerate() {
        let bsz = run["batch_size"].as_u64().unwrap() as usize;
        let nb = run["n_batches"].as_u64().unwrap() as usize;
        let ctx = format!("{ctx} run {ri} (B={bsz} x {nb})");
        let mut rng = ChaCha8Rng::seed_from_u64(run["global_torch_seed"].as_u64().unwrap_or(0));
        let mut acc = Acc {
            n: 0.0,
            sum: vec![0.0; NS + 5 * n],
            sq: vec![0.0; NS + 5 * n],
        };
        let mut sizes: BTreeMap<(usize, usize), f64> = BTreeMap::new();
        let mut relax = 0;
        for _ in 0..nb {
            let raw = sampler.sample_raw(&mut rng, bsz);
            *sizes.entry(raw.pred_size).or_default() += 1.0 / nb as f64;
            assert!(
                enc_theo.contains(&raw.enc_size),
                "{ctx}: enc size {:?}",
                raw.enc_size
            );
            if raw.enc_size == (gh - 1, gw - 1) {
                assert!(raw
                    .enc_blocks
                    .iter()
                    .flatten()
                    .all(|b| (b.top, b.left) == (0, 0)));
            }
            relax += raw.relaxations;
            acc.add(&batch_stats(&raw, gh, gw));
        }
        // Target-size frequencies vs the exact distribution (binomial SE over batches).
        for (k, p) in &exact {
            let got = sizes.get(k).copied().unwrap_or(0.0);
            let tol = 4.0 * (p * (1.0 - p) / nb as f64).sqrt();
            assert!(
                (got - p).abs() <= tol,
                "{ctx}: freq {k:?} {got} vs {p} (tol {tol})"
            );
        }
        assert!(
            sizes.keys().all(|k| exact.contains_key(k)),
            "{ctx}: {sizes:?}"
        );
        let tol = 4.0 * (kp_var / nb as f64).sqrt();
        assert!(
            (acc.mean(0) - kp_mean).abs() <= tol,
            "{ctx}: K_pred {} vs {kp_mean}",
            acc.mean(0)
        );
        // Scalars vs the golden run.
        let gold = [
            run["K_enc_after_truncation"]["mean"].as_f64().unwrap(),
            run["K_enc_before_truncation_mean"].as_f64().unwrap(),
            run["target_pairwise_overlap_fraction_mean"]
                .as_f64()
                .unwrap(),
        ];
        for (i, want) in [(1, gold[0]), (2, gold[1]), (4, gold[2])] {
            let tol = 4.0 * 2f64.sqrt() * acc.se(i);
            let got = acc.mean(i);
            assert!(
                (got - want).abs() <= tol,
                "{ctx}: stat {i} = {got} vs {want} (tol {tol})"
            );
        }
        // Context / target overlap: none when the golden run has none (exactly), else its mean.
        let overlap = &run["context_target_overlap_fraction"];
        if overlap["max"].as_f64() == Some(0.0) {
            assert_eq!(acc.mean(3), 0.0, "{ctx}: context overlaps targets");
        } else {
            let want = overlap["mean"].as_f64().expect("overlap mean");
            let tol = 4.0 * 2f64.sqrt() * acc.se(3);
            assert!(
                (acc.mean(3) - want).abs() <= tol,
                "{ctx}: context/target overlap {} vs {want} (tol {tol})",
                acc.mean(3)
            );
        }
        // Relaxations (rare events): exactly none when the golden run has none, else a count
        // within 4 SE of a difference of two Poisson counts of that mean.
        let want = run["context_relaxation_events"].as_u64().unwrap();
        if want == 0 {
            assert_eq!(relax as u64, 0, "{ctx}: relaxation events");
        } else {
            let tol = 4.0 * (2.0 * want as f64).sqrt();
            assert!(
                (relax as f64 - want as f64).abs() <= tol,
                "{ctx}: {relax} relaxation events vs {want} (tol {tol})"
            );
        }
        // Coverage maps.
        for (m, name) in MAPS.iter().enumerate() {
            let rows = run["coverage"][*name].as_array().expect("coverage map");
            assert_eq!(rows.len(), gh, "{ctx}: {name} rows");
            for (r, row) in rows.iter().enumerate() {
                let row = row.as_array().expect("coverage row");
                assert_eq!(row.len(), gw, "{ctx}: {name} row {r}");
                for (col, want) in row.iter().enumerate() {
                    let want = want.as_f64().unwrap();
                    let i = NS + m * n + r * gw + col;
                    let got = acc.mean(i);
                    if r == gh - 1 || col == gw - 1 {
                        assert_eq!((got, want), (0.0, 0.0), "{ctx}: {name}[{r}][{col}]");
                        continue;
                    }
                    let tol = 5.0 * 2f64.sqrt() * acc.se(i) + 1e-6;
                    assert!(
                        (got - want).abs() <= tol,
                        "{ctx}: {name}[{r}][{col}] = {got} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn mask_stats_match_official_collator() {
    let mut checked = 0;
    for (i, root) in roots().iter().enumerate() {
        let path = root.join("model/mask_stats.json");
        if !path.exists() {
            assert!(i > 0, "repo golden copy {} is missing", path.display());
            continue;
        }
        check_file(&path);
        checked += 1;
    }
    assert!(checked > 0);
}

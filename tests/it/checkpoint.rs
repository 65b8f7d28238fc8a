//! `cjepa checkpoint import` on a tiny official-layout I-JEPA checkpoint written by PyTorch
//! (`tests/fixtures/make_ijepa_pth.py`): weights round-trip exactly, the imported encoder gives
//! PyTorch's pooled features, a stage loads it with `checkpoint: DIR`, bad inputs exit 2 with the
//! file, key and shapes named. `cjepa embed` on a synthetic ImageFolder: shapes, the file list,
//! determinism, and `last` = the token mean of the encoder's final output through the library.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use cjepa::data::loader::{load_batch, ImageSamples};
use cjepa::data::Transform;
use cjepa::model::{JepaNetworks, VitConfig};
use cjepa::stages::backbone;
use cjepa::stages::features::{extract_layers, pooled};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_ijepa.json")).unwrap()).unwrap()
}

fn cjepa(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cjepa"))
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fixture's architecture as a model file in `dir`, and the import into `dir/imported`.
fn import(dir: &Path) -> PathBuf {
    let model = dir.join("tiny.yaml");
    std::fs::write(&model, serde_yaml::to_string(&expected()["model"]).unwrap()).unwrap();
    let src = fixture("tiny_ijepa.pth.tar");
    let (code, out, err) = cjepa(
        dir,
        &[
            "checkpoint",
            "import",
            src.to_str().unwrap(),
            "--model",
            "tiny.yaml",
            "--out",
            "imported",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("78 tensors, epoch 3"), "{out}");
    dir.join("imported")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The fixture's inputs: sin(0.37 (b + 1) + 0.11 c + 0.05 y - 0.07 x), (2, 3, 32, 32).
fn images() -> Tensor {
    let mut v = Vec::with_capacity(2 * 3 * 32 * 32);
    for b in 0..2 {
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let a =
                        0.37 * (b + 1) as f64 + 0.11 * c as f64 + 0.05 * y as f64 - 0.07 * x as f64;
                    v.push(a.sin() as f32);
                }
            }
        }
    }
    Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

fn assert_close(got: &[f32], want: &Value, tol: f32, what: &str) {
    let want: Vec<f32> = want
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(got.len(), want.len(), "{what}: length");
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max <= tol,
        "{what}: max |candle - torch| = {max:e} > {tol:e}"
    );
}

#[test]
fn import_round_trips_weights_and_matches_torch_features() {
    let d = tempfile::tempdir().unwrap();
    let out = import(d.path());
    let exp = expected();
    let full = candle_core::safetensors::load(out.join("full.safetensors"), &Device::Cpu).unwrap();
    // Exact weights: `module.` stripped, network prefix added.
    for (key, s) in exp["samples"].as_object().unwrap() {
        let (net, key) = key.split_once(':').unwrap_or(("target_encoder", key));
        let name = format!("{net}.{}", key.strip_prefix("module.").unwrap());
        let i = s["index"].as_u64().unwrap() as usize;
        let got = flat(&full[&name])[i];
        assert_eq!(got, s["value"].as_f64().unwrap() as f32, "{name}[{i}]");
    }
    // The encoder artifact is the target encoder, unprefixed, without the frozen pos-embed.
    let enc =
        candle_core::safetensors::load(out.join("encoder.safetensors"), &Device::Cpu).unwrap();
    assert!(!enc.contains_key("pos_embed"));
    for (k, v) in &enc {
        assert_eq!(flat(v), flat(&full[&format!("target_encoder.{k}")]), "{k}");
    }
    let target_differs = enc
        .iter()
        .any(|(k, v)| flat(v) != flat(&full[&format!("encoder.{k}")]));
    assert!(
        target_differs,
        "the fixture's target encoder differs from its encoder"
    );
    // The full file is a complete set of the three networks (pos-embeds checked).
    let cfg: VitConfig = serde_json::from_value(exp["model"].clone()).unwrap();
    JepaNetworks::from_safetensors(&cfg, &out.join("full.safetensors"), &Device::Cpu).unwrap();
    // Features of the imported encoder = PyTorch's.
    let bb = backbone::open(&out, None, &Device::Cpu).unwrap();
    assert_eq!(bb.cfg, cfg);
    let all = pooled(&bb.encoder, &images(), &extract_layers(cfg.depth)).unwrap();
    let last = all.get(all.dim(0).unwrap() - 1).unwrap();
    assert_close(&flat(&last), &exp["last"], 2e-5, "last");
    let last4 = all
        .permute((1, 0, 2))
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((2, ()))
        .unwrap();
    assert_close(&flat(&last4), &exp["last4"], 2e-5, "last4");
    // The .pth.tar read directly (cjepa embed / checkpoint: FILE.pth.tar) gives the same encoder.
    let direct = backbone::open(&fixture("tiny_ijepa.pth.tar"), Some(cfg), &Device::Cpu).unwrap();
    let again = pooled(&direct.encoder, &images(), &[-1]).unwrap();
    assert_eq!(flat(&again), flat(&last));
}

#[test]
fn import_errors_name_file_key_and_shapes_and_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("tiny_ijepa.pth.tar");
    let src = src.to_str().unwrap();
    let (code, _, err) = cjepa(
        d.path(),
        &["checkpoint", "import", src, "--model", "vit_small"],
    );
    assert_eq!(code, 2, "{err}");
    for want in [
        "tiny_ijepa.pth.tar",
        "module.",
        "wants shape [384]",
        "the file has [16]",
        "embed_dim 16, patch 8, img 32, depth 2",
    ] {
        assert!(err.contains(want), "`{want}` not in: {err}");
    }
    assert!(!fixture("tiny_ijepa").exists(), "nothing written on error");
    // Same width, one block more: a missing tensor.
    let mut m = expected()["model"].clone();
    m["depth"] = 3.into();
    std::fs::write(
        d.path().join("deep.yaml"),
        serde_yaml::to_string(&m).unwrap(),
    )
    .unwrap();
    let (code, _, err) = cjepa(
        d.path(),
        &["checkpoint", "import", src, "--model", "deep.yaml"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("missing") && err.contains("blocks.2."),
        "{err}"
    );
    // Not a zip archive; unknown preset.
    std::fs::write(d.path().join("old.pth.tar"), b"\x80\x02legacy").unwrap();
    let (code, _, err) = cjepa(
        d.path(),
        &[
            "checkpoint",
            "import",
            "old.pth.tar",
            "--model",
            "vit_small",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("old.pth.tar") && err.contains("not a PyTorch zip checkpoint"),
        "{err}"
    );
    let (code, _, err) = cjepa(
        d.path(),
        &["checkpoint", "import", src, "--model", "vit_enormous"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("vit_enormous"), "{err}");
}

/// A copy of the fixture with `drift` added to every entry of `<net>`'s `module.<key>` (sign
/// alternating), as the official EMA leaves a frozen table; the rest of the archive unchanged.
fn drifted_fixture(dir: &Path, net: &str, key: &str, drift: f32) -> PathBuf {
    use std::io::{Read, Write};
    let src = fixture("tiny_ijepa.pth.tar");
    let pth = candle_core::pickle::PthTensors::new(&src, Some(net)).unwrap();
    let info = &pth.tensor_infos()[&format!("module.{key}")];
    assert!(info.layout.is_contiguous());
    let (start, n) = (info.layout.start_offset(), info.layout.shape().elem_count());
    let mut zin = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let dst = dir.join(format!("drifted_{net}_{drift}.pth.tar"));
    let mut zout = zip::ZipWriter::new(std::fs::File::create(&dst).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut hit = false;
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        if name == info.path {
            hit = true;
            for j in 0..n {
                let o = (start + j) * 4;
                let v = f32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
                let d = if j % 2 == 0 { drift } else { -drift };
                bytes[o..o + 4].copy_from_slice(&(v + d).to_le_bytes());
            }
        }
        zout.start_file(name, opts).unwrap();
        zout.write_all(&bytes).unwrap();
    }
    zout.finish().unwrap();
    assert!(hit, "no storage {} in the fixture", info.path);
    dst
}

/// The official loop's EMA also updates the frozen `target_encoder.pos_embed`: a checkpoint whose
/// table drifted by 3e-5 imports, with a warning giving the drift, and the exact table; a drift
/// that no EMA reaches, or any drift of a table the EMA does not touch, is still refused.
#[test]
fn import_accepts_an_ema_drifted_target_pos_embed_with_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny.yaml");
    std::fs::write(&model, serde_yaml::to_string(&expected()["model"]).unwrap()).unwrap();
    let cfg: VitConfig = serde_json::from_value(expected()["model"].clone()).unwrap();
    let g = cfg.grid_size();
    let exact = cjepa::model::pos_embed::sincos_2d(cfg.embed_dim, g, g).unwrap();

    let drifted = drifted_fixture(d.path(), "target_encoder", "pos_embed", 3e-5);
    let ck = cjepa::model::import::read_ijepa_checkpoint(&drifted, &cfg).unwrap();
    assert_eq!(ck.warnings.len(), 1, "{:?}", ck.warnings);
    assert!(
        ck.warnings[0].contains("target_encoder.pos_embed") && ck.warnings[0].contains("3.0"),
        "{}",
        ck.warnings[0]
    );
    assert_eq!(flat(&ck.tensors["target_encoder.pos_embed"]), exact);
    assert_eq!(
        ck.tensors["target_encoder.pos_embed"].dims(),
        &[1, g * g, cfg.embed_dim]
    );
    let clean =
        cjepa::model::import::read_ijepa_checkpoint(&fixture("tiny_ijepa.pth.tar"), &cfg).unwrap();
    assert!(clean.warnings.is_empty(), "{:?}", clean.warnings);

    let (code, out, err) = cjepa(
        d.path(),
        &[
            "checkpoint",
            "import",
            drifted.to_str().unwrap(),
            "--model",
            "tiny.yaml",
            "--out",
            "imported",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let warn = err
        .lines()
        .find(|l| l.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no warning on stderr: {err}"));
    // The drift measured in f32: 3e-5 up to the rounding of the sums.
    let max: f32 = warn
        .split("by up to ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no drift in {warn}"));
    assert!((max - 3e-5).abs() < 1e-6, "{warn}");
    assert!(!out.contains("warning"), "warnings go to stderr: {out}");
    let full =
        candle_core::safetensors::load(d.path().join("imported/full.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(flat(&full["target_encoder.pos_embed"]), exact);
    JepaNetworks::from_safetensors(
        &cfg,
        &d.path().join("imported/full.safetensors"),
        &Device::Cpu,
    )
    .unwrap();

    // Too large for an EMA drift: refused, the bound named.
    let wrong = drifted_fixture(d.path(), "target_encoder", "pos_embed", 0.05);
    let (code, _, err) = cjepa(
        d.path(),
        &[
            "checkpoint",
            "import",
            wrong.to_str().unwrap(),
            "--model",
            "tiny.yaml",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("target_encoder.pos_embed")
            && err.contains("1e-2")
            && !err.contains("panicked"),
        "{err}"
    );
    // The context encoder's table is never updated by the EMA: any drift is refused.
    let enc = drifted_fixture(d.path(), "encoder", "pos_embed", 3e-5);
    let e = cjepa::model::import::read_ijepa_checkpoint(&enc, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`encoder.pos_embed` is not the fixed"), "{e}");
}

#[test]
fn a_stage_loads_the_imported_folder() {
    let d = tempfile::tempdir().unwrap();
    import(d.path());
    let yaml = "name: imported\nstore: store\ndefaults:\n  device: cpu\nstages:\n  data:\n    kind: dataset\n    \
                source: synth\n    format: imagefolder\n    params: {classes: 3, train_per_class: 4, val_per_class: 2, size: 32}\n  \
                knn:\n    kind: knn\n    needs: [data]\n    checkpoint: imported\n    params: {k: 3}\n";
    std::fs::write(d.path().join("p.yaml"), yaml).unwrap();
    let (code, out, err) = cjepa(d.path(), &["run", "p.yaml", "--plain", "--threads", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    let store = cjepa::store::Store::open(&d.path().join("store"), true, "test").unwrap();
    let knn = store
        .records()
        .unwrap()
        .into_iter()
        .find(|r| r.stage_id == "knn")
        .expect("knn record");
    assert!(
        (0.0..=100.0).contains(&knn.metrics["top1"]),
        "{:?}",
        knn.metrics
    );
}

/// A random tiny encoder artifact (the producer contract) in `dir/enc`.
fn random_encoder(dir: &Path) -> (VitConfig, PathBuf) {
    let cfg: VitConfig = serde_json::from_value(expected()["model"].clone()).unwrap();
    let nets = JepaNetworks::new_random(&cfg, 11, &Device::Cpu).unwrap();
    let enc: HashMap<String, Tensor> = nets.target_encoder_tensors();
    let out = dir.join("enc");
    backbone::save(&out, &cfg, &enc).unwrap();
    (cfg, out)
}

#[test]
fn embed_writes_pooled_features_of_every_image() {
    let d = tempfile::tempdir().unwrap();
    let (cfg, enc) = random_encoder(d.path());
    let (code, out, err) = cjepa(
        d.path(),
        &[
            "data",
            "synth",
            "imagefolder",
            "imgs",
            "--size",
            "classes=3",
            "--size",
            "train_per_class=3",
            "--size",
            "val_per_class=2",
            "--size",
            "size=40",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let embed = |out: &str, batch: &str| {
        let (code, o, e) = cjepa(
            d.path(),
            &[
                "embed",
                "--checkpoint",
                enc.to_str().unwrap(),
                "--images",
                "imgs",
                "--out",
                out,
                "--batch",
                batch,
                "--device",
                "cpu",
            ],
        );
        assert_eq!(code, 0, "{o}{e}");
        let t = candle_core::safetensors::load(d.path().join(out), &Device::Cpu).unwrap();
        let side: Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join(out).with_extension("json")).unwrap(),
        )
        .unwrap();
        (t, side)
    };
    let (a, side) = embed("a.safetensors", "4");
    let n = 3 * 3 + 3 * 2;
    assert_eq!(a["last"].dims(), &[n, cfg.embed_dim]);
    assert_eq!(
        a["last4"].dims(),
        &[n, 2 * cfg.embed_dim],
        "depth 2: two blocks"
    );
    let files: Vec<String> = side["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    assert_eq!(files.len(), n);
    assert!(
        files[0].starts_with("train/") && files[n - 1].starts_with("val/"),
        "{files:?}"
    );
    let mut sorted = files.clone();
    sorted.sort();
    assert_eq!(
        files, sorted,
        "ImageFolder order (class names have no '-' here)"
    );
    // Deterministic; the batch size does not change the features (beyond rounding).
    let (b, _) = embed("b.safetensors", "4");
    assert_eq!(flat(&a["last"]), flat(&b["last"]));
    assert_eq!(flat(&a["last4"]), flat(&b["last4"]));
    let (c, _) = embed("c.safetensors", "15");
    let diff = flat(&a["last4"])
        .iter()
        .zip(flat(&c["last4"]))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "batch 4 vs 15: {diff}");
    // `last` = mean over tokens of the final normed output, through the library API; the last
    // block of `last4` is `last`.
    let bb = backbone::open(&enc, None, &Device::Cpu).unwrap();
    let paths: Vec<(PathBuf, usize)> = files
        .iter()
        .map(|f| (d.path().join("imgs").join(f), 0))
        .collect();
    let src = ImageSamples {
        samples: paths,
        transform: Transform::imagenet_eval(cfg.img_size as u32),
    };
    let batch = load_batch(&src, &(0..n).collect::<Vec<_>>(), 0, 0).unwrap();
    let x = Tensor::from_vec(batch.images, batch.shape.to_vec(), &Device::Cpu).unwrap();
    let want = bb
        .encoder
        .forward_features(&x, None)
        .unwrap()
        .mean(1)
        .unwrap();
    let diff = flat(&want)
        .iter()
        .zip(flat(&a["last"]))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "last vs forward_features mean: {diff}");
    let tail = a["last4"].narrow(1, cfg.embed_dim, cfg.embed_dim).unwrap();
    assert_eq!(flat(&tail), flat(&a["last"]));
    // Errors: unknown checkpoint, no images.
    std::fs::create_dir_all(d.path().join("empty")).unwrap();
    let (code, _, err) = cjepa(
        d.path(),
        &[
            "embed",
            "--checkpoint",
            enc.to_str().unwrap(),
            "--images",
            "empty",
            "--out",
            "x.safetensors",
            "--device",
            "cpu",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no images"), "{err}");
    let (code, _, err) = cjepa(
        d.path(),
        &[
            "embed",
            "--checkpoint",
            "nope",
            "--images",
            "imgs",
            "--out",
            "x.safetensors",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nope"), "{err}");
}

//! Unit tests of `features`.

use super::*;

#[test]
fn layers_and_sets() {
    assert_eq!(extract_layers(12), vec![-4, -3, -2, -1]);
    assert_eq!(extract_layers(2), vec![-2, -1]);
    let dev = Device::Cpu;
    // (L=2, N=3, D=2): layer l, image n, dim d = 100 l + 10 n + d
    let v: Vec<f32> = (0..2)
        .flat_map(|l| (0..3).flat_map(move |n| (0..2).map(move |d| (100 * l + 10 * n + d) as f32)))
        .collect();
    let all = Tensor::from_vec(v, (2, 3, 2), &dev).unwrap();
    let last = FeatureSet::Last.select(&all).unwrap();
    assert_eq!(last.to_vec2::<f32>().unwrap()[1], vec![110.0, 111.0]);
    let cat = FeatureSet::Last4.select(&all).unwrap();
    assert_eq!(
        cat.to_vec2::<f32>().unwrap()[2],
        vec![20.0, 21.0, 120.0, 121.0]
    );
}

fn tiny_cfg() -> crate::model::VitConfig {
    crate::model::VitConfig {
        patch_size: 8,
        embed_dim: 16,
        depth: 2,
        pred_embed_dim: 16,
        ..crate::model::VitConfig::toy()
    }
}

/// `checkpoint: upstream` reads an encoder artifact written with `backbone::save` (the
/// producer contract); its features are extracted once, then found in the store's cache.
#[test]
fn upstream_artifact_features_are_extracted_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let data = tmp.path().join("data");
    let sp = crate::data::synth::SynthParams::tiny();
    crate::data::synth::synth(crate::data::DataFormat::ImageFolder, &data, 1, &sp).unwrap();
    let cfg = tiny_cfg();
    let dev = Device::Cpu;
    let nets = crate::model::JepaNetworks::new_random(&cfg, 3, &dev).unwrap();
    let enc: std::collections::HashMap<String, Tensor> = nets.target_encoder_tensors();
    let art = store.join("artifacts").join("pt");
    backbone::save(&art, &cfg, &enc).unwrap();
    let up = |id: &str, kind: &str, artifacts: PathBuf, info: Value| UpstreamRef {
        id: id.into(),
        kind: kind.into(),
        key: format!("{id}{}", "0".repeat(60)),
        artifacts,
        config: json!({}),
        metrics: Default::default(),
        info,
    };
    let mut upstream = BTreeMap::new();
    upstream.insert(
        "pt".to_string(),
        up("pt", "pretrain", art.clone(), json!({})),
    );
    upstream.insert(
        "data".to_string(),
        up(
            "data",
            "dataset",
            tmp.path().join("nowhere"),
            json!({ "path": data, "format": "imagefolder" }),
        ),
    );
    let mut ctx = crate::kind::context::test_context(&store, "probekey", upstream, tmp.path());
    let bb = load_backbone(&ctx, "upstream", &dev).unwrap();
    assert!(bb.source.starts_with("pt "), "{}", bb.source);
    let same = backbone::build("x", cfg.clone(), &enc, &dev, "x".into()).unwrap();
    assert_eq!(weights_digest(&bb).unwrap(), weights_digest(&same).unwrap());
    let (root, train, val) = imagefolder_splits(&ctx).unwrap();
    let paths = |s: &[(PathBuf, usize)]| s.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    let (tp, vp) = (paths(&train.samples), paths(&val.samples));
    let u = dataset_upstream(&ctx).unwrap().clone();
    let req = FeatureRequest {
        dataset: &u,
        root: &root,
        train: &tp,
        val: &vp,
        transform: Transform::imagenet_eval(32),
        batch: 5,
    };
    let f1 = extract_or_load(&mut ctx, &bb, &req, &dev).unwrap();
    assert!(!f1.cached);
    assert_eq!(f1.train.dims(), &[2, 12, 16]);
    assert_eq!(f1.val.dims(), &[2, 6, 16]);
    assert!(f1.dir.starts_with(store.join("cache").join("features")));
    let f2 = extract_or_load(&mut ctx, &bb, &req, &dev).unwrap();
    assert!(f2.cached);
    assert_eq!(f2.digest, f1.digest);
    let (a, b) = (
        f1.train.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        f2.train.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(a, b);
    // The cached row of image 3 equals a direct forward of that image alone (batching
    // does not change the features).
    let one = ImageSamples {
        samples: vec![(tp[3].clone(), 0)],
        transform: Transform::imagenet_eval(32),
    };
    let bt = load_batch(&one, &[0], 0, 0).unwrap();
    let direct = encode(&bb.encoder, &bt, &[-2, -1], &dev).unwrap();
    let d = direct
        .get(1)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let c = f1
        .train
        .get(1)
        .unwrap()
        .get(3)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (x, y) in d.iter().zip(&c) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // Another transform is another entry.
    let req2 = FeatureRequest {
        transform: Transform::clevr(32, false),
        ..req.clone()
    };
    let f3 = extract_or_load(&mut ctx, &bb, &req2, &dev).unwrap();
    assert!(!f3.cached && f3.digest != f1.digest);
    f1.link_into(tmp.path()).unwrap();
    assert!(tmp.path().join(FEATURES_FILE).is_file());
}

#[test]
fn topk_counts() {
    let dev = Device::Cpu;
    let logits = Tensor::new(
        &[
            [0.9f32, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        ],
        &dev,
    )
    .unwrap();
    let labels = Tensor::new(&[0u32, 3, 1], &dev).unwrap();
    let (t1, t5) = topk_hits(&logits, &labels).unwrap();
    assert_eq!(t1.to_scalar::<f32>().unwrap(), 1.0);
    // sample 1: 3 classes above -> top5 hit; sample 2: 5 above -> miss
    assert_eq!(t5.to_scalar::<f32>().unwrap(), 2.0);
}

/// The three feature probes share the encoder block: `img` still reads as `img_size`, the
/// resolved params hold the block's keys first and unchanged (so the stage keys are those of
/// the params before the block), and an unknown key names every valid one, the block's too.
#[test]
fn the_probes_share_the_frozen_encoder_block() {
    let map = |v: serde_json::Value| v.as_object().unwrap().clone();
    let resolvers: [(
        &str,
        fn(
            &serde_json::Map<String, serde_json::Value>,
        ) -> std::result::Result<serde_json::Value, String>,
    ); 3] = [
        ("knn", crate::stages::knn::resolve),
        ("linear_probe", crate::stages::linear_probe::resolve),
        ("clevr", crate::stages::clevr::resolve),
    ];
    for (name, resolve) in resolvers {
        let v = resolve(&map(
            serde_json::json!({ "checkpoint": "random", "img": 48 }),
        ))
        .unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().take(2).collect();
        assert_eq!(keys, ["checkpoint", "img_size"], "{name}");
        assert_eq!(v["checkpoint"], "random", "{name}");
        assert_eq!(v["img_size"], 48, "{name}");
        assert!(v.get("at_epoch").is_none(), "{name}: {v}");
        let v = resolve(&map(serde_json::json!({ "at_epoch": 2 }))).unwrap();
        assert_eq!(v["at_epoch"], 2, "{name}");
        assert_eq!(v["checkpoint"], "upstream", "{name}");
        let e = resolve(&map(
            serde_json::json!({ "checkpoint": "random", "at_epoch": 2 }),
        ))
        .unwrap_err();
        assert!(e.contains("at_epoch"), "{name}: {e}");
        let e = resolve(&map(serde_json::json!({ "chekpoint": "random" }))).unwrap_err();
        assert!(e.contains("unknown key `chekpoint`"), "{name}: {e}");
        assert!(e.contains("did you mean `checkpoint`?"), "{name}: {e}");
        assert!(
            e.contains("valid keys: ") && e.contains("img_size") && e.contains("extract_batch"),
            "{name}: {e}"
        );
    }
}

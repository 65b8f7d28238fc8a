//! Unit tests of `backbone`.

use super::*;

fn tiny() -> VitConfig {
    VitConfig::toy()
}

#[test]
fn at_epoch_needs_a_listed_snapshot_of_an_upstream_pretrain() {
    assert!(check_at_epoch("upstream", Some(3)).is_ok());
    assert!(check_at_epoch("random", None).is_ok());
    let e = check_at_epoch("random", Some(3)).unwrap_err();
    assert!(
        e.contains("at_epoch") && e.contains("checkpoint: upstream"),
        "{e}"
    );
    assert!(check_at_epoch("upstream", Some(0))
        .unwrap_err()
        .contains("at_epoch"));
    let pt = serde_json::json!({"epochs": 10, "snapshot_epochs": [2, 5]});
    let ds = serde_json::json!({});
    let ups = [("data", "dataset", &ds), ("pt", "pretrain", &pt)];
    check_upstream_snapshot(5, &ups).unwrap();
    let e = check_upstream_snapshot(4, &ups).unwrap_err();
    assert!(
        e.contains("add 4 to that stage's `snapshot_epochs`") && e.contains("`pt`"),
        "{e}"
    );
    assert!(check_upstream_snapshot(10, &ups)
        .unwrap_err()
        .contains("drop it"));
    assert!(check_upstream_snapshot(11, &ups)
        .unwrap_err()
        .contains("trains only 10"));
    let e = check_upstream_snapshot(2, &ups[..1]).unwrap_err();
    assert!(e.contains("needs a `pretrain` stage"), "{e}");
    let ft = serde_json::json!({});
    let e = check_upstream_snapshot(2, &[("ft", "finetune", &ft)]).unwrap_err();
    assert!(e.contains("only `pretrain`"), "{e}");
    assert_eq!(
        snapshot_dir(Path::new("a"), 7),
        Path::new("a").join("snapshots").join("epoch-7")
    );
}

#[test]
fn devices_parse_or_name_the_fix() {
    assert!(parse_device("cpu").unwrap().is_cpu());
    for bad in ["gpu", "cuda:x", "cuda:-1"] {
        assert!(matches!(parse_device(bad), Err(Error::Usage(_))), "{bad}");
    }
    if !cfg!(feature = "cuda") {
        let e = parse_device("cuda:0").unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(parse_device("auto").unwrap().is_cpu());
    }
}

#[test]
fn open_reads_folders_and_files_with_their_model_json() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny();
    let nets = JepaNetworks::new_random(&cfg, 3, &Device::Cpu).unwrap();
    let enc: HashMap<String, Tensor> = nets.target_encoder_tensors();
    let dir = d.path().join("art");
    save(&dir, &cfg, &enc).unwrap();
    assert_eq!(weights_file(&dir), dir.join(ENCODER_FILE));
    let a = open(&dir, None, &Device::Cpu).unwrap();
    let b = open(&dir.join(ENCODER_FILE), None, &Device::Cpu).unwrap();
    assert_eq!(a.cfg, cfg);
    assert_eq!(b.cfg, cfg);
    // A bare file needs the architecture; a wrong one names the tensor and both shapes.
    let bare = d.path().join("bare.safetensors");
    candle_core::safetensors::save(&enc, &bare).unwrap();
    assert!(matches!(
        open(&bare, None, &Device::Cpu),
        Err(Error::Usage(_))
    ));
    open(&bare, Some(cfg.clone()), &Device::Cpu).unwrap();
    let wide = VitConfig {
        embed_dim: 16,
        ..cfg
    };
    let Err(e) = open(&bare, Some(wide), &Device::Cpu) else {
        panic!("a 16-wide model loaded 8-wide weights");
    };
    assert!(matches!(e, Error::Data(_)), "{e}");
    assert!(e.to_string().contains("the model wants"), "{e}");
}

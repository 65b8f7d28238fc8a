//! Unit tests of `pretrain`.

use super::*;
use crate::data::synth::{synth, SynthParams};

#[test]
fn pretraining_reads_the_images_of_each_image_format() {
    let tmp = tempfile::tempdir().unwrap();
    let p = SynthParams::tiny();
    let (folder, clevr) = (tmp.path().join("if"), tmp.path().join("clevr"));
    synth(DataFormat::ImageFolder, &folder, 0, &p).unwrap();
    synth(DataFormat::Clevr, &clevr, 0, &p).unwrap();

    let f = pretraining_images(&folder, DataFormat::ImageFolder, "train").unwrap();
    assert_eq!(f.len(), 3 * 4);
    let c = pretraining_images(&clevr, DataFormat::Clevr, "train").unwrap();
    assert_eq!(c.len(), p.clevr.train_images);
    assert!(c.iter().all(|(path, label)| *label == 0 && path.is_file()));
    assert_eq!(
        pretraining_images(&clevr, DataFormat::Clevr, "val")
            .unwrap()
            .len(),
        p.clevr.val_images
    );
    // a CLEVR root is not an imagefolder, and the error names the missing folder
    let e = pretraining_images(&clevr, DataFormat::ImageFolder, "test").unwrap_err();
    assert!(e.to_string().contains("test"), "{e}");
    let e = pretraining_images(&clevr, DataFormat::Coco, "train").unwrap_err();
    assert!(e.to_string().contains("`coco`"), "{e}");

    // ADE20K: the training images (annotations unused); DAVIS: every frame of the split's
    // sequences, in sequence order
    let (ade, davis) = (tmp.path().join("ade"), tmp.path().join("davis"));
    synth(DataFormat::Ade20k, &ade, 0, &p).unwrap();
    synth(DataFormat::Davis, &davis, 0, &p).unwrap();
    let a = pretraining_images(&ade, DataFormat::Ade20k, "train").unwrap();
    assert_eq!(a.len(), p.ade20k.train_images);
    assert!(a.iter().all(|(path, label)| *label == 0
        && path.extension().is_some_and(|e| e == "jpg")
        && path.to_string_lossy().contains("training")));
    let d = pretraining_images(&davis, DataFormat::Davis, "train").unwrap();
    assert_eq!(d.len(), p.davis.train_sequences * p.davis.frames);
    assert!(d.iter().all(|(path, _)| path.is_file()));
    let dv = pretraining_images(&davis, DataFormat::Davis, "val").unwrap();
    assert_eq!(dv.len(), p.davis.val_sequences * p.davis.frames);
    assert!(
        dv.iter().all(|v| !d.contains(v)),
        "train and val frames are apart"
    );
}

/// A checkpoint of the format before the shared loop (`state.json`: step, series, last values)
/// resumes with its step and series; a folder without one is not taken for it.
#[test]
fn a_state_json_checkpoint_resumes_with_its_step_and_series() {
    let tmp = tempfile::tempdir().unwrap();
    fs_err::write(
        tmp.path().join("state.json"),
        r#"{"step": 40, "series": {"loss": [[1, 0.5], [40, 0.25]]},
            "last": {"loss": 0.25, "loss_jepa": 0.2, "loss_sim": 0.0, "loss_std": 0.0,
                     "loss_cov": 0.0, "target_std": 0.1, "lr": 0.001}}"#,
    )
    .unwrap();
    let st = checkpoints::legacy_state(tmp.path())
        .unwrap()
        .expect("read");
    assert_eq!(st.step, 40);
    assert_eq!(st.curves["loss"], vec![(1, 0.5), (40, 0.25)]);
    let empty = tempfile::tempdir().unwrap();
    assert!(checkpoints::legacy_state(empty.path()).unwrap().is_none());
}

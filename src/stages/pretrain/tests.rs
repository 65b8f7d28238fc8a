//! Unit tests of `pretrain`.

use super::*;
use crate::data::synth::{synth, SynthParams};

#[test]
fn pretraining_reads_the_images_of_an_imagefolder_or_a_clevr_split() {
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
}

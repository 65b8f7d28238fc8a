//! Dataset layer: synthesise every format, check it, corrupt it, fingerprint it; read the
//! golden real-format files; CLEVR labels against the VTAB golden values; loader determinism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cjepa::data::ade20k::{read_label_png, reduce_zero_label};
use cjepa::data::clevr::{ClevrScenes, ClevrTask};
use cjepa::data::coco::{CategoryMap, CocoDataset, CocoFile, RleCounts, Segmentation};
use cjepa::data::davis::{read_palette_png, Davis};
use cjepa::data::imagefolder::ImageFolder;
use cjepa::data::loader::{ImageSamples, Loader, LoaderConfig};
use cjepa::data::transforms::Transform;
use cjepa::data::{check, synth, CheckReport, DataFormat, SynthParams};
use serde_json::Value;

use crate::golden;

fn params() -> SynthParams {
    let mut p = SynthParams::tiny();
    p.coco.crowd_prob = 0.5;
    p
}

fn make(format: DataFormat, seed: u64) -> (tempfile::TempDir, CheckReport) {
    let dir = tempfile::tempdir().unwrap();
    synth(format, dir.path(), seed, &params()).unwrap();
    let report = check(format, dir.path()).unwrap();
    assert!(report.is_ok(), "{}", report.summary());
    (dir, report)
}

fn counts(r: &CheckReport, split: &str) -> (usize, usize) {
    let c = &r.splits[split];
    (c.images, c.annotations)
}

fn only_problem_names(r: &CheckReport, file: &Path) {
    assert!(!r.is_ok());
    assert!(
        !r.problems_for(file.file_name().unwrap().to_str().unwrap())
            .is_empty(),
        "{}",
        r.summary()
    );
    assert!(
        r.summary().contains(&file.display().to_string()),
        "{}",
        r.summary()
    );
}

#[test]
fn imagefolder_synth_check_and_corrupt() {
    let (dir, r) = make(DataFormat::ImageFolder, 1);
    assert_eq!(counts(&r, "train").0, 12);
    assert_eq!(counts(&r, "val").0, 6);
    let want: BTreeMap<String, usize> = ["circle", "square", "triangle"]
        .iter()
        .map(|c| (c.to_string(), 4))
        .collect();
    assert_eq!(r.splits["train"].classes, want);
    let ds = ImageFolder::open(dir.path(), "train").unwrap();
    assert_eq!(ds.classes, vec!["circle", "square", "triangle"]);
    assert_eq!(ds.samples.len(), 12);
    assert_eq!(ds.samples[4].1, 1);
    let victim = ds.samples[5].0.clone();
    std::fs::write(&victim, b"definitely not a jpeg").unwrap();
    only_problem_names(
        &check(DataFormat::ImageFolder, dir.path()).unwrap(),
        &victim,
    );
}

#[test]
fn coco_synth_check_and_corrupt() {
    let (dir, r) = make(DataFormat::Coco, 2);
    assert_eq!(counts(&r, "train").0, 6);
    assert_eq!(counts(&r, "val").0, 3);
    let ds = CocoDataset::open(dir.path(), "train").unwrap();
    assert_eq!(ds.categories.ids(), &[1, 3, 7, 18, 44]);
    let areas: Vec<f64> = ds
        .file
        .annotations
        .iter()
        .filter(|a| a.iscrowd == 0)
        .map(|a| a.area)
        .collect();
    assert!(
        areas.iter().any(|&a| a < 1024.0),
        "no small object: {areas:?}"
    );
    assert!(
        areas.iter().any(|&a| a > 1024.0 && a < 9216.0),
        "no medium object: {areas:?}"
    );
    assert!(
        areas.iter().any(|&a| a > 9216.0),
        "no large object: {areas:?}"
    );
    let all: Vec<_> = ["train", "val"]
        .iter()
        .flat_map(|s| CocoDataset::open(dir.path(), s).unwrap().file.annotations)
        .collect();
    let crowd: Vec<_> = all.iter().filter(|a| a.iscrowd == 1).collect();
    assert!(!crowd.is_empty(), "no crowd region generated");
    for a in crowd {
        let Some(Segmentation::Rle(rle)) = &a.segmentation else {
            panic!("crowd without RLE")
        };
        let RleCounts::Uncompressed(c) = &rle.counts else {
            panic!("compressed RLE in GT")
        };
        assert_eq!(c.iter().sum::<u64>(), 128 * 160);
        assert_eq!(c.iter().skip(1).step_by(2).sum::<u64>() as f64, a.area);
    }
    let im = &ds.file.images[1];
    let victim = ds.image_path(im);
    assert!(ds.annotations_for(ds.file.images[0].id).count() > 0);
    std::fs::remove_file(&victim).unwrap();
    only_problem_names(&check(DataFormat::Coco, dir.path()).unwrap(), &victim);
}

#[test]
fn ade20k_synth_check_and_corrupt() {
    let (dir, r) = make(DataFormat::Ade20k, 3);
    assert_eq!(counts(&r, "training"), (4, 4));
    assert_eq!(counts(&r, "validation"), (2, 2));
    let ann = dir
        .path()
        .join("annotations/validation/ADE_val_00000001.png");
    let map = read_label_png(&ann).unwrap();
    assert!(map.data.iter().all(|&v| v <= 150));
    // An RGB PNG where a mode-L one is expected.
    image::RgbImage::new(32, 32).save(&ann).unwrap();
    only_problem_names(&check(DataFormat::Ade20k, dir.path()).unwrap(), &ann);
    // A label value out of range.
    let ann2 = dir
        .path()
        .join("annotations/training/ADE_train_00000002.png");
    image::GrayImage::from_pixel(32, 32, image::Luma([200]))
        .save(&ann2)
        .unwrap();
    let r = check(DataFormat::Ade20k, dir.path()).unwrap();
    assert!(
        r.problems_for("ADE_train_00000002.png")[0]
            .message
            .contains("200"),
        "{}",
        r.summary()
    );
}

#[test]
fn davis_synth_check_and_corrupt() {
    let (dir, r) = make(DataFormat::Davis, 4);
    assert_eq!(counts(&r, "train"), (8, 8));
    assert_eq!(counts(&r, "val"), (8, 8));
    let val = Davis::open(dir.path(), "val").unwrap();
    assert_eq!(val.sequences.len(), 2);
    for s in &val.sequences {
        assert_eq!(s.frames.len(), 4);
        let k = s.n_objects().unwrap();
        assert!((1..=3).contains(&k));
        let first = read_palette_png(&s.annotations[0]).unwrap();
        assert_eq!((first.width, first.height), (48, 32));
        for id in 1..=k {
            assert!(
                first.indices.contains(&id),
                "object {id} missing in the first frame"
            );
        }
    }
    let victim = val.sequences[1].annotations[2].clone();
    image::RgbImage::new(48, 32).save(&victim).unwrap();
    let r = check(DataFormat::Davis, dir.path()).unwrap();
    only_problem_names(&r, &victim);
    assert!(r.problems_for("00002.png")[0].message.contains("palette"));
}

#[test]
fn clevr_synth_check_and_corrupt() {
    let (dir, r) = make(DataFormat::Clevr, 5);
    assert_eq!(counts(&r, "train"), (8, 8));
    assert_eq!(counts(&r, "val"), (4, 4));
    let ds = cjepa::data::clevr::Clevr::open(dir.path(), "train").unwrap();
    for task in [ClevrTask::Count, ClevrTask::Dist] {
        let s = ds.samples(task).unwrap();
        assert_eq!(s.len(), 8);
        assert!(s
            .iter()
            .all(|(p, l)| p.is_file() && *l < task.num_classes()));
    }
    let victim = ds.image_path(&ds.scenes[3]);
    std::fs::remove_file(&victim).unwrap();
    only_problem_names(&check(DataFormat::Clevr, dir.path()).unwrap(), &victim);
}

fn all_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn synth_is_deterministic() {
    for f in DataFormat::ALL {
        let (a, ra) = make(f, 11);
        // Same seed on a single rayon thread: same bytes.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (b, rb) = pool.install(|| make(f, 11));
        assert_eq!(ra.fingerprint(), rb.fingerprint(), "{f}");
        assert!(
            all_files(a.path()) == all_files(b.path()),
            "{f}: same seed gave different bytes"
        );
        let (_c, rc) = make(f, 12);
        assert_ne!(
            ra.fingerprint(),
            rc.fingerprint(),
            "{f}: different seeds gave the same fingerprint"
        );
    }
}

#[test]
fn synth_refuses_non_empty_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stale.txt"), b"x").unwrap();
    let e = synth(DataFormat::Clevr, dir.path(), 0, &params()).unwrap_err();
    assert!(e.to_string().contains("not empty"));
    assert!(check(DataFormat::Coco, &dir.path().join("nope")).is_err());
}

#[test]
fn clevr_golden_labels() {
    let cases = golden::cases("metrics/clevr");
    assert!(!cases.is_empty());
    for case in cases {
        let scenes = ClevrScenes::load(&case.join("scenes.json")).unwrap();
        let expected: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        let labels = expected["labels"].as_object().unwrap();
        assert_eq!(labels.len(), scenes.scenes.len());
        for s in &scenes.scenes {
            let e = &labels[&s.image_index.to_string()];
            assert_eq!(
                ClevrTask::Count.label(s),
                Some(e["count_label"].as_u64().unwrap() as usize),
                "{case:?} scene {}",
                s.image_index
            );
            assert_eq!(
                ClevrTask::Dist.label(s),
                Some(e["dist_label"].as_u64().unwrap() as usize),
                "{case:?} scene {}",
                s.image_index
            );
            let d32 = cjepa::data::clevr::min_depth_f32(s).unwrap();
            // serde_json (without `float_roundtrip`) may parse a decimal 1 ulp off in f64;
            // the f32 value is unaffected.
            assert_eq!(d32, e["min_depth_float32"].as_f64().unwrap() as f32);
        }
    }
}

#[test]
fn davis_golden_annotations_are_palette_pngs() {
    for case in golden::cases("metrics/davis") {
        let expected: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        let set_file = format!("ImageSets/2017/{}.txt", golden::davis_set(&case));
        let set = std::fs::read_to_string(case.join(set_file)).unwrap();
        for seq in set.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let e = &expected["sequences"][seq];
            let dir = case.join("Annotations/480p").join(seq);
            let mut frames: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            frames.sort();
            assert_eq!(frames.len() as u64, e["n_frames"].as_u64().unwrap());
            let first = read_palette_png(&frames[0]).unwrap();
            assert_eq!(
                (first.height as u64, first.width as u64),
                (e["height"].as_u64().unwrap(), e["width"].as_u64().unwrap())
            );
            let k = first
                .indices
                .iter()
                .map(|&v| if v == 255 { 0 } else { v })
                .max()
                .unwrap();
            assert_eq!(k as u64, e["n_objects"].as_u64().unwrap(), "{seq}");
            assert_eq!(&first.palette[1], &[128, 0, 0]);
        }
    }
}

#[test]
fn ade20k_golden_label_pngs() {
    for case in golden::cases("metrics/ade20k") {
        let expected: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        for img in expected["per_image"].as_array().unwrap() {
            let name = img["name"].as_str().unwrap();
            let gt = read_label_png(&case.join(format!("annotations/{name}.png"))).unwrap();
            let pred = read_label_png(&case.join(format!("predictions/{name}.png"))).unwrap();
            assert_eq!(
                (gt.height as u64, gt.width as u64),
                (
                    img["height"].as_u64().unwrap(),
                    img["width"].as_u64().unwrap()
                )
            );
            assert!(gt.data.iter().all(|&v| v <= 150));
            let mut lab = gt.data.clone();
            reduce_zero_label(&mut lab);
            let valid = lab.iter().filter(|&&v| v != 255).count() as u64;
            let correct = lab
                .iter()
                .zip(&pred.data)
                .filter(|(&l, &p)| l != 255 && l == p)
                .count() as u64;
            assert_eq!(valid, img["valid_pixels"].as_u64().unwrap(), "{name}");
            assert_eq!(correct, img["correct_pixels"].as_u64().unwrap(), "{name}");
        }
    }
}

#[test]
fn coco_golden_instances_parse() {
    for case in golden::cases("metrics/coco") {
        let f = CocoFile::load(&case.join("instances_gt.json")).unwrap();
        let expected: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        assert_eq!(
            f.images.len() as u64,
            expected["counts"]["images"].as_u64().unwrap()
        );
        assert_eq!(
            f.annotations.len() as u64,
            expected["counts"]["gt_annotations"].as_u64().unwrap()
        );
        let crowd = f.annotations.iter().filter(|a| a.iscrowd == 1).count() as u64;
        assert_eq!(crowd, expected["counts"]["gt_crowd"].as_u64().unwrap());
        // The case's own category ids: COCOeval's `params.catIds` (sorted GT category ids).
        let want_ids: Vec<u64> = match expected["params"]["catIds"].as_array() {
            Some(ids) => ids.iter().map(|v| v.as_u64().unwrap()).collect(),
            None => {
                eprintln!(
                    "{}: expected.json has no params.catIds; checking the category map against instances_gt.json",
                    case.display()
                );
                let mut ids: Vec<u64> = f.categories.iter().map(|c| c.id).collect();
                ids.sort_unstable();
                ids
            }
        };
        let map = CategoryMap::new(&f.categories);
        assert_eq!(map.ids(), &want_ids[..], "{}", case.display());
        for (k, &id) in want_ids.iter().enumerate() {
            assert_eq!(map.to_contiguous(id), Some(k), "{}", case.display());
            assert_eq!(map.to_category_id(k), Some(id), "{}", case.display());
        }
        assert_eq!(map.to_category_id(want_ids.len()), None);
        let absent = (1..).find(|id| !want_ids.contains(id)).unwrap();
        assert_eq!(map.to_contiguous(absent), None, "{}", case.display());
        for a in &f.annotations {
            match (&a.segmentation, a.iscrowd) {
                (Some(Segmentation::Polygons(p)), 0) => {
                    assert!(p.iter().all(|q| q.len() >= 6 && q.len() % 2 == 0))
                }
                (Some(Segmentation::Rle(r)), 1) => {
                    assert!(matches!(r.counts, RleCounts::Uncompressed(_)))
                }
                other => panic!("unexpected segmentation {other:?}"),
            }
        }
        // Round trip through our serde types keeps the content.
        let back: CocoFile = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }
}

#[test]
fn loader_is_deterministic_and_resumable() {
    let (dir, _) = make(DataFormat::ImageFolder, 7);
    let ds = ImageFolder::open(dir.path(), "train").unwrap();
    let src = ImageSamples {
        samples: ds.samples.clone(),
        transform: Transform::imagenet_train(16),
    };
    let cfg = LoaderConfig {
        batch_size: 5,
        shuffle: true,
        drop_last: false,
        seed: 42,
    };
    let loader = Loader::new(&src, cfg).unwrap();
    assert_eq!(loader.num_batches(), 3);
    let epoch: Vec<_> = loader.iter_epoch(1, 0).map(|b| b.unwrap()).collect();
    assert_eq!(epoch.len(), 3);
    assert_eq!(epoch[0].shape, [5, 3, 16, 16]);
    assert_eq!(epoch[2].shape[0], 2);
    for b in &epoch {
        for (i, l) in b.indices.iter().zip(&b.labels) {
            assert_eq!(ds.samples[*i].1, *l);
        }
    }
    // Resume at batch 1, on a single thread: identical.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let resumed: Vec<_> = pool.install(|| loader.iter_epoch(1, 1).map(|b| b.unwrap()).collect());
    assert_eq!(resumed[..], epoch[1..]);
    assert_eq!(loader.batch(1, 2).unwrap(), epoch[2]);
    // Another epoch: another order and other augmentations.
    assert_ne!(loader.batch(2, 0).unwrap().images, epoch[0].images);
    let eval = ImageSamples {
        samples: ds.samples.clone(),
        transform: Transform::imagenet_eval(16),
    };
    let l2 = Loader::new(
        &eval,
        LoaderConfig {
            batch_size: 4,
            shuffle: false,
            drop_last: true,
            seed: 0,
        },
    )
    .unwrap();
    let b = l2.batch(0, 0).unwrap();
    assert_eq!(b.indices, vec![0, 1, 2, 3]);
    assert_eq!(b.shape, [4, 3, 16, 16]);
}

//! CLEVR Count / Dist labels against the VTAB golden cases (`metrics/clevr/<case>/`).

use cjepa::data::clevr_labels::{labels_from_scenes, scenes_path};
use serde_json::Value;

use crate::golden;

#[test]
fn clevr_golden_cases() {
    let cases = golden::cases("metrics/clevr");
    assert!(!cases.is_empty(), "no CLEVR golden case found");
    for case in cases {
        let exp: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        let labels = labels_from_scenes(&case.join("scenes.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let want = exp["labels"].as_object().unwrap();
        assert_eq!(labels.len(), want.len(), "{}", case.display());
        for l in &labels {
            let w = &want[&l.image_index.to_string()];
            let ctx = format!("{} scene {}", case.display(), l.image_index);
            assert_eq!(
                l.count_label as u64,
                w["count_label"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                l.dist_label as u64,
                w["dist_label"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                l.n_objects as u64,
                w["n_objects"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                l.min_depth,
                w["min_depth_float32"].as_f64().unwrap() as f32,
                "{ctx}"
            );
            assert_eq!(
                l.min_depth,
                w["min_depth"].as_f64().unwrap() as f32,
                "{ctx}"
            );
        }
    }
}

#[test]
fn clevr_missing_file_is_named() {
    let p = scenes_path(std::path::Path::new("/nonexistent/CLEVR_v1.0"), "val");
    assert!(p.ends_with("scenes/CLEVR_val_scenes.json"));
    let e = labels_from_scenes(&p).unwrap_err().to_string();
    assert!(e.contains("CLEVR_val_scenes.json"), "{e}");
}

//! ADE20K mIoU / aAcc / mAcc against the mmseg `IoUMetric` golden cases
//! (`metrics/ade20k/<case>/{annotations,predictions}/*.png`, `expected.json`).

use std::path::{Path, PathBuf};

use cjepa::eval::segmentation::{evaluate_dirs, SegError};
use serde_json::Value;

use crate::golden;

const TOL: f64 = 1e-6;

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn close(what: &str, got: f64, want: f64) {
    assert!((got - want).abs() <= TOL, "{what}: got {got}, want {want}");
}

#[test]
fn ade20k_golden_cases() {
    let cases = golden::cases("metrics/ade20k");
    assert!(!cases.is_empty(), "no ADE20K golden case found");
    for case in cases {
        let exp = read_json(&case.join("expected.json"));
        let rep = evaluate_dirs(&case.join("annotations"), &case.join("predictions"))
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let m = &rep.metrics;
        close("aAcc", m.a_acc, exp["aAcc"].as_f64().unwrap());
        close("mIoU", m.m_iou, exp["mIoU"].as_f64().unwrap());
        close("mAcc", m.m_acc, exp["mAcc"].as_f64().unwrap());
        let n = exp["num_classes"].as_u64().unwrap() as usize;
        assert_eq!(m.per_class.len(), n);
        for (key, pick) in [("IoU", 0usize), ("Acc", 1)] {
            let want = exp["per_class"][key].as_array().unwrap();
            assert_eq!(want.len(), n);
            for (c, w) in want.iter().enumerate() {
                let got = if pick == 0 {
                    m.per_class[c].iou
                } else {
                    m.per_class[c].acc
                };
                match (got, w.as_f64()) {
                    (None, None) => {}
                    (Some(g), Some(w)) => close(&format!("{key}[{c}]"), g, w),
                    (g, _) => panic!("{}: {key}[{c}] got {g:?}, want {w}", case.display()),
                }
            }
        }
        let t = &exp["totals"];
        let as_vec = |k: &str| -> Vec<u64> {
            t[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        assert_eq!(rep.totals.area_intersect, as_vec("area_intersect"));
        assert_eq!(rep.totals.area_union(), as_vec("area_union"));
        assert_eq!(rep.totals.area_pred_label, as_vec("area_pred_label"));
        assert_eq!(rep.totals.area_label, as_vec("area_label"));
        for want in exp["per_image"].as_array().unwrap() {
            let name = want["name"].as_str().unwrap();
            let got = rep.per_image.iter().find(|s| s.name == name).expect(name);
            assert_eq!(got.height as u64, want["height"].as_u64().unwrap());
            assert_eq!(got.width as u64, want["width"].as_u64().unwrap());
            assert_eq!(got.valid_pixels, want["valid_pixels"].as_u64().unwrap());
            assert_eq!(got.correct_pixels, want["correct_pixels"].as_u64().unwrap());
        }
        let j = rep.to_json();
        assert_eq!(j["mIoU"].as_f64(), Some(m.m_iou));
        assert_eq!(j["per_class"].as_array().unwrap().len(), n);
        let table = rep.to_table(None);
        assert!(table.contains(&format!("mIoU {:.2}", m.m_iou)), "{table}");
    }
}

/// A copy of the first golden case that a test may break.
fn scratch_copy(tag: &str) -> PathBuf {
    let src = golden::cases("metrics/ade20k").remove(0);
    let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("ade_{tag}"));
    let _ = std::fs::remove_dir_all(&dst);
    for sub in ["annotations", "predictions"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dst.join(sub).join(p.file_name().unwrap())).unwrap();
        }
    }
    dst
}

fn write_png(path: &Path, w: u32, h: u32, color: png::ColorType, data: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().unwrap();
    wr.write_image_data(data).unwrap();
    wr.finish().unwrap();
}

#[test]
fn ade20k_errors_name_the_file() {
    let d = scratch_copy("missing");
    let victim = d.join("predictions/ADE_val_00000048.png");
    std::fs::remove_file(&victim).unwrap();
    let e = evaluate_dirs(&d.join("annotations"), &d.join("predictions")).unwrap_err();
    assert!(matches!(e, SegError::MissingPrediction { .. }), "{e}");
    assert!(e.to_string().contains("ADE_val_00000048.png"), "{e}");

    let d = scratch_copy("size");
    write_png(
        &d.join("predictions/ADE_val_00000048.png"),
        3,
        2,
        png::ColorType::Grayscale,
        &[0; 6],
    );
    let e = evaluate_dirs(&d.join("annotations"), &d.join("predictions")).unwrap_err();
    assert!(matches!(e, SegError::SizeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("ADE_val_00000048.png"), "{e}");

    let d = scratch_copy("rgb");
    write_png(
        &d.join("predictions/ADE_val_00000085.png"),
        2,
        2,
        png::ColorType::Rgb,
        &[0; 12],
    );
    let e = evaluate_dirs(&d.join("annotations"), &d.join("predictions")).unwrap_err();
    assert!(matches!(e, SegError::WrongPngMode { .. }), "{e}");
    assert!(
        e.to_string().contains("ADE_val_00000085.png") && e.to_string().contains("RGB"),
        "{e}"
    );
}

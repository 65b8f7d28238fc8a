//! DAVIS-2017 semi-supervised J&F against the official `davis2017-evaluation` golden cases
//! (`metrics/davis/<case>/`: DAVIS layout, `predictions/`, `expected.json`).

use std::path::{Path, PathBuf};

use cjepa::eval::davis::{
    davis_palette, evaluate_davis, read_palette_png, write_palette_png, DavisError, DavisStats,
};
use serde_json::Value;

use crate::golden;

const TOL: f64 = 1e-6;

fn close(what: &str, got: f64, want: &Value) {
    let want = want
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: no number in {want}"));
    assert!((got - want).abs() <= TOL, "{what}: got {got}, want {want}");
}

fn stats(what: &str, got: &DavisStats, want: &Value) {
    close(&format!("{what}.mean"), got.mean, &want["mean"]);
    close(&format!("{what}.recall"), got.recall, &want["recall"]);
    close(&format!("{what}.decay"), got.decay, &want["decay"]);
}

#[test]
fn davis_golden_cases() {
    let cases = golden::cases("metrics/davis");
    assert!(!cases.is_empty(), "no DAVIS golden case found");
    for case in cases {
        let exp: Value =
            serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
        let rep = evaluate_davis(&case, &case.join("predictions"), &golden::davis_set(&case))
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let order: Vec<String> = rep.objects().map(|o| o.name()).collect();
        let want_order: Vec<String> = exp["per_object_order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(order, want_order);
        let want_seqs = exp["sequences"].as_object().unwrap();
        assert_eq!(rep.sequences.len(), want_seqs.len());
        for s in &rep.sequences {
            let w = &want_seqs[&s.name];
            assert_eq!(s.height as u64, w["height"].as_u64().unwrap());
            assert_eq!(s.width as u64, w["width"].as_u64().unwrap());
            assert_eq!(s.n_frames as u64, w["n_frames"].as_u64().unwrap());
            assert_eq!(s.n_objects as u64, w["n_objects"].as_u64().unwrap());
            assert_eq!(s.bound_pix as f64, w["bound_pix"].as_f64().unwrap());
            let frames: Vec<&str> = w["evaluated_frames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(s.evaluated_frames, frames);
            assert_eq!(s.objects.len(), w["objects"].as_object().unwrap().len());
            for o in &s.objects {
                let wo = &w["objects"][o.object_id.to_string()];
                let name = o.name();
                for (key, got) in [
                    ("J_per_frame", &o.j_per_frame),
                    ("F_per_frame", &o.f_per_frame),
                ] {
                    let wv = wo[key].as_array().unwrap();
                    assert_eq!(got.len(), wv.len(), "{name} {key}");
                    for (i, (g, w)) in got.iter().zip(wv).enumerate() {
                        close(&format!("{name} {key}[{i}]"), *g, w);
                    }
                }
                stats(&format!("{name} J"), &o.j, &wo["J"]);
                stats(&format!("{name} F"), &o.f, &wo["F"]);
            }
        }
        for (k, v) in rep.global.named() {
            close(k, v, &exp["global"][k]);
        }
        // The JSON form mirrors expected.json.
        let j = rep.to_json();
        assert_eq!(j["per_object_order"], exp["per_object_order"]);
        close(
            "json J&F",
            j["global"]["J&F-Mean"].as_f64().unwrap(),
            &exp["global"]["J&F-Mean"],
        );
        let t = rep.global_table();
        assert!(
            t.contains("J&F-Mean") && t.contains(&format!("{:.3}", rep.global.jf_mean)),
            "{t}"
        );
        assert_eq!(rep.sequence_table().lines().count(), 2 + order.len());
    }
}

#[test]
fn davis_palette_matches_golden_files_and_roundtrips() {
    let case = golden::cases("metrics/davis").remove(0);
    let gt = case.join("Annotations/480p/bear-walk/00000.png");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&gt).unwrap()));
    let reader = dec.read_info().unwrap();
    let pal = reader
        .info()
        .palette
        .as_ref()
        .expect("golden GT has a palette")
        .to_vec();
    assert_eq!(&pal[..], &davis_palette()[..pal.len()]);

    let (h, w, ids) = read_palette_png(&gt).unwrap();
    assert_eq!((h, w), (64, 112));
    assert_eq!(*ids.iter().max().unwrap(), 2, "palette indices, not RGB");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("davis_rt.png");
    write_palette_png(&out, h, w, &ids).unwrap();
    assert_eq!(read_palette_png(&out).unwrap(), (h, w, ids));
}

/// A 3-sequence-frame synthetic DAVIS dataset with predictions equal to the GT.
fn tiny_dataset(tag: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("davis_{tag}"));
    let _ = std::fs::remove_dir_all(&root);
    for sub in ["Annotations/480p/seq", "predictions/seq", "ImageSets/2017"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("ImageSets/2017/val.txt"), "seq\n").unwrap();
    let mut ids = vec![0u8; 6 * 8];
    ids[10] = 1;
    ids[11] = 1;
    for f in 0..4 {
        let name = format!("{f:05}.png");
        write_palette_png(&root.join("Annotations/480p/seq").join(&name), 6, 8, &ids).unwrap();
        write_palette_png(&root.join("predictions/seq").join(&name), 6, 8, &ids).unwrap();
    }
    root
}

fn write_rgb(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), 8, 6);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().unwrap();
    wr.write_image_data(&[0; 6 * 8 * 3]).unwrap();
    wr.finish().unwrap();
}

#[test]
fn davis_errors_name_the_file() {
    let ok = tiny_dataset("ok");
    let rep = evaluate_davis(&ok, &ok.join("predictions"), "val").unwrap();
    assert_eq!(rep.global.jf_mean, 1.0);

    let d = tiny_dataset("missing");
    std::fs::remove_file(d.join("predictions/seq/00002.png")).unwrap();
    // the last frame is never read, so its absence is fine
    std::fs::remove_file(d.join("predictions/seq/00003.png")).unwrap();
    let e = evaluate_davis(&d, &d.join("predictions"), "val").unwrap_err();
    assert!(matches!(e, DavisError::MissingPrediction { .. }), "{e}");
    assert!(e.to_string().contains("00002.png"), "{e}");

    let d = tiny_dataset("size");
    write_palette_png(&d.join("predictions/seq/00001.png"), 5, 8, &[0; 40]).unwrap();
    let e = evaluate_davis(&d, &d.join("predictions"), "val").unwrap_err();
    assert!(matches!(e, DavisError::SizeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("00001.png"), "{e}");

    let d = tiny_dataset("rgb");
    write_rgb(&d.join("predictions/seq/00001.png"));
    let e = evaluate_davis(&d, &d.join("predictions"), "val").unwrap_err();
    assert!(matches!(e, DavisError::NotPalettePng { .. }), "{e}");
    assert!(
        e.to_string().contains("00001.png") && e.to_string().contains("RGB"),
        "{e}"
    );

    let d = tiny_dataset("extra_id");
    write_palette_png(&d.join("predictions/seq/00002.png"), 6, 8, &[2; 48]).unwrap();
    let e = evaluate_davis(&d, &d.join("predictions"), "val").unwrap_err();
    assert!(matches!(e, DavisError::TooManyObjects { .. }), "{e}");
}

/// Sequences in the image set's order (not sorted), one repeated; `bear` has 11 objects, so
/// name order would put `bear_10` before `bear_2`.
#[test]
fn davis_lists_sequences_in_image_set_order() {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("davis_order");
    let _ = std::fs::remove_dir_all(&root);
    let objects = [("kite", 1u8), ("bear", 11), ("dogs", 2)];
    for (seq, n) in objects {
        for sub in ["Annotations/480p", "predictions"] {
            std::fs::create_dir_all(root.join(sub).join(seq)).unwrap();
        }
        let mut ids = vec![0u8; 6 * 8];
        for k in 1..=n {
            ids[k as usize * 3] = k;
        }
        for f in 0..3 {
            let name = format!("{f:05}.png");
            for sub in ["Annotations/480p", "predictions"] {
                write_palette_png(&root.join(sub).join(seq).join(&name), 6, 8, &ids).unwrap();
            }
        }
    }
    std::fs::create_dir_all(root.join("ImageSets/2017")).unwrap();
    std::fs::write(
        root.join("ImageSets/2017/val.txt"),
        "kite\nbear\n\ndogs\nbear\n",
    )
    .unwrap();

    let want: Vec<String> = objects
        .iter()
        .flat_map(|(s, n)| (1..=*n).map(move |k| format!("{s}_{k}")))
        .collect();
    let rep = evaluate_davis(&root, &root.join("predictions"), "val").unwrap();
    let seqs: Vec<&str> = rep.sequences.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(seqs, ["kite", "bear", "dogs"]);
    let order: Vec<String> = rep.objects().map(|o| o.name()).collect();
    assert_eq!(order, want);
    let j = rep.to_json();
    assert_eq!(j["per_object_order"], serde_json::json!(want));
    let keys: Vec<&String> = j["sequences"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["kite", "bear", "dogs"]);
    let rows = |text: &str, skip: usize, sep: char| -> Vec<String> {
        text.lines()
            .skip(skip)
            .map(|l| l.split(sep).find(|c| !c.is_empty()).unwrap().to_string())
            .collect()
    };
    assert_eq!(rows(&rep.per_sequence_csv(), 1, ','), want);
    assert_eq!(rows(&rep.sequence_table(), 2, ' '), want);

    // The CLI prints the same order.
    let out = assert_cmd::Command::cargo_bin("cjepa")
        .unwrap()
        .args(["eval", "davis", "--davis"])
        .arg(&root)
        .arg("--pred")
        .arg(root.join("predictions"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let table = text
        .split("Per sequence results")
        .nth(1)
        .expect("per-sequence table");
    assert_eq!(rows(table, 2, ' '), want, "{text}");
}

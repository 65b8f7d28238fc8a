//! Golden tests for the COCO mask API and COCOeval against pycocotools 2.0.11 outputs
//! (`<root>/metrics/coco/rle_codec.json` and every case dir holding `instances_gt.json`).

use std::path::Path;

use cjepa::eval::coco::{
    bbox_iou, evaluate, iou_thresholds, mask_iou, polygons_to_rle, recall_thresholds,
    rle_from_polygon, rles_from_polygons, CocoDataset, CocoResults, DetArea, IouType, Rle,
};
use serde_json::Value;

use crate::golden;

fn load(p: &Path) -> Value {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("parse {}: {e}", p.display()))
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn hw(c: &Value) -> (usize, usize) {
    (
        c["h"].as_u64().unwrap() as usize,
        c["w"].as_u64().unwrap() as usize,
    )
}

fn check_mask_cases(d: &Value, file: &str) {
    for c in d["mask_cases"].as_array().unwrap() {
        let note = format!("{file} mask case {:?}", c["note"].as_str().unwrap());
        let (h, w) = hw(c);
        let runs = u32s(&c["mask_colmajor_runs"]);
        let s = c["compressed"].as_str().unwrap();
        let r = Rle::from_counts(h, w, runs.clone()).unwrap();
        assert_eq!(r.to_compressed(), s, "{note}: encode");
        assert_eq!(
            Rle::from_compressed(s, h, w).unwrap().counts,
            runs,
            "{note}: decode"
        );
        assert_eq!(r.area(), c["area"].as_u64().unwrap(), "{note}: area");
        assert_eq!(r.to_bbox().to_vec(), f64s(&c["bbox"]), "{note}: bbox");
        let cm = r.decode_col_major();
        assert_eq!(
            Rle::encode_col_major(&cm, h, w).unwrap(),
            r,
            "{note}: col-major"
        );
        let rm = r.decode_row_major();
        assert_eq!(
            Rle::encode_row_major(&rm, h, w).unwrap(),
            r,
            "{note}: row-major"
        );
    }
}

fn check_polygon_cases(d: &Value, file: &str) {
    for c in d["polygon_cases"].as_array().unwrap() {
        let note = format!("{file} polygon case {:?}", c["note"].as_str().unwrap());
        let (h, w) = hw(c);
        let polys: Vec<Vec<f64>> = c["polygons"].as_array().unwrap().iter().map(f64s).collect();
        let per: Vec<&str> = c["per_polygon_counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for (i, p) in polys.iter().enumerate() {
            assert_eq!(
                rle_from_polygon(p, h, w).to_compressed(),
                per[i],
                "{note}: polygon {i}"
            );
        }
        let each: Vec<String> = rles_from_polygons(&polys, h, w)
            .unwrap()
            .iter()
            .map(|r| r.to_compressed())
            .collect();
        assert_eq!(each, per, "{note}: frPyObjects");
        let r = polygons_to_rle(&polys, h, w).unwrap();
        assert_eq!(r.counts, u32s(&c["runs"]), "{note}: merged runs");
        assert_eq!(
            r.to_compressed(),
            c["counts"].as_str().unwrap(),
            "{note}: merged string"
        );
        assert_eq!(r.area(), c["area"].as_u64().unwrap(), "{note}: area");
        assert_eq!(r.to_bbox().to_vec(), f64s(&c["bbox"]), "{note}: bbox");
    }
}

fn check_iou_cases(d: &Value, file: &str) {
    for (n, c) in d["iou_cases"].as_array().unwrap().iter().enumerate() {
        let crowd: Vec<bool> = c["iscrowd"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() != 0)
            .collect();
        let m = match c["kind"].as_str().unwrap() {
            "rle" => {
                let (h, w) = hw(c);
                let rles = |k: &str| -> Vec<Rle> {
                    c[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|s| Rle::from_compressed(s.as_str().unwrap(), h, w).unwrap())
                        .collect()
                };
                mask_iou(&rles("dt"), &rles("gt"), &crowd)
            }
            "bbox_xywh" => {
                let boxes = |k: &str| -> Vec<[f64; 4]> {
                    c[k].as_array()
                        .unwrap()
                        .iter()
                        .map(|b| f64s(b).try_into().unwrap())
                        .collect()
                };
                bbox_iou(&boxes("dt"), &boxes("gt"), &crowd)
            }
            k => panic!("{file}: unknown iou case kind {k}"),
        };
        let want: Vec<Vec<f64>> = c["iou"].as_array().unwrap().iter().map(f64s).collect();
        let got = m.to_rows();
        assert_eq!(got.len(), want.len(), "{file} iou case {n}: rows");
        for (gr, wr) in got.iter().zip(&want) {
            assert_eq!(gr.len(), wr.len(), "{file} iou case {n}: cols");
            for (g, w) in gr.iter().zip(wr) {
                assert!((g - w).abs() <= 1e-12, "{file} iou case {n}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn rle_codec_golden() {
    let mut found = 0;
    for root in golden::roots() {
        let p = root.join("metrics/coco/rle_codec.json");
        if !p.exists() {
            continue;
        }
        found += 1;
        let d = load(&p);
        let file = p.display().to_string();
        check_mask_cases(&d, &file);
        check_polygon_cases(&d, &file);
        check_iou_cases(&d, &file);
    }
    assert!(found > 0, "no rle_codec.json found under the golden roots");
}

fn close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= 1e-9, "{what}: got {got}, want {want}");
}

fn check_eval(case: &Path, gt: &CocoDataset, dt: &CocoResults, t: IouType, exp: &Value, key: &str) {
    let r = evaluate(gt, dt, t).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    let what = format!("{} {key}", case.display());
    let want = f64s(&exp[key]);
    assert_eq!(want.len(), 12, "{what}: expected 12 stats");
    for (i, (&g, &w)) in r.stats.iter().zip(&want).enumerate() {
        close(g, w, &format!("{what} stats[{i}]"));
    }
    let per = &exp[format!("{key}_per_category")];
    let per_ar = &exp[format!("{key}_per_category_AR")];
    for (k, id) in r.cat_ids.iter().enumerate() {
        let w = per[id.to_string()]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: no AP for {id}"));
        close(
            r.per_category_ap[k],
            w,
            &format!("{what} AP of category {id}"),
        );
        if let Some(w) = per_ar.get(id.to_string()).and_then(|v| v.as_f64()) {
            close(
                r.per_category_ar[k],
                w,
                &format!("{what} AR of category {id}"),
            );
        }
    }
    let ids: Vec<i64> = exp["params"]["catIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(r.cat_ids, ids, "{what}: catIds");
    let ids: Vec<i64> = exp["params"]["imgIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(r.img_ids, ids, "{what}: imgIds");
}

#[test]
fn cocoeval_golden() {
    let mut n = 0;
    for case in golden::cases("metrics/coco") {
        let gt_path = case.join("instances_gt.json");
        if !gt_path.exists() {
            continue;
        }
        n += 1;
        let exp = load(&case.join("expected.json"));
        // serde_json without its `float_roundtrip` feature may parse a 17-digit literal one ulp
        // off (0.41000000000000003 -> 0.41), hence the tiny tolerance instead of `==`.
        let thr = iou_thresholds()
            .into_iter()
            .zip(f64s(&exp["params"]["iouThrs"]));
        let rec = recall_thresholds()
            .into_iter()
            .zip(f64s(&exp["params"]["recThrs"]));
        for (g, w) in thr.chain(rec) {
            assert!(
                (g - w).abs() <= 1e-15,
                "{}: threshold {g} vs {w}",
                case.display()
            );
        }
        let gt = CocoDataset::from_file(&gt_path).unwrap();
        let dt_path = case.join("detections.json");
        let dt = CocoResults::from_file(&dt_path, &gt, DetArea::LoadRes).unwrap();
        let counts = &exp["counts"];
        assert_eq!(gt.images.len() as u64, counts["images"].as_u64().unwrap());
        assert_eq!(
            gt.annotations.len() as u64,
            counts["gt_annotations"].as_u64().unwrap()
        );
        let crowd = gt.annotations.iter().filter(|a| a.iscrowd).count() as u64;
        assert_eq!(crowd, counts["gt_crowd"].as_u64().unwrap());
        assert_eq!(
            dt.detections.len() as u64,
            counts["detections"].as_u64().unwrap()
        );
        check_eval(&case, &gt, &dt, IouType::Bbox, &exp, "bbox");
        check_eval(&case, &gt, &dt, IouType::Segm, &exp, "segm");
        if exp.get("segm_dt_area_from_mask").is_some() {
            let dt = CocoResults::from_file(&dt_path, &gt, DetArea::FromMask).unwrap();
            check_eval(
                &case,
                &gt,
                &dt,
                IouType::Segm,
                &exp,
                "segm_dt_area_from_mask",
            );
        }
    }
    assert!(n >= 2, "expected at least the 2 repo COCO cases, found {n}");
}

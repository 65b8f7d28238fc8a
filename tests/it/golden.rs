//! Where golden reference cases live: the repo copy plus `$CJEPA_GOLDEN_DIR`.
use std::path::{Path, PathBuf};

/// Roots holding `metrics/` and `model/` folders, repo copy first.
pub fn roots() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")];
    if let Some(d) = std::env::var_os("CJEPA_GOLDEN_DIR") {
        v.push(PathBuf::from(d));
    }
    v
}

/// Every case directory `<root>/<sub>/<case>/` under every root, sorted per root.
pub fn cases(sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for r in roots() {
        let dir = r.join(sub);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        v.sort();
        out.extend(v);
    }
    out
}

/// The DAVIS image set of a golden case: `val` (the public cases' layout,
/// `ImageSets/2017/val.txt`), else the one `ImageSets/2017/<set>.txt` the case holds.
pub fn davis_set(case: &Path) -> String {
    let dir = case.join("ImageSets/2017");
    if dir.join("val.txt").is_file() {
        return "val".into();
    }
    let sets: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    match &sets[..] {
        [one] => one.clone(),
        _ => panic!(
            "{}: no val.txt and not exactly one image set ({sets:?}); cannot tell which set the expected values are for",
            dir.display()
        ),
    }
}

/// Copy a folder tree.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &serde_json::Value) {
    std::fs::write(p, serde_json::to_vec(v).unwrap()).unwrap();
}

/// Golden cases in `$CJEPA_GOLDEN_DIR` that are not the public ones (a COCO case with other
/// category ids, a DAVIS case listing its sequences in another order) pass the golden tests:
/// every case is checked against its own expected files, not the public cases' constants.
/// Runs those tests in a child of this test binary with `CJEPA_GOLDEN_DIR` set.
#[test]
fn extra_golden_cases_are_checked_against_their_own_expected_files() {
    let repo = &roots()[0];
    let extra = tempfile::tempdir().unwrap();

    // COCO: `basic` with every category id moved (1, 3, 7, 18, 44 -> 2, 5, 9, 20, 50; same order).
    let map = |id: u64| {
        [(1, 2), (3, 5), (7, 9), (18, 20), (44, 50)]
            .iter()
            .find(|m| m.0 == id)
            .unwrap()
            .1
    };
    let src = repo.join("metrics/coco/basic");
    let dst = extra.path().join("metrics/coco/moved_ids");
    std::fs::create_dir_all(&dst).unwrap();
    let mut gt = read_json(&src.join("instances_gt.json"));
    for c in gt["categories"].as_array_mut().unwrap() {
        c["id"] = map(c["id"].as_u64().unwrap()).into();
    }
    for a in gt["annotations"].as_array_mut().unwrap() {
        a["category_id"] = map(a["category_id"].as_u64().unwrap()).into();
    }
    write_json(&dst.join("instances_gt.json"), &gt);
    let mut dt = read_json(&src.join("detections.json"));
    for d in dt.as_array_mut().unwrap() {
        d["category_id"] = map(d["category_id"].as_u64().unwrap()).into();
    }
    write_json(&dst.join("detections.json"), &dt);
    let mut exp = read_json(&src.join("expected.json"));
    for v in exp["params"]["catIds"].as_array_mut().unwrap() {
        *v = map(v.as_u64().unwrap()).into();
    }
    for (key, per) in exp.as_object_mut().unwrap() {
        if key.contains("per_category") {
            let moved: serde_json::Map<String, serde_json::Value> = per
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (map(k.parse().unwrap()).to_string(), v.clone()))
                .collect();
            *per = moved.into();
        }
    }
    write_json(&dst.join("expected.json"), &exp);

    // DAVIS: `mini_val` with its image set in another order (objects follow it).
    let src = repo.join("metrics/davis/mini_val");
    let dst = extra.path().join("metrics/davis/reordered");
    copy_tree(&src, &dst);
    std::fs::write(
        dst.join("ImageSets/2017/val.txt"),
        "kite-fly\nbear-walk\ndogs-play\n",
    )
    .unwrap();
    let mut exp = read_json(&src.join("expected.json"));
    let order = exp["per_object_order"].as_array().unwrap();
    let mut reordered = Vec::new();
    for seq in ["kite-fly", "bear-walk", "dogs-play"] {
        let prefix = format!("{seq}_");
        reordered.extend(
            order
                .iter()
                .filter(|o| o.as_str().unwrap().starts_with(&prefix))
                .cloned(),
        );
    }
    exp["per_object_order"] = reordered.into();
    write_json(&dst.join("expected.json"), &exp);

    let tests = [
        "data_formats::coco_golden_instances_parse",
        "golden_coco::cocoeval_golden",
        "detect::eval_coco_cli_matches_golden_stats",
        "data_formats::davis_golden_annotations_are_palette_pngs",
        "golden_davis::davis_golden_cases",
        "segstages::eval_davis_json_matches_golden",
    ];
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(tests)
        .args(["--exact", "--test-threads", "1"])
        .env("CJEPA_GOLDEN_DIR", extra.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let passed = format!("{} passed", tests.len());
    assert!(text.contains(&passed), "{text}");
}

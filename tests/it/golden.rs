//! Where golden reference cases live: the repo copy plus `$CJEPA_GOLDEN_DIR`.
use std::path::PathBuf;

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

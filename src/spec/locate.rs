//! Find the line / column of a key path (e.g. `stages.pretrain.params.epochs`) in YAML text.
//!
//! serde_yaml reports positions for syntax and type errors; checks made after parsing (unknown
//! kind, dangling `needs`, cycles, kind params) use this block-style scanner to point at the key.

use crate::error::Pos;

/// Position of the last key of `path` in `text`, or of the deepest prefix found.
pub fn locate(text: &str, path: &[&str]) -> Option<Pos> {
    scan(text, path).0
}

/// Position of the last key of `path` in `text`, only if every key of it is written there.
pub fn locate_exact(text: &str, path: &[&str]) -> Option<Pos> {
    match scan(text, path) {
        (found, depth) if depth == path.len() => found,
        _ => None,
    }
}

/// The deepest prefix of `path` found in `text`: its last key's position and its length.
fn scan(text: &str, path: &[&str]) -> (Option<Pos>, usize) {
    let mut depth = 0;
    let mut found: Option<Pos> = None;
    let mut min_indent: isize = -1;
    let mut start_line = 0usize;
    let lines: Vec<&str> = text.lines().collect();
    for key in path {
        let mut hit = None;
        for (i, line) in lines.iter().enumerate().skip(start_line) {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let indent = (line.len() - trimmed.len()) as isize;
            if indent <= min_indent && i > start_line {
                break; // left the parent block
            }
            let t = trimmed.trim_start_matches("- ");
            if let Some(col) = key_col(t, key) {
                let base = line.len() - t.len();
                hit = Some((i, indent, base + col));
                break;
            }
            // flow mapping on one line: `params: { epochs: 5 }`
            if let Some(c) = find_flow_key(line, key) {
                if indent > min_indent || i == start_line {
                    hit = Some((i, indent, c));
                    break;
                }
            }
        }
        match hit {
            Some((i, indent, col)) => {
                found = Some(Pos {
                    line: i + 1,
                    column: col + 1,
                });
                min_indent = indent;
                start_line = i;
                depth += 1;
            }
            None => break,
        }
    }
    (found, depth)
}

fn key_col(t: &str, key: &str) -> Option<usize> {
    for cand in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
        if let Some(rest) = t.strip_prefix(cand.as_str()) {
            if rest.trim_start().starts_with(':') {
                return Some(0);
            }
        }
    }
    None
}

fn find_flow_key(line: &str, key: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(off) = line[from..].find(key) {
        let at = from + off;
        let before = if at == 0 { b' ' } else { bytes[at - 1] };
        let after = &line[at + key.len()..];
        if (before == b'{' || before == b' ' || before == b',')
            && after.trim_start().starts_with(':')
            && line[..at].contains('{')
        {
            return Some(at);
        }
        from = at + key.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const Y: &str = "name: x\nstages:\n  data:\n    kind: dataset\n  pretrain:\n    kind: pretrain\n    params: { epochs: 5, batch: 2 }\n    needs: [data]\n";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(
            locate(Y, &["stages", "pretrain", "kind"]),
            Some(Pos { line: 6, column: 5 })
        );
        assert_eq!(
            locate(Y, &["stages", "data"]),
            Some(Pos { line: 3, column: 3 })
        );
        assert_eq!(
            locate(Y, &["stages", "pretrain", "params", "batch"]),
            Some(Pos {
                line: 7,
                column: 26
            })
        );
    }

    #[test]
    fn falls_back_to_deepest_prefix() {
        assert_eq!(
            locate(Y, &["stages", "pretrain", "nope"]),
            Some(Pos { line: 5, column: 3 })
        );
        assert_eq!(locate(Y, &["zzz"]), None);
    }

    #[test]
    fn exact_finds_only_what_is_written() {
        let batch = ["stages", "pretrain", "params", "batch"];
        assert_eq!(locate_exact(Y, &batch), locate(Y, &batch));
        assert_eq!(locate_exact(Y, &["stages", "pretrain", "nope"]), None);
        assert_eq!(locate_exact(Y, &["stages", "data", "params"]), None);
    }
}

//! "Did you mean ...?" suggestions for unknown keys, kinds and stage ids.

/// The candidate closest to `word` (Jaro-Winkler > 0.7 or edit distance <= 2), if any.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // fewest edits first, then the highest Jaro-Winkler similarity
    let mut best: Option<(&str, usize, f64)> = None;
    for c in candidates {
        let jw = strsim::jaro_winkler(word, c);
        let lev = strsim::levenshtein(word, c);
        if !(lev <= 2 && lev < word.len().max(c.len()) || jw > 0.8) {
            continue;
        }
        let better = match best {
            None => true,
            Some((_, bl, bj)) => lev < bl || (lev == bl && jw > bj),
        };
        if better {
            best = Some((c, lev, jw));
        }
    }
    best.map(|(c, _, _)| c)
}

/// ` (did you mean `x`?)` or an empty string.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    nearest(word, candidates)
        .map(|c| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// Rewrite serde's "unknown field `x`, expected one of `a`, `b`" into our wording with a
/// suggestion. Returns `(field, message)`; `None` if `msg` is not an unknown-field message.
pub fn unknown_field(msg: &str) -> Option<(String, String)> {
    let rest = msg.split("unknown field `").nth(1)?;
    let field = rest.split('`').next()?.to_string();
    let expected: Vec<&str> = rest
        .split("expected ")
        .nth(1)
        .map(|e| e.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let hint = did_you_mean(&field, expected.iter().copied());
    let valid = if expected.is_empty() {
        String::new()
    } else {
        format!("; valid keys: {}", expected.join(", "))
    };
    Some((field.clone(), format!("unknown key `{field}`{hint}{valid}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        assert_eq!(
            nearest("parms", ["params", "needs", "kind"]),
            Some("params")
        );
        assert_eq!(
            nearest("pretrian", ["pretrain", "dataset"]),
            Some("pretrain")
        );
        assert_eq!(nearest("zzzz", ["params", "needs"]), None);
        assert_eq!(nearest("dta", ["a", "data"]), Some("data"));
        assert_eq!(nearest("bb", ["a", "b"]), Some("b"));
    }

    #[test]
    fn rewrites_serde_unknown_field() {
        let (f, m) = unknown_field(
            "stages.x: unknown field `parms`, expected one of `kind`, `params` at line 3",
        )
        .unwrap();
        assert_eq!(f, "parms");
        assert!(m.contains("did you mean `params`"), "{m}");
    }
}

//! Output formats of `cjepa report`.

use std::str::FromStr;

/// A table output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// GitHub markdown.
    Md,
    /// Comma-separated values.
    Csv,
    /// JSON (list of row objects).
    Json,
    /// LaTeX tabular.
    Latex,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "md" | "markdown" => Ok(Format::Md),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "latex" | "tex" => Ok(Format::Latex),
            _ => Err(format!("unknown format `{s}`; use md, csv, json or latex")),
        }
    }
}

impl Format {
    /// File extension.
    pub fn ext(self) -> &'static str {
        match self {
            Format::Md => "md",
            Format::Csv => "csv",
            Format::Json => "json",
            Format::Latex => "tex",
        }
    }
}

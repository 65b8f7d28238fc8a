//! Reports from the store: tables of stored metrics (markdown, CSV, JSON, LaTeX).

pub mod format;
pub mod table;

pub use format::Format;
pub use table::{metrics_table, Table};

//! Reports from the store: the paper's tables next to the published numbers, tables of stored
//! metrics (markdown, CSV, JSON, LaTeX) and plots (SVG, PNG).

pub mod baselines;
pub mod format;
pub mod html;
pub mod paper;
pub mod plots;
pub mod runs;
pub mod state;
pub mod table;

pub use format::Format;
pub use paper::{paper_tables, PaperTable};
pub use table::{metrics_table, metrics_tables_by_kind, Table};

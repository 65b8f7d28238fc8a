//! Errors of the model code: bad configuration, bad inputs, weights that don't fit.

/// Everything that can go wrong building or running the networks.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration value is out of range.
    #[error("model config: field `{field}`: {msg}")]
    Config { field: &'static str, msg: String },
    /// An input tensor (images, mask indices) has the wrong shape or content.
    #[error("model input `{what}`: {msg}")]
    Input { what: &'static str, msg: String },
    /// A weight set does not match the architecture.
    #[error("weights: {msg}")]
    Weights { msg: String },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the model code.
pub type Result<T> = std::result::Result<T, ModelError>;

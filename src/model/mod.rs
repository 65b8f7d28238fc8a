//! Networks of I-JEPA / C-JEPA: the ViT encoder, the predictor and their building blocks
//! (METHOD.md §1-§2; shapes and orders pinned by `golden/model/README.md`).
//!
//! - `config`: [`VitConfig`] with the registry presets;
//! - `pos_embed`: fixed 2-D sin-cos position embedding;
//! - `layers`: LayerNorm, Linear, attention, MLP, block (all differentiable);
//! - `custom_op`: one trait for candle's custom ops of every arity ([`custom_op::Op`]);
//! - `fused`: fused CPU kernels of those layers, each with its backward;
//! - `tokens`: `apply_masks` and `repeat_interleave_batch`;
//! - `vit`: the encoder; `predictor`: the predictor;
//! - `masks`: the multi-block mask sampler;
//! - `jepa`: the three networks with their variables (init, load, EMA pairs);
//! - `precision`: bf16 autocast of the matrix products (f32 master weights), TF32 on CUDA;
//! - `import`: official I-JEPA `.pth.tar` checkpoints (names and shapes checked).

pub mod classifier_head;
pub mod config;
pub mod cuda_kernels;
pub mod cuda_ops;
pub mod custom_op;
pub mod detect;
pub mod error;
pub mod fused;
pub mod gather;
pub mod head_bank;
pub mod import;
pub mod init;
pub mod jepa;
pub mod launch;
pub mod layers;
pub mod masks;
pub mod pooled;
pub mod pos_embed;
pub mod precision;
pub mod predictor;
pub mod resize;
pub mod seg_heads;
pub mod seg_net;
pub mod tokens;
pub mod vit;

pub use config::VitConfig;
pub use error::ModelError;
pub use jepa::JepaNetworks;
pub use predictor::{Predictor, PredictorTrace};
pub use vit::VisionTransformer;

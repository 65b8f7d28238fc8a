//! Instance masks in COCO's encodings: run-length encoding ([`Rle`], pycocotools' `maskApi.c`
//! codec, column-major) and polygons rasterised into it ([`polygon`]). Data, not metrics: the
//! dataset readers, the detection head and COCOeval all use them.

pub mod polygon;
pub mod rle;

pub use polygon::{polygons_to_rle, rle_from_bbox, rle_from_polygon, rles_from_polygons};
pub use rle::Rle;

/// A mask-level error (RLE codec, rasteriser input, size mismatch).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid mask: {0}")]
pub struct MaskError(pub String);

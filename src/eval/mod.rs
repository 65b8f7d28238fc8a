//! Evaluation metrics, each an exact port of its reference tool (tested against golden vectors):
//! COCO (RLE, COCOeval), ADE20K mIoU, DAVIS-2017 J&F, CLEVR Count/Dist labels.

pub mod clevr;
pub mod coco;
pub mod davis;
pub mod embed;
pub mod label_propagation;
pub mod segmentation;
pub mod topk;

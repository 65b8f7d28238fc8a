//! Evaluation metrics, each an exact port of its reference tool (tested against golden vectors):
//! COCO (RLE, COCOeval), ADE20K mIoU, DAVIS-2017 J&F. (The CLEVR Count/Dist labels are data: [`crate::data::clevr_labels`].)

pub mod coco;
pub mod davis;
pub mod embed;
pub mod label_propagation;
pub mod segmentation;
pub mod topk;

//! COCO instances and results JSON: serde types, loading with validation (errors name the file
//! and the annotation / image id), pycocotools `loadRes` semantics for detections, and the
//! contiguous <-> COCO category id maps used for training.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use rayon::prelude::*;

use super::segm_json::RawSeg;
use super::CocoError;
use crate::data::mask::polygons_to_rle;
use crate::data::mask::Rle;

/// An image entry (`images[]`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct CocoImage {
    /// Image id.
    pub id: i64,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// File name (may be empty).
    #[serde(default)]
    pub file_name: String,
}

/// A category entry (`categories[]`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct CocoCategory {
    /// COCO category id (not contiguous).
    pub id: i64,
    /// Name, e.g. "person".
    #[serde(default)]
    pub name: String,
    /// Super-category, e.g. "person".
    #[serde(default)]
    pub supercategory: String,
}

/// An object's segmentation.
#[derive(Clone, Debug, PartialEq)]
pub enum Segmentation {
    /// One or more polygons `[x1, y1, x2, y2, ...]`, rasterised at the image size and merged.
    Polygons(Vec<Vec<f64>>),
    /// An RLE mask (from uncompressed `counts` lists or compressed strings).
    Rle(Rle),
}

/// A ground-truth annotation.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoAnnotation {
    /// Annotation id (COCOeval uses 0 as "unmatched", so ids should start at 1).
    pub id: i64,
    /// Image id.
    pub image_id: i64,
    /// COCO category id.
    pub category_id: i64,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// The stored `area` (used as is for the area ranges, never recomputed).
    pub area: f64,
    /// Crowd region (ignored ground truth that can absorb detections).
    pub iscrowd: bool,
    /// Segmentation, when present.
    pub segmentation: Option<Segmentation>,
}

/// A COCO instances file.
#[derive(Clone, Debug, Default)]
pub struct CocoDataset {
    /// Images in file order.
    pub images: Vec<CocoImage>,
    /// Categories in file order.
    pub categories: Vec<CocoCategory>,
    /// Annotations in file order.
    pub annotations: Vec<CocoAnnotation>,
    /// Where it came from (file path or label), used in error messages.
    pub source: String,
    img_index: HashMap<i64, usize>,
}

/// One entry of a results file, before `loadRes` (also usable to build results in memory).
#[derive(Clone, Debug, PartialEq)]
pub struct ResultEntry {
    /// Image id (must be a ground-truth image).
    pub image_id: i64,
    /// COCO category id (must be a ground-truth category).
    pub category_id: i64,
    /// Confidence.
    pub score: f64,
    /// `[x, y, w, h]`, when given.
    pub bbox: Option<[f64; 4]>,
    /// Mask, when given.
    pub segmentation: Option<Segmentation>,
}

/// How a detection's `area` (used for the small / medium / large ranges) is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetArea {
    /// pycocotools `loadRes`: if the first entry has a non-empty `bbox`, every detection gets
    /// `area = w * h` of its box (also in the segm evaluation); otherwise the mask pixel count.
    #[default]
    LoadRes,
    /// As if the `bbox` key were removed from every entry before `loadRes` (detectron2-style):
    /// `area` = mask pixel count, `bbox` = the mask's tight box.
    FromMask,
}

/// A detection after `loadRes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    /// 1-based position in the results list.
    pub id: i64,
    /// Image id.
    pub image_id: i64,
    /// COCO category id.
    pub category_id: i64,
    /// Confidence.
    pub score: f64,
    /// `[x, y, w, h]` (given, or the mask's box).
    pub bbox: [f64; 4],
    /// Area used for the area ranges.
    pub area: f64,
    /// Mask (the box as a polygon when only a box was given, as pycocotools does).
    pub segmentation: Segmentation,
}

/// Loaded detections.
#[derive(Clone, Debug, Default)]
pub struct CocoResults {
    /// Detections in file order (`id` = index + 1).
    pub detections: Vec<Detection>,
    /// Where they came from, used in error messages.
    pub source: String,
}

/// Sorted COCO category ids <-> contiguous indices `0..K`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CategoryMap {
    ids: Vec<i64>,
}

impl CategoryMap {
    /// Builds the map from any list of ids (sorted and de-duplicated here).
    pub fn new(ids: impl IntoIterator<Item = i64>) -> CategoryMap {
        let mut ids: Vec<i64> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        CategoryMap { ids }
    }
    /// Contiguous index of a COCO id.
    pub fn to_contiguous(&self, coco_id: i64) -> Option<usize> {
        self.ids.binary_search(&coco_id).ok()
    }
    /// COCO id of a contiguous index.
    pub fn to_coco(&self, index: usize) -> Option<i64> {
        self.ids.get(index).copied()
    }
    /// Number of categories `K`.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when there are no categories.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// The sorted COCO ids.
    pub fn coco_ids(&self) -> &[i64] {
        &self.ids
    }
}

#[derive(Deserialize)]
struct RawGt<'a> {
    images: Vec<CocoImage>,
    #[serde(default, borrow)]
    annotations: Vec<RawAnn<'a>>,
    categories: Vec<CocoCategory>,
}

#[derive(Deserialize)]
struct RawAnn<'a> {
    id: i64,
    image_id: i64,
    category_id: i64,
    #[serde(default, borrow)]
    segmentation: Option<RawSeg<'a>>,
    area: Option<f64>,
    bbox: Option<Vec<f64>>,
    #[serde(default)]
    iscrowd: Option<Value>,
}

#[derive(Deserialize)]
struct RawDet<'a> {
    image_id: i64,
    category_id: i64,
    score: Option<f64>,
    #[serde(default)]
    bbox: Option<Vec<f64>>,
    #[serde(default, borrow)]
    segmentation: Option<RawSeg<'a>>,
}

fn read(path: &Path) -> Result<String, CocoError> {
    std::fs::read_to_string(path).map_err(|source| CocoError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(path: &str, msg: String) -> CocoError {
    CocoError::Invalid {
        path: path.to_string(),
        msg,
    }
}

fn det_name(i: usize) -> String {
    format!("detection {i} (0-based position in the list)")
}

fn box4(v: &[f64]) -> Option<[f64; 4]> {
    <[f64; 4]>::try_from(v)
        .ok()
        .filter(|b| b.iter().all(|x| x.is_finite()))
}

fn check_size(r: &Rle, im: &CocoImage) -> Result<(), String> {
    if (r.h, r.w) == (im.height, im.width) {
        return Ok(());
    }
    Err(format!(
        "RLE size [{}, {}] differs from image {} size [{}, {}] (size is [height, width])",
        r.h, r.w, im.id, im.height, im.width
    ))
}

impl CocoDataset {
    /// `(id, name)` of every category, by id (the order of the report's per-category rows).
    pub fn categories_by_id(&self) -> Vec<(i64, String)> {
        let mut c: Vec<(i64, String)> = self
            .categories
            .iter()
            .map(|c| (c.id, c.name.clone()))
            .collect();
        c.sort_by_key(|c| c.0);
        c
    }

    /// Loads and validates an instances file.
    pub fn from_file(path: &Path) -> Result<CocoDataset, CocoError> {
        CocoDataset::from_json_str(&read(path)?, &path.display().to_string())
    }

    /// Parses and validates instances JSON; `source` names it in errors.
    pub fn from_json_str(json: &str, source: &str) -> Result<CocoDataset, CocoError> {
        let raw: RawGt = serde_json::from_str(json).map_err(|e| CocoError::Json {
            path: source.to_string(),
            what: "instances",
            source: e,
        })?;
        let mut img_index = HashMap::with_capacity(raw.images.len());
        for (i, im) in raw.images.iter().enumerate() {
            if img_index.insert(im.id, i).is_some() {
                return Err(invalid(source, format!("image id {} appears twice", im.id)));
            }
        }
        let mut cats = HashSet::new();
        if let Some(c) = raw.categories.iter().find(|c| !cats.insert(c.id)) {
            return Err(invalid(
                source,
                format!("category id {} appears twice", c.id),
            ));
        }
        let mut ann_ids = HashSet::with_capacity(raw.annotations.len());
        let mut annotations = Vec::with_capacity(raw.annotations.len());
        for a in raw.annotations {
            let err = |msg: String| invalid(source, format!("annotation {} {msg}", a.id));
            if !ann_ids.insert(a.id) {
                return Err(err(
                    "has an id that appears twice; ids must be unique".into()
                ));
            }
            let Some(&ii) = img_index.get(&a.image_id) else {
                return Err(err(format!("refers to unknown image_id {}", a.image_id)));
            };
            if !cats.contains(&a.category_id) {
                return Err(err(format!(
                    "refers to unknown category_id {}",
                    a.category_id
                )));
            }
            let bbox = a.bbox.as_deref().and_then(box4);
            let bbox =
                bbox.ok_or_else(|| err("needs a \"bbox\" of 4 numbers [x, y, w, h]".into()))?;
            let area = a
                .area
                .ok_or_else(|| err("needs an \"area\" (COCOeval uses it as is)".into()))?;
            let iscrowd = match &a.iscrowd {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    v.as_i64()
                        .ok_or_else(|| err("has an iscrowd that is not 0 or 1".into()))?
                        != 0
                }
            };
            let segmentation = match a.segmentation {
                None => None,
                Some(v) => Some(v.into_segmentation().map_err(err)?),
            };
            if let Some(Segmentation::Rle(r)) = &segmentation {
                check_size(r, &raw.images[ii]).map_err(|m| err(format!("has an {m}")))?;
            }
            let (id, image_id, category_id) = (a.id, a.image_id, a.category_id);
            annotations.push(CocoAnnotation {
                id,
                image_id,
                category_id,
                bbox,
                area,
                iscrowd,
                segmentation,
            });
        }
        Ok(CocoDataset {
            images: raw.images,
            categories: raw.categories,
            annotations,
            source: source.to_string(),
            img_index,
        })
    }

    /// The image with this id.
    pub fn image(&self, id: i64) -> Option<&CocoImage> {
        self.img_index.get(&id).map(|&i| &self.images[i])
    }

    /// Sorted category ids <-> `0..K`.
    pub fn category_map(&self) -> CategoryMap {
        CategoryMap::new(self.categories.iter().map(|c| c.id))
    }

    /// Mask of a segmentation at the size of image `image_id` (`COCO.annToRLE`): polygons are
    /// rasterised and merged, RLEs are taken as they are.
    pub fn segmentation_to_rle(&self, seg: &Segmentation, image_id: i64) -> Result<Rle, CocoError> {
        match seg {
            Segmentation::Rle(r) => Ok(r.clone()),
            Segmentation::Polygons(p) => {
                let im = self.image(image_id).ok_or_else(|| {
                    CocoError::Usage(format!("image_id {image_id} is not in {}", self.source))
                })?;
                Ok(polygons_to_rle(p, im.height, im.width)?)
            }
        }
    }

    /// Mask of ground-truth annotation `index` (position in `annotations`).
    pub fn ann_to_rle(&self, index: usize) -> Result<Rle, CocoError> {
        let a = self
            .annotations
            .get(index)
            .ok_or_else(|| CocoError::Usage(format!("annotation index {index} is out of range")))?;
        let err = |msg: String| invalid(&self.source, format!("annotation {} {msg}", a.id));
        let seg = a.segmentation.as_ref();
        let seg =
            seg.ok_or_else(|| err("has no segmentation; segm evaluation needs one".into()))?;
        self.segmentation_to_rle(seg, a.image_id)
            .map_err(|e| err(format!("cannot be rasterised: {e}")))
    }
}

impl CocoResults {
    /// Loads a results file (a JSON list) against the ground truth `gt`.
    pub fn from_file(
        path: &Path,
        gt: &CocoDataset,
        mode: DetArea,
    ) -> Result<CocoResults, CocoError> {
        CocoResults::from_json_str(&read(path)?, &path.display().to_string(), gt, mode)
    }

    /// Parses results JSON; `source` names it in errors.
    pub fn from_json_str(
        json: &str,
        source: &str,
        gt: &CocoDataset,
        mode: DetArea,
    ) -> Result<CocoResults, CocoError> {
        let raw: Vec<RawDet> = serde_json::from_str(json).map_err(|e| CocoError::Json {
            path: source.to_string(),
            what: "results",
            source: e,
        })?;
        // Decoding the masks is most of the work: in parallel, keeping the first error in order.
        let entries: Vec<Result<ResultEntry, CocoError>> = raw
            .into_par_iter()
            .enumerate()
            .map(|(i, d)| {
                let err = |msg: String| invalid(source, format!("{} {msg}", det_name(i)));
                let score = d.score.filter(|s| s.is_finite());
                let score = score.ok_or_else(|| err("needs a finite \"score\"".into()))?;
                let bbox = match d.bbox.as_deref() {
                    None | Some([]) => None,
                    Some(b) => Some(
                        box4(b).ok_or_else(|| err("has a bbox that is not 4 numbers".into()))?,
                    ),
                };
                let segmentation = match d.segmentation {
                    None => None,
                    Some(v) => Some(v.into_segmentation().map_err(err)?),
                };
                let (image_id, category_id) = (d.image_id, d.category_id);
                Ok(ResultEntry {
                    image_id,
                    category_id,
                    score,
                    bbox,
                    segmentation,
                })
            })
            .collect();
        let entries = entries.into_iter().collect::<Result<Vec<_>, _>>()?;
        CocoResults::from_entries(entries, source, gt, mode)
    }

    /// `loadRes` on in-memory entries: ids 1..N, `iscrowd` 0, `area` and `bbox` as `mode` says.
    pub fn from_entries(
        entries: Vec<ResultEntry>,
        source: &str,
        gt: &CocoDataset,
        mode: DetArea,
    ) -> Result<CocoResults, CocoError> {
        let cats: HashSet<i64> = gt.categories.iter().map(|c| c.id).collect();
        let box_mode =
            mode == DetArea::LoadRes && entries.first().is_some_and(|e| e.bbox.is_some());
        let mut detections = Vec::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            let err = |msg: String| invalid(source, format!("{} {msg}", det_name(i)));
            let Some(im) = gt.image(e.image_id) else {
                return Err(err(format!(
                    "refers to unknown image_id {}; use the image ids of {}",
                    e.image_id, gt.source
                )));
            };
            if !cats.contains(&e.category_id) {
                return Err(err(format!(
                    "refers to unknown category_id {}; use the COCO category ids of {} \
                     (map contiguous indices back with CategoryMap::to_coco)",
                    e.category_id, gt.source
                )));
            }
            if let Some(Segmentation::Rle(r)) = &e.segmentation {
                check_size(r, im).map_err(|m| err(format!("has an {m}")))?;
            }
            let (id, image_id, category_id, score) =
                (i as i64 + 1, e.image_id, e.category_id, e.score);
            let det = if box_mode {
                let bb = e
                    .bbox
                    .ok_or_else(|| err("has no bbox although the first one has".into()))?;
                let segmentation = e.segmentation.unwrap_or_else(|| {
                    let (x1, x2, y1, y2) = (bb[0], bb[0] + bb[2], bb[1], bb[1] + bb[3]);
                    Segmentation::Polygons(vec![vec![x1, y1, x1, y2, x2, y2, x2, y1]])
                });
                let area = bb[2] * bb[3];
                Detection {
                    id,
                    image_id,
                    category_id,
                    score,
                    bbox: bb,
                    area,
                    segmentation,
                }
            } else {
                let seg = e.segmentation.ok_or_else(|| {
                    err("has no segmentation (needed when detections carry no bbox)".into())
                })?;
                let rle = gt.segmentation_to_rle(&seg, e.image_id);
                let rle = rle.map_err(|e| err(format!("cannot be rasterised: {e}")))?;
                let bbox = match (mode, e.bbox) {
                    (DetArea::LoadRes, Some(b)) => b,
                    _ => rle.to_bbox(),
                };
                let (area, segmentation) = (rle.area() as f64, Segmentation::Rle(rle));
                Detection {
                    id,
                    image_id,
                    category_id,
                    score,
                    bbox,
                    area,
                    segmentation,
                }
            };
            detections.push(det);
        }
        Ok(CocoResults {
            detections,
            source: source.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GT: &str = r#"{"images": [{"id": 3, "width": 4, "height": 2}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [{"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 2, 2],
            "area": 4, "iscrowd": 0, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}]}"#;

    #[test]
    fn category_map_roundtrip() {
        let gt = CocoDataset::from_json_str(GT, "gt.json").unwrap();
        let m = gt.category_map();
        assert_eq!(m.coco_ids(), &[1, 18]);
        assert_eq!(m.to_contiguous(18), Some(1));
        assert_eq!(m.to_coco(0), Some(1));
        assert_eq!(m.to_contiguous(7), None);
    }

    #[test]
    fn errors_name_file_and_id() {
        let bad = GT.replace("\"image_id\": 3", "\"image_id\": 17");
        let e = CocoDataset::from_json_str(&bad, "gt.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gt.json") && e.contains("annotation 5") && e.contains("17"),
            "{e}"
        );
        let bad = GT.replace("[[0, 0, 2, 0, 2, 2, 0, 2]]", "{\"foo\": 1}");
        let e = CocoDataset::from_json_str(&bad, "gt.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("annotation 5 has a segmentation of unknown shape"),
            "{e}"
        );
        let gt = CocoDataset::from_json_str(GT, "gt.json").unwrap();
        let dt = r#"[{"image_id": 17, "category_id": 1, "bbox": [0,0,1,1], "score": 0.5}]"#;
        let e = CocoResults::from_json_str(dt, "dt.json", &gt, DetArea::LoadRes).unwrap_err();
        assert!(e.to_string().contains("unknown image_id 17"), "{e}");
    }

    #[test]
    fn load_res_area_rules() {
        let gt = CocoDataset::from_json_str(GT, "gt.json").unwrap();
        let dt = r#"[{"image_id": 3, "category_id": 1, "bbox": [0,0,3,2], "score": 0.5,
            "segmentation": {"size": [2, 4], "counts": [0, 2, 6]}}]"#;
        let r = CocoResults::from_json_str(dt, "dt.json", &gt, DetArea::LoadRes).unwrap();
        assert_eq!(r.detections[0].area, 6.0);
        let r = CocoResults::from_json_str(dt, "dt.json", &gt, DetArea::FromMask).unwrap();
        assert_eq!(r.detections[0].area, 2.0);
        assert_eq!(r.detections[0].bbox, [0.0, 0.0, 1.0, 2.0]);
    }
}

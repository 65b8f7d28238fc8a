//! IDX files (the `*-ubyte` format of MNIST and Fashion-MNIST), plain or gzip-compressed, and
//! their conversion into the `imagefolder` layout.
//!
//! An IDX file is a big-endian header — two zero bytes, a type byte (`0x08` = unsigned byte, the
//! only type read here), the number of dimensions — then one `u32` per dimension and the data in
//! row-major order. Images are `[n, rows, cols]`, labels `[n]`.
//!
//! [`import_imagefolder`] writes `train/<class>/<index>.png` from one image/label pair and
//! `val/<class>/<index>.png` from another, keeping the first `per_class` images of every class in
//! file order (deterministic, balanced), resized to `size` px (bilinear) and stored as RGB.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{GrayImage, ImageFormat};

use super::DataError;

/// The type byte of unsigned 8-bit data.
const TYPE_U8: u8 = 0x08;

/// A decoded IDX file of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data (`dims.iter().product()` bytes).
    pub data: Vec<u8>,
}

/// Read an IDX file (gzip-compressed when it starts with the gzip magic `1f 8b`).
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let raw = fs_err::read(path)?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| {
                DataError::invalid(
                    path,
                    format!("gzip data is corrupt ({e}); download or reinstall the file"),
                )
            })?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

/// Parse the bytes of an (uncompressed) IDX file; `path` names it in errors.
pub fn parse_idx(path: &Path, b: &[u8]) -> Result<IdxArray, DataError> {
    let bad = |msg: String| DataError::invalid(path, msg);
    if b.len() < 4 || b[0] != 0 || b[1] != 0 {
        return Err(bad(
            "not an IDX file (the first two bytes must be zero); pass an MNIST-style \
             `*-ubyte` or `*-ubyte.gz` file"
                .into(),
        ));
    }
    if b[2] != TYPE_U8 {
        return Err(bad(format!(
            "IDX data type 0x{:02x} is not supported; only unsigned bytes (0x08) are read",
            b[2]
        )));
    }
    let nd = b[3] as usize;
    if nd == 0 {
        return Err(bad("IDX header has zero dimensions".into()));
    }
    let head = 4 + 4 * nd;
    if b.len() < head {
        return Err(bad(format!(
            "truncated IDX header: {} bytes, {nd} dimensions need {head}",
            b.len()
        )));
    }
    let dims: Vec<usize> = (0..nd)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize
        })
        .collect();
    let n: usize = dims.iter().product();
    if b.len() - head != n {
        return Err(bad(format!(
            "IDX dimensions {dims:?} need {n} data bytes, the file has {}; the file is \
             truncated or not an IDX file",
            b.len() - head
        )));
    }
    Ok(IdxArray {
        dims,
        data: b[head..].to_vec(),
    })
}

/// One split to import: an images file and its labels file.
#[derive(Debug, Clone)]
pub struct IdxSplit {
    /// `[n, rows, cols]` IDX images.
    pub images: PathBuf,
    /// `[n]` IDX labels.
    pub labels: PathBuf,
    /// Images kept per class (the first ones in file order).
    pub per_class: usize,
}

/// What [`import_imagefolder`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    /// Class folder names.
    pub classes: Vec<String>,
    /// Images written to `train/`.
    pub train: usize,
    /// Images written to `val/`.
    pub val: usize,
}

/// Convert two IDX image/label pairs into `out/{train,val}/<class>/<index>.png`.
///
/// The class folder of label `i` is `i` zero-padded, followed by `_<class_names[i]>` when names
/// are given, so that the sorted folders keep the label order. `size` is the output side in pixels.
/// `out` must be absent or empty.
pub fn import_imagefolder(
    train: &IdxSplit,
    val: &IdxSplit,
    out: &Path,
    size: u32,
    class_names: &[String],
) -> Result<ImportSummary, DataError> {
    if size == 0 {
        return Err(DataError::param("size", "must be at least 1 px"));
    }
    if out.exists() && fs_err::read_dir(out)?.next().is_some() {
        return Err(DataError::layout(
            out,
            "output folder is not empty; pass a new or empty folder",
        ));
    }
    let (ti, tl) = (read_images(&train.images)?, read_labels(&train.labels)?);
    let (vi, vl) = (read_images(&val.images)?, read_labels(&val.labels)?);
    check_pair(&train.images, &ti, &train.labels, &tl)?;
    check_pair(&val.images, &vi, &val.labels, &vl)?;
    let n_classes = tl.data.iter().chain(&vl.data).copied().max().unwrap_or(0) as usize + 1;
    if !class_names.is_empty() && class_names.len() < n_classes {
        return Err(DataError::invalid(
            &train.labels,
            format!(
                "labels go up to {}, but {} class names were given; give one name per class",
                n_classes - 1,
                class_names.len()
            ),
        ));
    }
    if let Some(n) = class_names
        .iter()
        .find(|n| n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.'))
    {
        return Err(DataError::param(
            "class names",
            format!("`{n}` cannot be a folder name; use letters, digits, `-` or `_`"),
        ));
    }
    // the label leads the folder name so that sorted folders keep the label order
    let w = (n_classes - 1).to_string().len();
    let classes: Vec<String> = (0..n_classes)
        .map(|c| match class_names.get(c) {
            Some(n) => format!("{c:0w$}_{n}"),
            None => format!("{c:0w$}"),
        })
        .collect();
    let n_train = write_split(&ti, &tl, train, &out.join("train"), size, &classes)?;
    let n_val = write_split(&vi, &vl, val, &out.join("val"), size, &classes)?;
    Ok(ImportSummary {
        classes,
        train: n_train,
        val: n_val,
    })
}

fn read_images(p: &Path) -> Result<IdxArray, DataError> {
    let a = read_idx(p)?;
    if a.dims.len() != 3 {
        return Err(DataError::invalid(
            p,
            format!(
                "expected images with 3 dimensions [n, rows, cols], found {:?}; pass the \
                 `*-images-idx3-ubyte` file here",
                a.dims
            ),
        ));
    }
    Ok(a)
}

fn read_labels(p: &Path) -> Result<IdxArray, DataError> {
    let a = read_idx(p)?;
    if a.dims.len() != 1 {
        return Err(DataError::invalid(
            p,
            format!(
                "expected labels with 1 dimension [n], found {:?}; pass the \
                 `*-labels-idx1-ubyte` file here",
                a.dims
            ),
        ));
    }
    Ok(a)
}

fn check_pair(ip: &Path, i: &IdxArray, lp: &Path, l: &IdxArray) -> Result<(), DataError> {
    if i.dims[0] != l.dims[0] {
        return Err(DataError::invalid(
            lp,
            format!(
                "{} labels but {} has {} images; pass the labels file of the same split",
                l.dims[0],
                ip.display(),
                i.dims[0]
            ),
        ));
    }
    Ok(())
}

fn write_split(
    imgs: &IdxArray,
    labels: &IdxArray,
    split: &IdxSplit,
    dir: &Path,
    size: u32,
    classes: &[String],
) -> Result<usize, DataError> {
    let (rows, cols) = (imgs.dims[1], imgs.dims[2]);
    let px = rows * cols;
    let mut taken = vec![0usize; classes.len()];
    for c in classes {
        fs_err::create_dir_all(dir.join(c))?;
    }
    let mut written = 0;
    for (i, &lab) in labels.data.iter().enumerate() {
        let c = lab as usize;
        if taken[c] >= split.per_class {
            continue;
        }
        taken[c] += 1;
        let g = GrayImage::from_raw(
            cols as u32,
            rows as u32,
            imgs.data[i * px..(i + 1) * px].to_vec(),
        )
        .expect("size checked");
        let g = if (rows, cols) == (size as usize, size as usize) {
            g
        } else {
            image::imageops::resize(&g, size, size, FilterType::Triangle)
        };
        let rgb = image::DynamicImage::ImageLuma8(g).to_rgb8();
        let path = dir.join(&classes[c]).join(format!("{i:05}.png"));
        let mut buf = std::io::Cursor::new(Vec::new());
        rgb.write_to(&mut buf, ImageFormat::Png)
            .map_err(|e| DataError::image(&path, format!("PNG encode: {e}")))?;
        fs_err::write(&path, buf.into_inner())?;
        written += 1;
    }
    if let Some(c) = taken.iter().position(|&t| t < split.per_class) {
        return Err(DataError::invalid(
            &split.labels,
            format!(
                "class {} has {} images, fewer than the {} asked per class; ask for fewer",
                classes[c], taken[c], split.per_class
            ),
        ));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, TYPE_U8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let b = idx(&[2, 2, 3], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let (p, pg) = (dir.path().join("a-ubyte"), dir.path().join("a-ubyte.gz"));
        std::fs::write(&p, &b).unwrap();
        std::fs::write(&pg, gz(&b)).unwrap();
        for f in [&p, &pg] {
            let a = read_idx(f).unwrap();
            assert_eq!(a.dims, vec![2, 2, 3]);
            assert_eq!(a.data[5], 5);
        }
    }

    #[test]
    fn rejects_bad_files_naming_them() {
        let p = Path::new("x-ubyte");
        let e = parse_idx(p, &[1, 2, 8, 1]).unwrap_err().to_string();
        assert!(
            e.contains("x-ubyte") && e.contains("not an IDX file"),
            "{e}"
        );
        let e = parse_idx(p, &[0, 0, 0x0d, 1, 0, 0, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("0x0d"), "{e}");
        let e = parse_idx(p, &idx(&[4], &[1, 2])).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn imports_balanced_imagefolder() {
        let dir = tempfile::tempdir().unwrap();
        // 6 images of 2x2, labels 0 1 0 1 0 2
        let px: Vec<u8> = (0..24).map(|v| v as u8 * 10).collect();
        let w = |name: &str, b: Vec<u8>| {
            let p = dir.path().join(name);
            std::fs::write(&p, b).unwrap();
            p
        };
        let images = w("i.gz", gz(&idx(&[6, 2, 2], &px)));
        let labels = w("l", idx(&[6], &[0, 1, 0, 1, 0, 2]));
        let split = |n| IdxSplit {
            images: images.clone(),
            labels: labels.clone(),
            per_class: n,
        };
        let out = dir.path().join("out");
        let s = import_imagefolder(&split(1), &split(1), &out, 4, &[]).unwrap();
        assert_eq!(s.classes, vec!["0", "1", "2"]);
        assert_eq!((s.train, s.val), (3, 3));
        let img = image::open(out.join("train/1/00001.png"))
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (4, 4));
        let f = crate::data::imagefolder::ImageFolder::open(&out, "val").unwrap();
        assert_eq!(f.samples.len(), 3);
        // class 2 has one image only
        let e = import_imagefolder(&split(2), &split(1), &dir.path().join("o2"), 4, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("class 2 has 1 images"), "{e}");
        // labels of another length
        let short = w("s", idx(&[5], &[0, 1, 0, 1, 0]));
        let bad = IdxSplit {
            labels: short,
            ..split(1)
        };
        let e = import_imagefolder(&bad, &split(1), &dir.path().join("o3"), 4, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 labels"), "{e}");
    }
}

//! DAVIS-2017 layout: `JPEGImages/480p/<seq>/%05d.jpg`, `Annotations/480p/<seq>/%05d.png`
//! (8-bit palette PNGs whose palette INDEX is the object id, 0 = background, 255 = void) and
//! `ImageSets/2017/{train,val}.txt` (one sequence per line).
//!
//! Label PNGs are read by [`super::label_png`] (palette indices kept as they are stored).

use std::path::{Path, PathBuf};

use super::check::{files_with_ext, probe_and_report, stem, CheckOptions, CheckReport};
use super::DataError;

/// Resolution folder used by the 2017 semi-supervised benchmark.
pub const RESOLUTION: &str = "480p";

/// The two splits of the layout.
pub const SPLITS: [&str; 2] = ["train", "val"];

/// A palette PNG: indices plus its palette.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaletteImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major palette indices (= object ids for DAVIS).
    pub indices: Vec<u8>,
    /// RGB palette entries.
    pub palette: Vec<[u8; 3]>,
}

use super::label_png::{read_raw, PngIssue};

/// [`read_raw`] with the failure as a data error naming the file.
pub(crate) fn read_png_raw(path: &Path) -> Result<super::label_png::RawPng, DataError> {
    read_raw(path).map_err(|e| match e {
        PngIssue::Io(e) => DataError::Io(e),
        PngIssue::Decode(m) | PngIssue::Unsupported(m) => DataError::image(path, m),
    })
}

/// Read a palette (mode `P`) PNG and return its indices. Any other PNG colour type is an error.
pub fn read_palette_png(path: &Path) -> Result<PaletteImage, DataError> {
    let raw = read_png_raw(path)?;
    if raw.color != png::ColorType::Indexed {
        return Err(DataError::image(
            path,
            format!("expected a palette (mode P) PNG whose indices are object ids, found {:?} {}-bit; save the annotation as an indexed PNG", raw.color, raw.depth as u8),
        ));
    }
    let palette = raw
        .palette
        .unwrap_or_default()
        .chunks_exact(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    Ok(PaletteImage {
        width: raw.width,
        height: raw.height,
        indices: raw.data,
        palette,
    })
}

/// Write an 8-bit palette PNG (the palette is padded/truncated to 256 entries).
pub fn write_palette_png(path: &Path, img: &PaletteImage) -> Result<(), DataError> {
    let n = img.width as usize * img.height as usize;
    if img.indices.len() != n {
        return Err(DataError::image(
            path,
            format!(
                "{} indices for a {}x{} image",
                img.indices.len(),
                img.width,
                img.height
            ),
        ));
    }
    let mut pal: Vec<u8> = img.palette.iter().take(256).flatten().copied().collect();
    pal.resize(256 * 3, 0);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width, img.height);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(pal);
        let mut w = enc
            .write_header()
            .map_err(|e| DataError::image(path, format!("PNG encode: {e}")))?;
        w.write_image_data(&img.indices)
            .map_err(|e| DataError::image(path, format!("PNG encode: {e}")))?;
        w.finish()
            .map_err(|e| DataError::image(path, format!("PNG encode: {e}")))?;
    }
    fs_err::write(path, out)?;
    Ok(())
}

/// The DAVIS palette (= PASCAL VOC colour map), 256 entries.
pub fn davis_palette() -> Vec<[u8; 3]> {
    (0..256u32)
        .map(|i| {
            let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
            let mut c = i;
            for j in 0..8 {
                r |= ((c & 1) as u8) << (7 - j);
                g |= (((c >> 1) & 1) as u8) << (7 - j);
                b |= (((c >> 2) & 1) as u8) << (7 - j);
                c >>= 3;
            }
            [r, g, b]
        })
        .collect()
}

/// Accept the dataset root itself or a parent holding `DAVIS/`.
pub fn resolve_root(path: &Path) -> PathBuf {
    super::root_or_inner(path, "DAVIS", "JPEGImages")
}

/// One sequence: frame and annotation paths, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DavisSequence {
    /// Sequence name (folder name).
    pub name: String,
    /// `JPEGImages/480p/<seq>/*.jpg`, sorted.
    pub frames: Vec<PathBuf>,
    /// `Annotations/480p/<seq>/*.png`, sorted.
    pub annotations: Vec<PathBuf>,
}

impl DavisSequence {
    /// Number of objects = max id of the first annotation frame (255 = void counts as 0).
    pub fn n_objects(&self) -> Result<u8, DataError> {
        let first = self
            .annotations
            .first()
            .ok_or_else(|| DataError::layout(&self.name, "sequence has no annotation frames"))?;
        let img = read_palette_png(first)?;
        Ok(img
            .indices
            .iter()
            .map(|&v| if v == 255 { 0 } else { v })
            .max()
            .unwrap_or(0))
    }
}

/// One split of a DAVIS dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Davis {
    /// Dataset root.
    pub root: PathBuf,
    /// `train` or `val`.
    pub split: String,
    /// Sequences in ImageSets order.
    pub sequences: Vec<DavisSequence>,
}

/// Sequence names listed in `ImageSets/2017/<split>.txt` (blank lines skipped).
pub fn read_image_set(root: &Path, split: &str) -> Result<Vec<String>, DataError> {
    let p = image_set_path(root, split);
    let text = fs_err::read_to_string(&p)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

fn image_set_path(root: &Path, split: &str) -> PathBuf {
    root.join("ImageSets")
        .join("2017")
        .join(format!("{split}.txt"))
}

impl Davis {
    /// List the sequences of one split.
    pub fn open(path: &Path, split: &str) -> Result<Self, DataError> {
        let root = resolve_root(path);
        let names = read_image_set(&root, split)?;
        let mut sequences = Vec::new();
        for name in names {
            let fdir = root.join("JPEGImages").join(RESOLUTION).join(&name);
            let adir = root.join("Annotations").join(RESOLUTION).join(&name);
            if !fdir.is_dir() {
                return Err(DataError::layout(&fdir, format!("sequence `{name}` is listed in ImageSets/2017/{split}.txt but has no frame folder")));
            }
            let frames = files_with_ext(&fdir, &["jpg"])?;
            let annotations = if adir.is_dir() {
                files_with_ext(&adir, &["png"])?
            } else {
                Vec::new()
            };
            sequences.push(DavisSequence {
                name,
                frames,
                annotations,
            });
        }
        Ok(Davis {
            root,
            split: split.to_string(),
            sequences,
        })
    }
}

/// Check both splits: listed sequences exist, frame/annotation names match, first-frame
/// annotation present, annotations are palette PNGs of the frame size.
pub(crate) fn check_layout(root: &Path, opts: &CheckOptions, report: &mut CheckReport) {
    for split in SPLITS {
        let set = image_set_path(root, split);
        let names = match read_image_set(root, split) {
            Ok(n) => n,
            Err(_) => {
                report.problem(
                    &set,
                    format!("missing or unreadable sequence list for split `{split}`"),
                );
                continue;
            }
        };
        if names.is_empty() {
            report.problem(&set, "lists no sequences");
        }
        for name in names {
            check_sequence(root, split, &name, opts, report);
        }
    }
}

fn check_sequence(
    root: &Path,
    split: &str,
    name: &str,
    opts: &CheckOptions,
    report: &mut CheckReport,
) {
    let fdir = root.join("JPEGImages").join(RESOLUTION).join(name);
    let adir = root.join("Annotations").join(RESOLUTION).join(name);
    let frames = match files_with_ext(&fdir, &["jpg"]) {
        Ok(f) => f,
        Err(_) => {
            report.problem(
                &fdir,
                format!("frame folder of sequence `{name}` (listed in {split}.txt) is missing"),
            );
            return;
        }
    };
    let anns = match files_with_ext(&adir, &["png"]) {
        Ok(a) => a,
        Err(_) => {
            report.problem(
                &adir,
                format!("annotation folder of sequence `{name}` is missing"),
            );
            Vec::new()
        }
    };
    if frames.is_empty() {
        report.problem(&fdir, "no .jpg frames");
    }
    if frames.len() != anns.len() && !anns.is_empty() {
        report.problem(
            &adir,
            format!("{} annotation PNGs for {} frames", anns.len(), frames.len()),
        );
    }
    let first = adir.join("00000.png");
    if !first.is_file() {
        report.problem(
            &first,
            "first-frame annotation missing (semi-supervised VOS needs it)",
        );
    }
    let fstems: Vec<String> = frames.iter().map(|p| stem(p)).collect();
    for a in &anns {
        if !fstems.contains(&stem(a)) {
            report.problem(a, "annotation has no matching frame .jpg");
        }
    }
    let dims = probe_and_report(&frames, opts, report);
    let size = dims.iter().flatten().next().copied();
    for (f, d) in frames.iter().zip(&dims) {
        if let (Some(d), Some(s)) = (d, size) {
            if *d != s {
                report.problem(
                    f,
                    format!("frame is {}x{}, other frames are {}x{}", d.0, d.1, s.0, s.1),
                );
            }
        }
    }
    for a in &anns {
        match read_palette_png(a) {
            Ok(img) => {
                if let Some((w, h)) = size {
                    if (img.width, img.height) != (w, h) {
                        report.problem(
                            a,
                            format!(
                                "annotation is {}x{}, frames are {w}x{h}",
                                img.width, img.height
                            ),
                        );
                    }
                }
            }
            Err(e) => report.problem(a, e.to_string()),
        }
    }
    let classes = [(name.to_string(), frames.len())];
    report.count(split, frames.len(), anns.len(), classes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_matches_voc() {
        let p = davis_palette();
        assert_eq!(p.len(), 256);
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [128, 0, 0]);
        assert_eq!(p[2], [0, 128, 0]);
        assert_eq!(p[3], [128, 128, 0]);
        assert_eq!(p[255], [224, 224, 192]);
    }

    #[test]
    fn palette_png_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.png");
        let img = PaletteImage {
            width: 3,
            height: 2,
            indices: vec![0, 1, 2, 255, 3, 0],
            palette: davis_palette(),
        };
        write_palette_png(&p, &img).unwrap();
        assert_eq!(read_palette_png(&p).unwrap(), img);
    }
}

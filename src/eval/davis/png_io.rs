//! Single-channel PNG I/O for label maps: read the raw palette **indices** of a palette PNG
//! (PIL mode `P`, as `np.array(Image.open(p))` does) or the values of an 8-bit grayscale PNG
//! (mode `L`), and write palette PNGs with the DAVIS palette (the PASCAL VOC colour map).

use std::io::BufWriter;
use std::path::Path;

use png::{BitDepth, ColorType};

use super::DavisError;

pub(crate) use crate::data::label_png::{decode_index_png, PngIssue};

/// The DAVIS palette: the PASCAL VOC colour map, 256 RGB triples (768 bytes).
pub fn davis_palette() -> Vec<u8> {
    crate::data::davis::davis_palette().concat()
}

/// Read a DAVIS label PNG as `(height, width, indices)`: palette indices of a palette PNG (the
/// object ids, not RGB colours), or the values of an 8-bit grayscale PNG (what PIL/numpy give
/// the reference code for either mode). Any other PNG mode is an error naming the file.
pub fn read_palette_png(path: &Path) -> Result<(usize, usize, Vec<u8>), DavisError> {
    decode_index_png(path).map_err(|e| match e {
        PngIssue::Io(source) => DavisError::Io {
            path: path.to_path_buf(),
            source,
        },
        PngIssue::Decode(message) => DavisError::Png {
            path: path.to_path_buf(),
            message,
        },
        PngIssue::Unsupported(found) => DavisError::NotPalettePng {
            path: path.to_path_buf(),
            found,
        },
    })
}

/// Write `ids` (row-major, `h*w` object ids) as an 8-bit palette PNG with the DAVIS palette.
pub fn write_palette_png(path: &Path, h: usize, w: usize, ids: &[u8]) -> Result<(), DavisError> {
    let write_err = |message: String| DavisError::PngWrite {
        path: path.to_path_buf(),
        message,
    };
    if ids.len() != h * w || h == 0 || w == 0 {
        return Err(write_err(format!(
            "got {} ids for a {h}x{w} (HxW) image; pass exactly h*w > 0 values",
            ids.len()
        )));
    }
    let (wu, hu) = (
        u32::try_from(w).map_err(|e| write_err(e.to_string()))?,
        u32::try_from(h).map_err(|e| write_err(e.to_string()))?,
    );
    let file = fs_err::File::create(path).map_err(|source| DavisError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut enc = png::Encoder::new(BufWriter::new(file), wu, hu);
    enc.set_color(ColorType::Indexed);
    enc.set_depth(BitDepth::Eight);
    enc.set_palette(davis_palette());
    let mut writer = enc.write_header().map_err(|e| write_err(e.to_string()))?;
    writer
        .write_image_data(ids)
        .map_err(|e| write_err(e.to_string()))?;
    writer.finish().map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_palette_first_entries() {
        let p = davis_palette();
        assert_eq!(&p[..12], &[0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]);
        assert_eq!(&p[3 * 255..], &[224, 224, 192]);
    }

    #[test]
    fn palette_roundtrip() {
        let dir = std::env::temp_dir().join(format!("cjepa_davis_png_{}", std::process::id()));
        fs_err::create_dir_all(&dir).unwrap();
        let path = dir.join("rt.png");
        let ids: Vec<u8> = (0..15u8).map(|i| i % 4).collect();
        write_palette_png(&path, 3, 5, &ids).unwrap();
        assert_eq!(read_palette_png(&path).unwrap(), (3, 5, ids));
        assert!(write_palette_png(&path, 3, 4, &[0; 15]).is_err());
        let _ = fs_err::remove_dir_all(&dir);
    }
}

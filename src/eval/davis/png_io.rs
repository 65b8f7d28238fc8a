//! Single-channel PNG I/O for label maps: read the raw palette **indices** of a palette PNG
//! (PIL mode `P`, as `np.array(Image.open(p))` does) or the values of an 8-bit grayscale PNG
//! (mode `L`), and write palette PNGs with the DAVIS palette (the PASCAL VOC colour map).

use std::io::{BufReader, BufWriter};
use std::path::Path;

use png::{BitDepth, ColorType, Transformations};

use super::DavisError;

/// Why a PNG could not be read as a single-channel label map.
#[derive(Debug)]
pub(crate) enum PngIssue {
    Io(std::io::Error),
    Decode(String),
    /// The PNG is valid but not 8-bit grayscale / palette; holds a description like "RGB 8-bit".
    Unsupported(String),
}

fn describe(color: ColorType, depth: BitDepth) -> String {
    let c = match color {
        ColorType::Grayscale => "grayscale (L)",
        ColorType::Rgb => "RGB",
        ColorType::Indexed => "palette (P)",
        ColorType::GrayscaleAlpha => "grayscale+alpha (LA)",
        ColorType::Rgba => "RGBA",
    };
    format!("{c} {}-bit", depth as u8)
}

/// Decode an 8-bit grayscale PNG (values) or a 1/2/4/8-bit palette PNG (indices) into
/// `(height, width, row-major bytes)`. Everything else is `PngIssue::Unsupported`.
pub(crate) fn decode_index_png(path: &Path) -> Result<(usize, usize, Vec<u8>), PngIssue> {
    let file = fs_err::File::open(path).map_err(PngIssue::Io)?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| PngIssue::Decode(e.to_string()))?;
    let (color, depth) = (reader.info().color_type, reader.info().bit_depth);
    let bits = match (color, depth) {
        (ColorType::Grayscale, BitDepth::Eight) => 8,
        (ColorType::Indexed, d) if (d as u8) <= 8 => d as usize,
        _ => return Err(PngIssue::Unsupported(describe(color, depth))),
    };
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| PngIssue::Decode("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let out = reader
        .next_frame(&mut buf)
        .map_err(|e| PngIssue::Decode(e.to_string()))?;
    let (w, h) = (out.width as usize, out.height as usize);
    let mut data = Vec::with_capacity(w * h);
    for row in buf.chunks(out.line_size).take(h) {
        if bits == 8 {
            data.extend_from_slice(&row[..w]);
        } else {
            let per_byte = 8 / bits;
            let mask = (1u8 << bits) - 1;
            for x in 0..w {
                let byte = row[x / per_byte];
                let shift = 8 - bits * (x % per_byte + 1);
                data.push((byte >> shift) & mask);
            }
        }
    }
    Ok((h, w, data))
}

/// The DAVIS palette: the PASCAL VOC colour map, 256 RGB triples (768 bytes).
pub fn davis_palette() -> Vec<u8> {
    let mut pal = Vec::with_capacity(768);
    for i in 0..256u32 {
        let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
        let mut c = i;
        for j in 0..8 {
            r |= ((c & 1) as u8) << (7 - j);
            g |= (((c >> 1) & 1) as u8) << (7 - j);
            b |= (((c >> 2) & 1) as u8) << (7 - j);
            c >>= 3;
        }
        pal.extend_from_slice(&[r, g, b]);
    }
    pal
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

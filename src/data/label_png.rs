//! Label maps stored as single-channel PNGs (DAVIS annotations, ADE20K annotations, predicted
//! masks): the samples as they are stored, with the `png` crate (the `image` crate would expand a
//! palette to RGB and lose the indices). The one PNG reader of the crate's label maps; the
//! metric tools in `eval` read through it too.

use std::io::Cursor;
use std::path::Path;

use png::{BitDepth, ColorType};

/// Why a PNG could not be read as a label map.
#[derive(Debug)]
pub enum PngIssue {
    /// The file could not be read.
    Io(std::io::Error),
    /// Not a valid PNG, or corrupt data (the message says which).
    Decode(String),
    /// A valid PNG of another mode; holds a description like "RGB 8-bit".
    Unsupported(String),
}

/// A PIL-style name of a PNG mode, e.g. "palette (P) 8-bit".
pub fn describe(color: ColorType, depth: BitDepth) -> String {
    let c = match color {
        ColorType::Grayscale => "grayscale (L)",
        ColorType::Rgb => "RGB",
        ColorType::Indexed => "palette (P)",
        ColorType::GrayscaleAlpha => "grayscale+alpha (LA)",
        ColorType::Rgba => "RGBA",
    };
    format!("{c} {}-bit", depth as u8)
}

/// A PNG decoded without any transformation, one byte per sample.
#[derive(Debug, Clone)]
pub struct RawPng {
    pub width: u32,
    pub height: u32,
    pub color: png::ColorType,
    pub depth: png::BitDepth,
    pub palette: Option<Vec<u8>>,
    /// Samples, unpacked to one byte each for bit depths < 8 (16-bit: big-endian pairs).
    pub data: Vec<u8>,
}

/// Decode a PNG keeping palette indices / gray levels as they are stored.
pub fn read_raw(path: &Path) -> Result<RawPng, PngIssue> {
    let bytes = fs_err::read(path).map_err(PngIssue::Io)?;
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .map_err(|e| PngIssue::Decode(format!("not a valid PNG: {e}")))?;
    let info = reader.info();
    let (width, height, color, depth) = (info.width, info.height, info.color_type, info.bit_depth);
    let palette = info.palette.as_ref().map(|p| p.to_vec());
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| PngIssue::Decode("PNG too large".into()))?;
    let mut buf = vec![0u8; size];
    let out = reader
        .next_frame(&mut buf)
        .map_err(|e| PngIssue::Decode(format!("corrupt PNG data: {e}")))?;
    buf.truncate(out.buffer_size());
    let bits = depth as usize;
    let data = if bits < 8 && matches!(color, png::ColorType::Indexed | png::ColorType::Grayscale) {
        let line = out.line_size;
        let mut v = Vec::with_capacity(width as usize * height as usize);
        for row in buf.chunks(line).take(height as usize) {
            for x in 0..width as usize {
                let bit = x * bits;
                let byte = row.get(bit / 8).copied().unwrap_or(0);
                let shift = 8 - bits - (bit % 8);
                v.push((byte >> shift) & ((1u16 << bits) - 1) as u8);
            }
        }
        v
    } else {
        buf
    };
    Ok(RawPng {
        width,
        height,
        color,
        depth,
        palette,
        data,
    })
}

/// An 8-bit grayscale PNG (values) or a 1/2/4/8-bit palette PNG (indices) as `(height, width,
/// row-major bytes)`, what `np.array(Image.open(p))` gives the reference tools for either mode.
/// Any other mode is [`PngIssue::Unsupported`].
pub fn decode_index_png(path: &Path) -> Result<(usize, usize, Vec<u8>), PngIssue> {
    let raw = read_raw(path)?;
    match (raw.color, raw.depth) {
        (ColorType::Grayscale, BitDepth::Eight) => {}
        (ColorType::Indexed, d) if (d as u8) <= 8 => {}
        (c, d) => return Err(PngIssue::Unsupported(describe(c, d))),
    }
    Ok((raw.height as usize, raw.width as usize, raw.data))
}

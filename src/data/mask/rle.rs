//! Run-length encoded binary masks, a port of the COCO mask API (`maskApi.c`).
//!
//! A mask of `h` rows and `w` columns is flattened **column-major** (pixel `(y, x)` has index
//! `x * h + y`); `counts` are alternating run lengths starting with a run of zeros (which may be
//! empty). The compressed string form is the one found in COCO results files
//! (`rleToString` / `rleFrString`). Every function reproduces pycocotools bit for bit on
//! well-formed input; the loops are literal ports so that even odd inputs behave the same.

use super::MaskError;

/// A run-length encoded binary mask (`h` rows, `w` columns, column-major runs).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Rle {
    /// Number of rows (image height).
    pub h: usize,
    /// Number of columns (image width).
    pub w: usize,
    /// Alternating run lengths, starting with a run of 0s; they sum to `h * w`.
    pub counts: Vec<u32>,
}

fn rle_err(msg: impl Into<String>) -> MaskError {
    MaskError(msg.into())
}

impl Rle {
    /// Builds an RLE from run lengths, checking that they sum to `h * w`
    /// (this is `frPyObjects` on an uncompressed RLE `{"size": [h, w], "counts": [...]}`).
    pub fn from_counts(h: usize, w: usize, counts: Vec<u32>) -> Result<Rle, MaskError> {
        let sum: u64 = counts.iter().map(|&c| c as u64).sum();
        if sum != (h as u64) * (w as u64) {
            return Err(rle_err(format!(
                "RLE counts sum to {sum} but the mask size {h}x{w} has {} pixels; \
                 counts must be column-major runs covering the whole mask",
                (h as u64) * (w as u64)
            )));
        }
        Ok(Rle { h, w, counts })
    }

    /// Uncompressed counts as they appear in JSON (`u64`), range-checked to `u32`.
    pub fn from_uncompressed(h: usize, w: usize, counts: &[u64]) -> Result<Rle, MaskError> {
        let mut v = Vec::with_capacity(counts.len());
        for &c in counts {
            let c = u32::try_from(c)
                .map_err(|_| rle_err(format!("RLE run length {c} does not fit in 32 bits")))?;
            v.push(c);
        }
        Rle::from_counts(h, w, v)
    }

    /// An all-zero mask.
    pub fn empty(h: usize, w: usize) -> Rle {
        Rle {
            h,
            w,
            counts: vec![(h * w) as u32],
        }
    }

    /// Encodes a column-major mask (`mask[x * h + y]`, nonzero = foreground), like
    /// `maskUtils.encode` on a Fortran-ordered array.
    pub fn encode_col_major(mask: &[u8], h: usize, w: usize) -> Result<Rle, MaskError> {
        check_len(mask.len(), h, w)?;
        Ok(encode_iter(h, w, mask.iter().map(|&v| v != 0)))
    }

    /// Encodes a row-major mask (`mask[y * w + x]`, nonzero = foreground), e.g. image pixels.
    pub fn encode_row_major(mask: &[u8], h: usize, w: usize) -> Result<Rle, MaskError> {
        check_len(mask.len(), h, w)?;
        let it = (0..w).flat_map(move |x| (0..h).map(move |y| mask[y * w + x] != 0));
        Ok(encode_iter(h, w, it))
    }

    /// Decodes to a column-major 0/1 mask of `h * w` bytes.
    pub fn decode_col_major(&self) -> Vec<u8> {
        let n = self.h * self.w;
        let mut out = Vec::with_capacity(n);
        let mut v = 0u8;
        for &c in &self.counts {
            let take = (c as usize).min(n - out.len());
            out.extend(std::iter::repeat_n(v, take));
            v = 1 - v;
        }
        out.resize(n, 0);
        out
    }

    /// Decodes to a row-major 0/1 mask of `h * w` bytes (`mask[y * w + x]`).
    pub fn decode_row_major(&self) -> Vec<u8> {
        let cm = self.decode_col_major();
        let (h, w) = (self.h, self.w);
        let mut out = vec![0u8; h * w];
        for x in 0..w {
            for y in 0..h {
                out[y * w + x] = cm[x * h + y];
            }
        }
        out
    }

    /// The compressed string form (`rleToString`), e.g. `[5,2,1,1,3]` -> `"521O2"`.
    pub fn to_compressed(&self) -> String {
        let mut s = String::with_capacity(self.counts.len() * 2);
        for i in 0..self.counts.len() {
            let mut x = self.counts[i] as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push((c + 48) as char);
                if !more {
                    break;
                }
            }
        }
        s
    }

    /// Parses the compressed string form (`rleFrString`) and checks that the runs cover `h * w`.
    pub fn from_compressed(s: &str, h: usize, w: usize) -> Result<Rle, MaskError> {
        let bytes = s.as_bytes();
        let mut counts: Vec<u32> = Vec::with_capacity(bytes.len());
        let mut p = 0usize;
        while p < bytes.len() {
            let mut x: i64 = 0;
            let mut k = 0u32;
            loop {
                let Some(&b) = bytes.get(p) else {
                    return Err(rle_err(format!(
                        "compressed RLE string ends in the middle of a value (at byte {p})"
                    )));
                };
                if !(48..48 + 64).contains(&b) {
                    return Err(rle_err(format!(
                        "compressed RLE string has the invalid character {:?} at byte {p}; \
                         only '0'..'o' occur in pycocotools strings",
                        b as char
                    )));
                }
                if k >= 12 {
                    return Err(rle_err("compressed RLE string holds a value over 60 bits"));
                }
                let c = (b - 48) as i64;
                x |= (c & 0x1f) << (5 * k);
                let more = c & 0x20 != 0;
                p += 1;
                k += 1;
                if !more {
                    if c & 0x10 != 0 && 5 * k < 64 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            let m = counts.len();
            if m > 2 {
                x += counts[m - 2] as i64;
            }
            let c = u32::try_from(x).map_err(|_| {
                rle_err(format!(
                    "compressed RLE string decodes run {m} to {x}, outside 0..2^32"
                ))
            })?;
            counts.push(c);
        }
        Rle::from_counts(h, w, counts)
    }

    /// Number of foreground pixels (`rleArea`): the sum of the odd-indexed runs.
    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| c as u64)
            .sum()
    }

    /// Tight box `[x, y, w, h]` of the foreground (`rleToBbox`), `[0, 0, 0, 0]` when empty.
    pub fn to_bbox(&self) -> [f64; 4] {
        let h = self.h as u32;
        let w = self.w as u32;
        let m = (self.counts.len() / 2) * 2;
        if m == 0 || h == 0 {
            return [0.0; 4];
        }
        let (mut xs, mut ys, mut xe, mut ye) = (w, h, 0u32, 0u32);
        let mut cc = 0u32;
        let mut xp = 0u32;
        for j in 0..m {
            cc = cc.wrapping_add(self.counts[j]);
            let t = cc.wrapping_sub((j % 2) as u32);
            let y = t % h;
            let x = (t - y) / h;
            if j % 2 == 0 {
                xp = x;
            } else if xp < x {
                ys = 0;
                ye = h - 1;
            }
            xs = xs.min(x);
            xe = xe.max(x);
            ys = ys.min(y);
            ye = ye.max(y);
        }
        [
            xs as f64,
            ys as f64,
            (xe.wrapping_sub(xs).wrapping_add(1)) as f64,
            (ye.wrapping_sub(ys).wrapping_add(1)) as f64,
        ]
    }

    /// Pixelwise union (`intersect = false`) or intersection (`true`) of masks of one size
    /// (`rleMerge`). An empty list gives a 0x0 mask; a single RLE is returned as is.
    pub fn merge(rles: &[Rle], intersect: bool) -> Result<Rle, MaskError> {
        let Some(first) = rles.first() else {
            return Ok(Rle {
                h: 0,
                w: 0,
                counts: Vec::new(),
            });
        };
        let (h, w) = (first.h, first.w);
        if let Some(bad) = rles.iter().find(|r| r.h != h || r.w != w) {
            return Err(rle_err(format!(
                "cannot merge masks of different sizes ({h}x{w} and {}x{})",
                bad.h, bad.w
            )));
        }
        let mut cnts: Vec<u32> = first.counts.clone();
        for b in &rles[1..] {
            cnts = merge2(&cnts, &b.counts, intersect);
        }
        Ok(Rle { h, w, counts: cnts })
    }

    /// Union of masks of one size (`maskUtils.merge(rles)`).
    pub fn union(rles: &[Rle]) -> Result<Rle, MaskError> {
        Rle::merge(rles, false)
    }

    /// Intersection of masks of one size (`maskUtils.merge(rles, intersect=True)`).
    pub fn intersection(rles: &[Rle]) -> Result<Rle, MaskError> {
        Rle::merge(rles, true)
    }
}

fn check_len(len: usize, h: usize, w: usize) -> Result<(), MaskError> {
    if len != h * w {
        return Err(rle_err(format!(
            "mask buffer has {len} values but a {h}x{w} mask needs {}",
            h * w
        )));
    }
    Ok(())
}

/// `rleEncode` over a column-major stream of pixels (`h * w` of them).
pub(crate) fn encode_iter(h: usize, w: usize, it: impl Iterator<Item = bool>) -> Rle {
    let mut counts = Vec::new();
    let mut p = false;
    let mut c = 0u32;
    for v in it {
        if v != p {
            counts.push(c);
            c = 0;
            p = v;
        }
        c += 1;
    }
    counts.push(c);
    Rle { h, w, counts }
}

/// One step of the two-cursor walk over two run-length count lists (`rleMerge` / `rleIou`): a
/// stretch of `len` pixels where neither mask changes, the masks' values on it (`on`) and after it
/// (`next`), and whether it is the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunStep {
    /// Pixels in the stretch.
    pub len: u32,
    /// `(a, b)` on the stretch.
    pub on: (bool, bool),
    /// `(a, b)` after it.
    pub next: (bool, bool),
    /// No pixels follow.
    pub last: bool,
}

/// The two-cursor run walk of the official `rleMerge` and `rleIou` (a literal port: the same
/// stretches, in the same order, also for count lists of unequal total length).
pub(crate) fn run_walk<'a>(a: &'a [u32], b: &'a [u32]) -> impl Iterator<Item = RunStep> + 'a {
    let mut ca = a.first().copied().unwrap_or(0);
    let mut cb = b.first().copied().unwrap_or(0);
    let (mut va, mut vb) = (false, false);
    let (mut ia, mut ib) = (1usize, 1usize);
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let len = ca.min(cb);
        let on = (va, vb);
        let mut ct = 0u64;
        ca -= len;
        if ca == 0 && ia < a.len() {
            ca = a[ia];
            ia += 1;
            va = !va;
        }
        ct += ca as u64;
        cb -= len;
        if cb == 0 && ib < b.len() {
            cb = b[ib];
            ib += 1;
            vb = !vb;
        }
        ct += cb as u64;
        done = ct == 0;
        Some(RunStep {
            len,
            on,
            next: (va, vb),
            last: done,
        })
    })
}

/// One step of `rleMerge`: literal port of the two-cursor run walk.
fn merge2(a_cnts: &[u32], b_cnts: &[u32], intersect: bool) -> Vec<u32> {
    let mut out = Vec::with_capacity(a_cnts.len() + b_cnts.len());
    let mut v = false;
    let mut cc = 0u32;
    for step in run_walk(a_cnts, b_cnts) {
        cc = cc.wrapping_add(step.len);
        let (va, vb) = step.next;
        let vp = v;
        v = if intersect { va && vb } else { va || vb };
        if v != vp || step.last {
            out.push(cc);
            cc = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example() {
        let r = Rle::from_counts(4, 3, vec![5, 2, 1, 1, 3]).unwrap();
        assert_eq!(r.to_compressed(), "521O2");
        assert_eq!(Rle::from_compressed("521O2", 4, 3).unwrap(), r);
        assert_eq!(r.area(), 3);
    }

    #[test]
    fn roundtrip_with_negative_deltas() {
        // Deltas counts[i] - counts[i-2] from i = 3 on are large and negative here.
        let counts = vec![0, 100_000, 7, 3, 50_000, 1, 200_000 - 150_011];
        let total: u32 = counts.iter().sum();
        let r = Rle::from_counts(1, total as usize, counts).unwrap();
        let s = r.to_compressed();
        assert_eq!(Rle::from_compressed(&s, 1, total as usize).unwrap(), r);
    }

    #[test]
    fn mask_roundtrip_both_orders() {
        let (h, w) = (3, 4);
        let row: Vec<u8> = vec![0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 1];
        let r = Rle::encode_row_major(&row, h, w).unwrap();
        assert_eq!(r.decode_row_major(), row);
        let col = r.decode_col_major();
        assert_eq!(Rle::encode_col_major(&col, h, w).unwrap(), r);
        assert_eq!(r.area(), 7);
        assert_eq!(r.to_bbox(), [0.0, 0.0, 4.0, 3.0]);
    }

    #[test]
    fn bad_strings_are_errors() {
        assert!(Rle::from_compressed("52", 4, 3).is_err()); // wrong total
        assert!(Rle::from_compressed("5 ", 4, 3).is_err()); // bad char
        assert!(Rle::from_compressed("c", 4, 3).is_err()); // continuation without end
    }

    #[test]
    fn merge_union_intersection() {
        let a = Rle::encode_col_major(&[1, 1, 0, 0], 2, 2).unwrap();
        let b = Rle::encode_col_major(&[0, 1, 1, 0], 2, 2).unwrap();
        let u = Rle::union(&[a.clone(), b.clone()]).unwrap();
        let i = Rle::intersection(&[a, b]).unwrap();
        assert_eq!(u.decode_col_major(), vec![1, 1, 1, 0]);
        assert_eq!(i.decode_col_major(), vec![0, 1, 0, 0]);
    }
}

//! Polygon -> RLE rasterisation, a literal port of `rleFrPoly` / `rleFrBbox` and of the
//! polygon branch of `frPyObjects` + `merge` that `COCO.annToRLE` uses.
//!
//! Vertices are up-sampled by 5, edges are walked densely, the y-boundary crossings at pixel
//! centres are kept and turned into column-major run lengths. The integer casts truncate toward
//! zero exactly like the C `(int)` casts.

use super::rle::Rle;
use super::MaskError;

/// Rasterises one polygon `[x0, y0, x1, y1, ...]` into an `h` x `w` mask (`rleFrPoly`).
/// A trailing odd coordinate is ignored (as pycocotools does with `len(p) // 2` points).
pub fn rle_from_polygon(xy: &[f64], h: usize, w: usize) -> Rle {
    let k = xy.len() / 2;
    if k == 0 {
        return Rle::empty(h, w);
    }
    let scale = 5.0f64;
    let mut x: Vec<i32> = (0..k).map(|j| (scale * xy[2 * j] + 0.5) as i32).collect();
    let mut y: Vec<i32> = (0..k)
        .map(|j| (scale * xy[2 * j + 1] + 0.5) as i32)
        .collect();
    x.push(x[0]);
    y.push(y[0]);
    // Dense boundary points of the up-sampled polygon.
    let mut u: Vec<i32> = Vec::new();
    let mut v: Vec<i32> = Vec::new();
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe as i64 - xs as i64).abs();
        let dy = (ys as i64 - ye as i64).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        if dx >= dy {
            let s = (ye as f64 - ys as f64) / dx as f64;
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push((t + xs as i64) as i32);
                v.push((ys as f64 + s * t as f64 + 0.5) as i32);
            }
        } else {
            let s = (xe as f64 - xs as f64) / dy as f64;
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push((t + ys as i64) as i32);
                u.push((xs as f64 + s * t as f64 + 0.5) as i32);
            }
        }
    }
    // Points along the y-boundary, down-sampled to pixel centres.
    let w_max = w.wrapping_sub(1) as f64;
    let mut idx: Vec<u32> = Vec::new();
    for j in 1..u.len() {
        if u[j] == u[j - 1] {
            continue;
        }
        let xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
        let xd = (xd + 0.5) / scale - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > w_max {
            continue;
        }
        let yd = v[j].min(v[j - 1]) as f64;
        let mut yd = (yd + 0.5) / scale - 0.5;
        if yd < 0.0 {
            yd = 0.0;
        } else if yd > h as f64 {
            yd = h as f64;
        }
        let yd = yd.ceil();
        let lin = (xd as i32 as i64) * (h as i32 as i64) + (yd as i32 as i64);
        idx.push(lin as u32);
    }
    idx.push((h * w) as u32);
    idx.sort_unstable();
    // Differences, then merge zero-length gaps into the previous run.
    let mut prev = 0u32;
    for a in idx.iter_mut() {
        let t = *a;
        *a = a.wrapping_sub(prev);
        prev = t;
    }
    let mut counts: Vec<u32> = Vec::with_capacity(idx.len());
    counts.push(idx[0]);
    let mut j = 1;
    while j < idx.len() {
        if idx[j] > 0 {
            counts.push(idx[j]);
            j += 1;
        } else {
            j += 1;
            if j < idx.len() {
                if let Some(last) = counts.last_mut() {
                    *last = last.wrapping_add(idx[j]);
                }
                j += 1;
            }
        }
    }
    Rle { h, w, counts }
}

/// Rasterises a box `[x, y, w, h]` as the polygon of its corners (`rleFrBbox`).
pub fn rle_from_bbox(bb: [f64; 4], h: usize, w: usize) -> Rle {
    let (xs, ys) = (bb[0], bb[1]);
    let (xe, ye) = (xs + bb[2], ys + bb[3]);
    rle_from_polygon(&[xs, ys, xs, ye, xe, ye, xe, ys], h, w)
}

/// Largest accepted |coordinate|: the dense edge walk emits 5 points per pixel of edge length.
const MAX_COORD: f64 = 1e7;

/// One RLE per polygon, as `frPyObjects(polygons, h, w)` returns them.
///
/// Like pycocotools, a list whose first element has exactly 4 numbers is a list of boxes
/// `[x, y, w, h]` (each must then have 4 numbers); otherwise the first element needs more than
/// 4 numbers and every element is a polygon.
pub fn rles_from_polygons(polys: &[Vec<f64>], h: usize, w: usize) -> Result<Vec<Rle>, MaskError> {
    let Some(first) = polys.first() else {
        return Err(MaskError(
            "an empty polygon list cannot be rasterised (pycocotools fails on it too); \
             give at least one polygon with 3 or more points"
                .into(),
        ));
    };
    if let Some(bad) = polys
        .iter()
        .flatten()
        .find(|v| !v.is_finite() || v.abs() > MAX_COORD)
    {
        return Err(MaskError(format!(
            "polygon coordinate {bad} is not finite or beyond +-{MAX_COORD} pixels"
        )));
    }
    if first.len() == 4 {
        polys
            .iter()
            .map(|p| match <[f64; 4]>::try_from(p.as_slice()) {
                Ok(bb) => Ok(rle_from_bbox(bb, h, w)),
                Err(_) => Err(MaskError(format!(
                    "the first polygon has 4 numbers, which pycocotools reads as a box list, \
                     but another element has {} numbers",
                    p.len()
                ))),
            })
            .collect()
    } else if first.len() > 4 {
        Ok(polys.iter().map(|p| rle_from_polygon(p, h, w)).collect())
    } else {
        Err(MaskError(format!(
            "the first polygon has only {} numbers; a polygon needs at least 3 points \
             (6 numbers)",
            first.len()
        )))
    }
}

/// The mask of one object made of several polygons: rasterise each and take the union
/// (`maskUtils.merge(maskUtils.frPyObjects(polys, h, w))`).
pub fn polygons_to_rle(polys: &[Vec<f64>], h: usize, w: usize) -> Result<Rle, MaskError> {
    let rles = rles_from_polygons(polys, h, w)?;
    Rle::union(&rles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_square() {
        // Square with corners (1,1)-(3,3): covers pixel centres 1..=2 in x and y... the
        // rasteriser keeps pixels whose centre lies inside, so pixels x,y in {1, 2}.
        let r = rle_from_polygon(&[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0], 5, 5);
        let m = r.decode_row_major();
        let mut want = vec![0u8; 25];
        for y in 1..3 {
            for x in 1..3 {
                want[y * 5 + x] = 1;
            }
        }
        assert_eq!(m, want);
        assert_eq!(r.area(), 4);
        assert_eq!(r.to_bbox(), [1.0, 1.0, 2.0, 2.0]);
        // The same square as a box.
        assert_eq!(rle_from_bbox([1.0, 1.0, 2.0, 2.0], 5, 5), r);
    }

    #[test]
    fn union_of_parts_and_bad_lists() {
        let a = vec![0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0, 2.0];
        let b = vec![3.0, 3.0, 5.0, 3.0, 5.0, 5.0, 3.0, 5.0];
        let r = polygons_to_rle(&[a, b], 6, 6).unwrap();
        assert_eq!(r.area(), 8);
        assert!(polygons_to_rle(&[], 6, 6).is_err());
        assert!(polygons_to_rle(&[vec![1.0, 2.0]], 6, 6).is_err());
    }
}

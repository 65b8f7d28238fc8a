//! Reading a `segmentation` JSON value straight into typed form, without an intermediate
//! `serde_json::Value` (a results file holds ~500k of them): a list of polygons, an RLE with
//! compressed (borrowed from the input when it has no escapes) or uncompressed counts, or
//! "something else", which [`RawSeg::into_segmentation`] reports with the object's name.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::dataset::Segmentation;
use crate::data::mask::Rle;

/// A segmentation as read, before validation.
#[derive(Debug)]
pub(super) enum RawSeg<'a> {
    /// `[[x1, y1, ...], ...]` with numbers only.
    Polygons(Vec<Vec<f64>>),
    /// `{"size": [h, w], "counts": "..."}`.
    Compressed(usize, usize, Cow<'a, str>),
    /// `{"size": [h, w], "counts": [..]}` with non-negative integers.
    Runs(usize, usize, Vec<u64>),
    /// Any other shape.
    Unknown,
}

impl RawSeg<'_> {
    /// Decodes into a [`Segmentation`]; the error text follows the object's name
    /// ("annotation 5 has ...").
    pub(super) fn into_segmentation(self) -> Result<Segmentation, String> {
        let rle = match self {
            RawSeg::Polygons(p) => return Ok(Segmentation::Polygons(p)),
            RawSeg::Compressed(h, w, s) => Rle::from_compressed(&s, h, w),
            RawSeg::Runs(h, w, c) => Rle::from_uncompressed(h, w, &c),
            RawSeg::Unknown => {
                return Err(
                    "has a segmentation of unknown shape; expected a list of polygons \
                     [[x1, y1, ...], ...] or an RLE {\"size\": [h, w], \"counts\": [...] or \
                     \"...\"}"
                        .to_string(),
                )
            }
        };
        rle.map(Segmentation::Rle)
            .map_err(|e| format!("has an {e}"))
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut a: A) -> Result<(), A::Error> {
    while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Reads a list whose items all satisfy `item`, or None (the rest is consumed).
fn seq_of<'de, A, T>(mut a: A, item: fn(Item<'de>) -> Option<T>) -> Result<Option<Vec<T>>, A::Error>
where
    A: SeqAccess<'de>,
{
    let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0));
    let mut ok = true;
    while let Some(x) = a.next_element::<Item<'de>>()? {
        if ok {
            match item(x) {
                Some(v) => out.push(v),
                None => ok = false,
            }
        }
    }
    Ok(ok.then_some(out))
}

/// One list item of the shapes met inside segmentations.
enum Item<'de> {
    /// A number as f64 (`Value::as_f64`) and, when a non-negative integer, as u64.
    Num(f64, Option<u64>),
    /// A list of numbers only.
    Nums(Vec<f64>),
    /// Anything else (a list holding non-numbers, an object, a string, ...).
    Other(std::marker::PhantomData<&'de ()>),
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'de>(std::marker::PhantomData<&'de ()>);
        impl<'de> Visitor<'de> for V<'de> {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Item::Num(v as f64, Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Item::Num(v as f64, None))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Item::Num(v, None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
                let nums = seq_of(a, |x| match x {
                    Item::Num(f, _) => Some(f),
                    _ => None,
                })?;
                Ok(nums.map_or(Item::Other(self.0), Item::Nums))
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
                drain_map(a).map(|_| Item::Other(self.0))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Item::Other(self.0))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Item::Other(self.0))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Item::Other(self.0))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `counts`: a string (borrowed when possible) or a list of non-negative integers.
enum Counts<'de> {
    Str(Cow<'de, str>),
    Runs(Vec<u64>),
    Bad,
}

impl<'de> Deserialize<'de> for Counts<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Counts<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Counts::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Counts::Str(Cow::Owned(v.to_string())))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
                let runs = seq_of(a, |x| match x {
                    Item::Num(_, u) => u,
                    _ => None,
                })?;
                Ok(runs.map_or(Counts::Bad, Counts::Runs))
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
                drain_map(a).map(|_| Counts::Bad)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Counts::Bad)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Counts::Bad)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Counts::Bad)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Counts::Bad)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Counts::Bad)
            }
        }
        d.deserialize_any(V)
    }
}

/// `size`: a list of non-negative integers, else None.
struct Size(Option<Vec<u64>>);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Size(match Counts::deserialize(d)? {
            Counts::Runs(r) => Some(r),
            _ => None,
        }))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawSeg<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawSeg<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a COCO segmentation")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
                let polys = seq_of(a, |x| match x {
                    Item::Nums(v) => Some(v),
                    _ => None,
                })?;
                Ok(polys.map_or(RawSeg::Unknown, RawSeg::Polygons))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let (mut size, mut counts) = (None, None);
                while let Some(k) = a.next_key::<Cow<'de, str>>()? {
                    match k.as_ref() {
                        "size" => size = Some(a.next_value::<Size>()?.0),
                        "counts" => counts = Some(a.next_value::<Counts<'de>>()?),
                        _ => {
                            a.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                let Some(Some(&[h, w])) = size.as_ref().map(|s| s.as_deref()) else {
                    return Ok(RawSeg::Unknown);
                };
                let (h, w) = (h as usize, w as usize);
                Ok(match counts {
                    Some(Counts::Str(s)) => RawSeg::Compressed(h, w, s),
                    Some(Counts::Runs(r)) => RawSeg::Runs(h, w, r),
                    _ => RawSeg::Unknown,
                })
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(RawSeg::Unknown)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(RawSeg::Unknown)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(RawSeg::Unknown)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(RawSeg::Unknown)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(RawSeg::Unknown)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Segmentation, String> {
        let raw: RawSeg = serde_json::from_str(json).expect("valid JSON");
        raw.into_segmentation()
    }

    #[test]
    fn shapes() {
        assert_eq!(
            read("[[0, 1.5, 2, -3, 4e0, 5]]").unwrap(),
            Segmentation::Polygons(vec![vec![0.0, 1.5, 2.0, -3.0, 4.0, 5.0]])
        );
        let want = Rle::from_counts(4, 3, vec![5, 2, 1, 1, 3]).unwrap();
        let c = read(r#"{"size": [4, 3], "counts": "521O2", "extra": {"a": [1]}}"#);
        assert_eq!(c.unwrap(), Segmentation::Rle(want.clone()));
        let u = read(r#"{"counts": [5, 2, 1, 1, 3], "size": [4, 3]}"#);
        assert_eq!(u.unwrap(), Segmentation::Rle(want));
        // An escaped backslash cannot be borrowed from the input: still decoded.
        let want = Rle::from_counts(1, 44, vec![44]).unwrap();
        let s = want.to_compressed();
        assert!(s.contains('\\'), "{s}");
        let json = format!(
            r#"{{"size": [1, 44], "counts": {}}}"#,
            serde_json::to_string(&s).unwrap()
        );
        assert!(json.contains("\\\\"), "{json}");
        assert_eq!(read(&json).unwrap(), Segmentation::Rle(want));
    }

    #[test]
    fn other_shapes_are_unknown_not_json_errors() {
        for bad in [
            r#"{"foo": 1}"#,
            r#"[[0, 1, "x", 3]]"#,
            r#"[[0, 1, 2, 3, 4, 5], {"a": 1}]"#,
            r#"{"size": [4], "counts": "521O2"}"#,
            r#"{"size": [4, -3], "counts": "521O2"}"#,
            r#"{"size": [4, 3], "counts": [5, 2.5]}"#,
            r#"{"size": [4, 3]}"#,
            r#""text""#,
            "7",
        ] {
            let e = read(bad).unwrap_err();
            assert!(
                e.starts_with("has a segmentation of unknown shape"),
                "{bad}: {e}"
            );
        }
        let e = read(r#"{"size": [4, 3], "counts": "52"}"#).unwrap_err();
        assert!(
            e.starts_with("has an invalid mask: RLE counts sum to"),
            "{e}"
        );
    }
}

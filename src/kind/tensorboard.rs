//! Live training curves in TensorBoard's event-file format: every training kind writes its logged
//! scalars into `<work>/tb/<stage instance>/events.out.tfevents.*` as it trains, flushed at each
//! logged step, so `tensorboard --logdir <store>` shows every run while it runs (the run is named
//! by the path, which ends in the stage instance).
//!
//! The format: TFRecord framing (`u64` length, masked CRC32C of the length, the record, masked
//! CRC32C of the record; `crc32c` crate) around `tensorflow.Event` protocol buffers (`prost`,
//! the few fields written here declared by hand). A resumed stage opens a new file and first writes
//! a `SessionLog START` at the first step it logs: TensorBoard then drops the steps from there on
//! that the interrupted run had written, so a resumed run continues the same curve without
//! duplicates (what `tf.summary` does after a restart).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// `tensorflow.Event` (the fields written here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event holds.
    #[prost(oneof = "What", tags = "3, 5, 6")]
    pub what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// `brain.Event:2`, the first record of a file.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Scalars.
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// Session marks (START purges later steps of earlier files).
    #[prost(message, tag = "6")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// Tagged values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// Curve name.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// 1 = START.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.START`.
pub const SESSION_START: i32 = 1;

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Writes one run's event file.
#[derive(Debug)]
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
    /// Earlier files exist in the folder: purge from the first step written.
    resumed: bool,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard expects.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        fs_err::create_dir_all(dir)?;
        let resumed = fs_err::read_dir(dir)?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("tfevents"));
        let host = hostname::get().map_or("host".into(), |h| h.to_string_lossy().into_owned());
        // seconds first (TensorBoard's convention), then the nanoseconds, so that files sort in
        // the order they were opened even within one second (TensorBoard reads them sorted)
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!(
            "events.out.tfevents.{:010}.{:09}.{host}.{}",
            t.as_secs(),
            t.subsec_nanos(),
            std::process::id()
        );
        let path = dir.join(name);
        let mut w = Self {
            out: BufWriter::new(File::create(&path)?),
            path,
            resumed,
        };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            what: Some(What::FileVersion("brain.Event:2".into())),
        })?;
        w.out.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        self.out
            .write_all(&frame(&prost::Message::encode_to_vec(e)))
    }

    /// The scalars of one step (non-finite values are left out), then a flush.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let step = step as i64;
        if std::mem::take(&mut self.resumed) {
            self.write(&Event {
                wall_time: now(),
                step,
                what: Some(What::SessionLog(SessionLog {
                    status: SESSION_START,
                })),
            })?;
        }
        let value: Vec<SummaryValue> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: (*tag).to_string(),
                simple_value: Some(*v as f32),
            })
            .collect();
        if !value.is_empty() {
            self.write(&Event {
                wall_time: now(),
                step,
                what: Some(What::Summary(Summary { value })),
            })?;
        }
        self.out.flush()
    }
}

/// Errors of [`read_events`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// From the file system.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A bad frame or record.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

/// The events of one file, checksums verified (a record cut short at the end, as by a crash in
/// the middle of a write, ends the list).
pub fn read_events(path: &Path) -> Result<Vec<Event>, ReadError> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let bad = |msg: String| ReadError::Format {
        path: path.display().to_string(),
        msg,
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 12 <= data.len() {
        let len_bytes = &data[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return Err(bad(format!("length checksum mismatch at byte {at}")));
        }
        let (start, end) = (at + 12, at + 12 + len);
        if end + 4 > data.len() {
            break;
        }
        let body = &data[start..end];
        let crc = u32::from_le_bytes(data[end..end + 4].try_into().expect("4 bytes"));
        if crc != masked_crc(body) {
            return Err(bad(format!("record checksum mismatch at byte {at}")));
        }
        out.push(
            <Event as prost::Message>::decode(body)
                .map_err(|e| bad(format!("record at byte {at}: {e}")))?,
        );
        at = end + 4;
    }
    Ok(out)
}

/// One scalar curve: its tag and its `(step, value)` points in step order.
pub type Curve = (String, Vec<(u64, f64)>);

/// The scalar curves of every event file in `dir` as TensorBoard shows them: files in name order
/// (the name holds the creation time), a `SessionLog START` at step `s` dropping the points at
/// `s` and later written before it. `(tag, [(step, value)])`, tags sorted.
pub fn read_curves(dir: &Path) -> Result<Vec<Curve>, ReadError> {
    let mut files: Vec<PathBuf> = fs_err::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
        })
        .collect();
    files.sort();
    let mut curves: std::collections::BTreeMap<String, Vec<(u64, f64)>> = Default::default();
    for f in files {
        for e in read_events(&f)? {
            match e.what {
                Some(What::SessionLog(s)) if s.status == SESSION_START => {
                    for pts in curves.values_mut() {
                        pts.retain(|(st, _)| (*st as i64) < e.step);
                    }
                }
                Some(What::Summary(s)) => {
                    for v in s.value {
                        if let Some(x) = v.simple_value {
                            curves
                                .entry(v.tag)
                                .or_default()
                                .push((e.step as u64, x as f64));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(curves.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framing of TensorFlow's `tf_record` (a record of the bytes "abc", as written by
    /// `tf.io.TFRecordWriter`): length 3, masked CRC32C of the length, data, masked CRC32C.
    #[test]
    fn frames_like_tfrecord() {
        let f = frame(b"abc");
        assert_eq!(&f[..8], &3u64.to_le_bytes());
        assert_eq!(&f[12..15], b"abc");
        // CRC32C("abc") = 0x364b3fb7 (RFC 3720 check values); masked as TensorFlow masks it
        let crc = 0x364b_3fb7u32;
        let masked = crc.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(u32::from_le_bytes(f[15..19].try_into().unwrap()), masked);
    }

    #[test]
    fn a_resumed_run_continues_the_curve_without_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        for s in [1u64, 2, 3, 4] {
            w.scalars(s, &[("loss", 1.0 / s as f64), ("lr", f64::NAN)])
                .unwrap();
        }
        drop(w);
        // the run was checkpointed at step 2 and resumes: steps 3 and 4 come again, new values
        let mut w = EventWriter::create(dir.path()).unwrap();
        for s in [3u64, 4, 5] {
            w.scalars(s, &[("loss", 10.0 * s as f64)]).unwrap();
        }
        let curves = read_curves(dir.path()).unwrap();
        assert_eq!(curves.len(), 1, "the NaN lr is left out: {curves:?}");
        assert_eq!(curves[0].0, "loss");
        assert_eq!(
            curves[0].1,
            vec![(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0), (5, 50.0)]
        );
        let first = read_events(w.path()).unwrap();
        assert_eq!(
            first[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
    }
}

//! TensorBoard event files (`train.tensorboard = true`): `<out>/tensorboard/events.out.tfevents.
//! <unix time>.pith`, one scalar per number of the step's metrics line (`tensorboard --logdir
//! runs/`). The format is TFRecord framing — length (u64 LE), masked CRC-32C of the length, the
//! record, masked CRC-32C of the record — around `Event` protobufs: `wall_time` (1, double),
//! `step` (2, int64), `file_version` (3, string) or `summary` (5) of `value` (1) messages with
//! `tag` (1, string) and `simple_value` (2, float). A dozen fields do not need a protobuf crate.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct Events {
    path: PathBuf,
    file: BufWriter<File>,
}

impl Events {
    /// A new event file in `dir` (created), starting with the file-version record.
    pub fn create(dir: &Path, wall_time: f64) -> Result<Events, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("events.out.tfevents.{}.pith", wall_time as u64));
        let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut ev = Events { path, file: BufWriter::new(file) };
        let mut e = double(1, wall_time);
        e.extend(bytes_field(3, b"brain.Event:2"));
        ev.record(&e)?;
        Ok(ev)
    }

    /// One event at `step` holding every (tag, value) as a scalar; flushed, so a crash keeps it.
    pub fn scalars(&mut self, step: u64, wall_time: f64, values: &[(String, f64)]) -> Result<(), String> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = bytes_field(1, tag.as_bytes());
            value.extend(key(2, 5));
            value.extend((*v as f32).to_le_bytes());
            summary.extend(bytes_field(1, &value));
        }
        let mut e = double(1, wall_time);
        e.extend(key(2, 0));
        e.extend(varint(step));
        e.extend(bytes_field(5, &summary));
        self.record(&e)?;
        self.file.flush().map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<(), String> {
        let len = (data.len() as u64).to_le_bytes();
        let mut r = len.to_vec();
        r.extend(masked_crc(&len).to_le_bytes());
        r.extend(data);
        r.extend(masked_crc(data).to_le_bytes());
        self.file.write_all(&r).map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

fn key(field: u64, wire: u64) -> Vec<u8> {
    varint(field << 3 | wire)
}
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}
fn bytes_field(field: u64, b: &[u8]) -> Vec<u8> {
    let mut out = key(field, 2);
    out.extend(varint(b.len() as u64));
    out.extend(b);
    out
}
fn double(field: u64, v: f64) -> Vec<u8> {
    let mut out = key(field, 1);
    out.extend(v.to_le_bytes());
    out
}

/// CRC-32C (Castagnoli, reflected 0x82F63B78), masked as TFRecord does.
fn masked_crc(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    let crc = !crc;
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Read an event file back: (step, tag, value) of every scalar, after checking every CRC (for
/// tests, and for anyone debugging a file TensorBoard will not open).
pub fn read_scalars(path: &Path) -> Result<Vec<(u64, String, f32)>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut at, mut out) = (0, Vec::new());
    while at < data.len() {
        let bad = || format!("{}: a broken record at byte {at}", path.display());
        let len_bytes = data.get(at..at + 8).ok_or_else(bad)?;
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = |b: &[u8], at: usize| data.get(at..at + 4).is_some_and(|c| c == masked_crc(b).to_le_bytes());
        let rec = data.get(at + 12..at + 12 + len).ok_or_else(bad)?;
        if !crc(len_bytes, at + 8) || !crc(rec, at + 12 + len) {
            return Err(format!("{}: a CRC mismatch in the record at byte {at}", path.display()));
        }
        let mut step = 0;
        for (field, v) in fields(rec).ok_or_else(bad)? {
            match (field, v) {
                (2, Field::Int(s)) => step = s,
                (5, Field::Bytes(summary)) => {
                    for (_, value) in fields(summary).ok_or_else(bad)? {
                        let Field::Bytes(value) = value else { return Err(bad()) };
                        let (mut tag, mut x) = (String::new(), f32::NAN);
                        for f in fields(value).ok_or_else(bad)? {
                            match f {
                                (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
                                (2, Field::Fixed32(b)) => x = f32::from_le_bytes(b),
                                _ => {}
                            }
                        }
                        out.push((step, tag, x));
                    }
                }
                _ => {}
            }
        }
        at += 16 + len;
    }
    Ok(out)
}

enum Field<'a> {
    Int(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// The (field number, value) pairs of one protobuf message; None if it is malformed.
fn fields(mut b: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    fn read_varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let k = read_varint(&mut b)?;
        let f = match k & 7 {
            0 => Field::Int(read_varint(&mut b)?),
            1 => {
                b = b.get(8..)?;
                Field::Fixed64
            }
            2 => {
                let n = read_varint(&mut b)? as usize;
                let (v, rest) = (b.get(..n)?, b.get(n..)?);
                b = rest;
                Field::Bytes(v)
            }
            5 => {
                let v = b.get(..4)?.try_into().ok()?;
                b = &b[4..];
                Field::Fixed32(v)
            }
            _ => return None,
        };
        out.push((k >> 3, f));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_events_round_trip() {
        // The CRC-32C check value of "123456789" is 0xE3069283.
        let unmasked = |d: &[u8]| masked_crc(d).wrapping_sub(0xa282_ead8).rotate_left(15);
        assert_eq!(unmasked(b"123456789"), 0xE306_9283);
        let dir = std::env::temp_dir().join(format!("pith-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut ev = Events::create(&dir, 1.7e9).unwrap();
        ev.scalars(1, 1.7e9 + 1.0, &[("loss".into(), 5.5), ("aux.switch-aux".into(), 0.02)]).unwrap();
        ev.scalars(300, 1.7e9 + 2.0, &[("loss".into(), 1.0)]).unwrap();
        let path = ev.path.clone();
        drop(ev);
        let got = read_scalars(&path).unwrap();
        let want = [(1, "loss".to_string(), 5.5f32), (1, "aux.switch-aux".into(), 0.02), (300, "loss".into(), 1.0)];
        assert_eq!(got, want);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_scalars(&path).unwrap_err().contains("CRC mismatch"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

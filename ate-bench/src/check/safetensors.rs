//! A minimal safetensors reader: 8-byte little-endian header length, JSON header, data. Enough to
//! read routing traces (tensors) and checkpoints (names, shapes, optimizer state).

use std::collections::BTreeMap;
use std::path::Path;

type Header = serde_json::Map<String, serde_json::Value>;

/// A safetensors tensor: dtype, shape, raw little-endian bytes.
pub struct StTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl StTensor {
    pub fn i32s(&self) -> Vec<i32> {
        self.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
    pub fn f32s(&self) -> Vec<f32> {
        self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// The bytes of the file at `p`, its JSON header, and where the data starts.
fn open(p: &Path) -> Result<(Vec<u8>, Header, usize), String> {
    let err = |e: &str| format!("{}: {e}", p.display());
    let b = std::fs::read(p).map_err(|e| err(&e.to_string()))?;
    let n = u64::from_le_bytes(b.get(..8).ok_or_else(|| err("not a safetensors file"))?.try_into().unwrap()) as usize;
    let h: Header =
        serde_json::from_slice(b.get(8..8usize.saturating_add(n)).ok_or_else(|| err("header runs past the end"))?)
            .map_err(|e| err(&e.to_string()))?;
    Ok((b, h, 8 + n))
}

/// Every tensor of a safetensors file.
pub fn st_read(p: &Path) -> Result<BTreeMap<String, StTensor>, String> {
    let err = |e: &str| format!("{}: {e}", p.display());
    let (b, h, start) = open(p)?;
    let body = &b[start..];
    let mut out = BTreeMap::new();
    for (name, v) in h.iter().filter(|(k, _)| *k != "__metadata__") {
        let offs: Vec<usize> =
            v["data_offsets"].as_array().into_iter().flatten().filter_map(|x| x.as_u64()).map(|x| x as usize).collect();
        let shape = shape(v);
        let data = match offs[..] {
            [a, z] if a <= z => body.get(a..z).ok_or_else(|| err(&format!("`{name}` runs past the end")))?.to_vec(),
            _ => return Err(err(&format!("`{name}` has bad data_offsets"))),
        };
        out.insert(name.clone(), StTensor { dtype: v["dtype"].as_str().unwrap_or("").to_string(), shape, data });
    }
    Ok(out)
}

/// Tensor names and shapes in a safetensors file (its header only; the data is not checked).
pub fn st_shapes(p: &Path) -> Result<BTreeMap<String, Vec<usize>>, String> {
    let (_, h, _) = open(p)?;
    Ok(h.iter().filter(|(k, _)| *k != "__metadata__").map(|(k, v)| (k.clone(), shape(v))).collect())
}

fn shape(v: &serde_json::Value) -> Vec<usize> {
    v["shape"].as_array().into_iter().flatten().filter_map(|x| x.as_u64()).map(|x| x as usize).collect()
}

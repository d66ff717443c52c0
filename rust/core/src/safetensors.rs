//! Reading safetensors headers (never tensor data): one file, or every shard of an index.
//!
//! A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
//! (`{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data. Everything is checked before it is trusted: the header bound, the JSON shape, dtype
//! names, offsets inside the data and not overlapping, sizes matching shapes, shards of an index present.

use crate::error::{PlacementError, Result};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest header accepted (the safetensors format's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Byte offsets within the file's data section.
    pub begin: u64,
    pub end: u64,
    /// Index into the list of files read.
    pub file: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Bits per element of a safetensors dtype name, as sized in memory once loaded (`BOOL`: 1 bit, as
/// accelerate counts torch.bool), or `None` for an unknown name.
pub fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" => 1,
        "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Bytes per element as stored on disk.
fn stored_bytes(dtype: &str) -> u64 {
    if dtype == "BOOL" {
        1
    } else {
        dtype_bits(dtype).unwrap_or(8) / 8
    }
}

pub fn is_floating(dtype: &str) -> bool {
    dtype.starts_with('F') || dtype == "BF16" || dtype == "C64"
}

fn bad(path: &Path, reason: impl Into<String>) -> PlacementError {
    PlacementError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Read and validate the header of one safetensors file.
pub fn read_header(path: &Path, file: usize) -> Result<Vec<TensorEntry>> {
    let mut handle = File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let length = handle
        .metadata()
        .map_err(|e| bad(path, format!("cannot stat: {e}")))?
        .len();
    if length < 8 {
        return Err(bad(
            path,
            format!("truncated: {length} bytes, fewer than the 8-byte header length"),
        ));
    }
    let mut prefix = [0u8; 8];
    handle
        .read_exact(&mut prefix)
        .map_err(|e| bad(path, format!("cannot read: {e}")))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"),
        ));
    }
    if 8 + header_len > length {
        return Err(bad(
            path,
            format!("header length {header_len} is larger than the file ({length} bytes)"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    handle
        .read_exact(&mut header)
        .map_err(|e| bad(path, format!("cannot read the header: {e}")))?;
    let json: Value = serde_json::from_slice(&header).map_err(|e| bad(path, format!("malformed JSON header: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| bad(path, "the header is not a JSON object"))?;
    let data_len = length - 8 - header_len;
    let mut entries = Vec::with_capacity(object.len());
    for (name, value) in object {
        if name == "__metadata__" {
            if !value.as_object().is_some_and(|m| m.values().all(Value::is_string)) {
                return Err(bad(path, "__metadata__ must map strings to strings"));
            }
            continue;
        }
        entries.push(parse_entry(path, file, name, value, data_len)?);
    }
    let mut by_offset: Vec<&TensorEntry> = entries.iter().collect();
    by_offset.sort_by_key(|e| (e.begin, e.end));
    for pair in by_offset.windows(2) {
        if pair[1].begin < pair[0].end {
            return Err(bad(
                path,
                format!("tensors {:?} and {:?} overlap", pair[0].name, pair[1].name),
            ));
        }
    }
    Ok(entries)
}

fn parse_entry(path: &Path, file: usize, name: &str, value: &Value, data_len: u64) -> Result<TensorEntry> {
    let field = |key: &str| {
        value
            .get(key)
            .ok_or_else(|| bad(path, format!("tensor {name:?} has no {key:?}")))
    };
    let dtype = field("dtype")?
        .as_str()
        .ok_or_else(|| bad(path, format!("tensor {name:?}: dtype is not a string")))?;
    if dtype_bits(dtype).is_none() {
        return Err(bad(path, format!("tensor {name:?} has unknown dtype {dtype:?}")));
    }
    let ints = |key: &str| -> Result<Vec<u64>> {
        field(key)?
            .as_array()
            .ok_or_else(|| bad(path, format!("tensor {name:?}: {key} is not a list")))?
            .iter()
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| bad(path, format!("tensor {name:?}: {key} holds a non-integer")))
            })
            .collect()
    };
    let shape = ints("shape")?;
    let offsets = ints("data_offsets")?;
    let [begin, end] = offsets[..] else {
        return Err(bad(path, format!("tensor {name:?}: data_offsets must be [begin, end]")));
    };
    if begin > end || end > data_len {
        return Err(bad(
            path,
            format!("tensor {name:?}: data_offsets [{begin}, {end}] out of range (data is {data_len} bytes)"),
        ));
    }
    let numel = shape.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
    let expected = numel.and_then(|n| n.checked_mul(stored_bytes(dtype)));
    if expected != Some(end - begin) {
        return Err(bad(
            path,
            format!(
                "tensor {name:?}: shape {shape:?} of {dtype} does not match its {} bytes",
                end - begin
            ),
        ));
    }
    Ok(TensorEntry {
        name: name.to_string(),
        dtype: dtype.to_string(),
        shape,
        begin,
        end,
        file,
    })
}

/// An index's tensor name -> shard file name.
pub type WeightMap = BTreeMap<String, String>;

/// The checkpoint files to read for `path`: a `.safetensors` file, a `model.safetensors.index.json`,
/// or a folder holding either. Returns the shard paths and, for an index, its tensor -> shard map.
pub fn resolve(path: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
    if path.is_dir() {
        let index = path.join("model.safetensors.index.json");
        if index.exists() {
            return resolve(&index);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| bad(path, format!("cannot list: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(bad(
                path,
                "no .safetensors file or model.safetensors.index.json in this folder",
            ));
        }
        return Ok((files, None));
    }
    if path.extension().is_some_and(|x| x == "json") {
        let text = std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| bad(path, format!("malformed index JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(path, "the index has no \"weight_map\" object"))?;
        let folder = path.parent().unwrap_or(Path::new("."));
        let mut weight_map = BTreeMap::new();
        let mut shards: Vec<String> = Vec::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(path, format!("weight_map[{tensor:?}] is not a file name")))?;
            if !shards.iter().any(|s| s == shard) {
                shards.push(shard.to_string());
            }
            weight_map.insert(tensor.clone(), shard.to_string());
        }
        shards.sort();
        let mut files = Vec::with_capacity(shards.len());
        for shard in &shards {
            let file = folder.join(shard);
            if !file.is_file() {
                return Err(bad(path, format!("shard {shard:?} listed in the index is missing")));
            }
            files.push(file);
        }
        return Ok((files, Some(weight_map)));
    }
    if !path.is_file() {
        return Err(bad(path, "no such file or folder"));
    }
    Ok((vec![path.to_path_buf()], None))
}

/// Every tensor of a checkpoint (headers only), checked against the index when there is one.
pub fn read_checkpoint(path: &Path) -> Result<Vec<TensorEntry>> {
    let (files, weight_map) = resolve(path)?;
    let mut entries = Vec::new();
    for (i, file) in files.iter().enumerate() {
        entries.extend(read_header(file, i)?);
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    for e in &entries {
        if let Some(other) = seen.insert(&e.name, e.file) {
            return Err(bad(
                path,
                format!(
                    "tensor {:?} is stored twice ({} and {})",
                    e.name,
                    files[other].display(),
                    files[e.file].display()
                ),
            ));
        }
    }
    if let Some(map) = weight_map {
        for (tensor, shard) in &map {
            match seen.get(tensor.as_str()) {
                Some(&f) if files[f].file_name().is_some_and(|n| n == shard.as_str()) => {}
                _ => {
                    return Err(bad(
                        path,
                        format!("tensor {tensor:?} listed in the index is not in shard {shard:?}"),
                    ))
                }
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, header: &str, data: usize) -> PathBuf {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&vec![0u8; data]).unwrap();
        path
    }

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("devicemap-st-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_valid_headers_and_rejects_each_fault() {
        let dir = temp("faults");
        let ok = r#"{"a.w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}"#;
        let entries = read_header(&write(&dir, "ok.safetensors", ok, 16), 0).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].numel(), 4);
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#,
                8,
                "out of range",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#,
                16,
                "does not match",
            ),
            (
                r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
                1,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "overlap",
            ),
            (r#"{"a": 3"#, 4, "malformed JSON"),
            (r#"[1, 2]"#, 0, "not a JSON object"),
        ];
        for (i, (header, data, message)) in cases.iter().enumerate() {
            let err = read_header(&write(&dir, &format!("bad{i}.safetensors"), header, *data), 0).unwrap_err();
            assert!(err.to_string().contains(message), "{err}");
        }
        let truncated = dir.join("short.safetensors");
        std::fs::write(&truncated, [1u8, 2, 3]).unwrap();
        assert!(read_header(&truncated, 0)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let huge = dir.join("huge.safetensors");
        std::fs::write(&huge, 1_000u64.to_le_bytes()).unwrap();
        assert!(read_header(&huge, 0)
            .unwrap_err()
            .to_string()
            .contains("larger than the file"));
    }
}

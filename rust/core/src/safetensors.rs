//! Reading safetensors headers (never tensor data): one file, or every shard of an index.
//!
//! A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
//! (`{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data. A header is accepted exactly when the safetensors library would load the file:
//! the header within its bound, the JSON of that shape, known dtypes, sizes matching shapes, and the
//! tensors tiling the data section with no gap, no overlap and nothing after the last one. Index
//! shards must lie inside the index's folder (subfolders allowed) and hold what the index says.

use crate::error::{PlacementError, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Largest header accepted (the safetensors format's own limit).
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Its full dotted name.
    pub name: String,
    /// The safetensors dtype ("BF16", "F32", "BOOL", ...).
    pub dtype: String,
    /// Its shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Byte offset of its first byte within the file's data section.
    pub begin: u64,
    /// Byte offset just past its last byte.
    pub end: u64,
    /// Index into the checkpoint's `files`.
    pub file: usize,
}

impl TensorEntry {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Every tensor of a checkpoint (headers only) and the files they were read from.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// What was asked for: a file, an index or a folder (named by errors about the whole checkpoint).
    pub path: PathBuf,
    /// The safetensors files read, in index order.
    pub files: Vec<PathBuf>,
    /// Every tensor, in file then header order.
    pub entries: Vec<TensorEntry>,
}

impl Checkpoint {
    /// The file holding `entry` (for error messages).
    pub fn file_of(&self, entry: &TensorEntry) -> &Path {
        self.files.get(entry.file).map_or(&self.path, PathBuf::as_path)
    }
}

/// Bits per element of a safetensors dtype name, as sized in memory once loaded (`BOOL`: 1 bit, as
/// accelerate counts torch.bool), or `None` for a name torch cannot load.
pub(crate) fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" => 1,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        // the FNUZ float8 variants (no negative zero; AMD's) load as torch.float8_e4m3fnuz / e5m2fnuz
        "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Bits per element as stored on disk (a bool takes a byte there).
fn stored_bits(dtype: &str) -> u64 {
    if dtype == "BOOL" {
        8
    } else {
        dtype_bits(dtype).unwrap_or(8)
    }
}

/// A floating-point or complex dtype (the ones a load dtype converts).
pub(crate) fn is_floating(dtype: &str) -> bool {
    dtype.starts_with('F') || dtype == "BF16" || dtype == "C64"
}

fn bad(path: &Path, reason: impl Into<String>) -> PlacementError {
    PlacementError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Read and validate the header of one safetensors file.
pub(crate) fn read_header(path: &Path, file: usize) -> Result<Vec<TensorEntry>> {
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
    if header_len == 0 {
        return Err(bad(
            path,
            "the header length is 0; a safetensors header is a JSON object, at least \"{}\"",
        ));
    }
    if header_len > MAX_HEADER_BYTES {
        // The number is not echoed: it is eight bytes of a file that may not be a checkpoint at all.
        return Err(bad(
            path,
            format!("the header length exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)"),
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
    if let Err(e) = std::str::from_utf8(&header) {
        return Err(bad(
            path,
            format!("the header is not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
        ));
    }
    let json: Value = serde_json::from_slice(&header).map_err(|e| bad(path, format!("malformed JSON header: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| bad(path, "the header is not a JSON object"))?;
    check_duplicate_keys(path, &header, object)?;
    let data_len = length - 8 - header_len;
    let mut entries = Vec::with_capacity(object.len());
    for (name, value) in object {
        if name == "__metadata__" {
            // safetensors reads it as an optional string -> string map: null is "no metadata".
            let ok = value.is_null() || value.as_object().is_some_and(|m| m.values().all(Value::is_string));
            if !ok {
                return Err(bad(path, "__metadata__ must map strings to strings"));
            }
            continue;
        }
        entries.push(parse_entry(path, file, name, value, data_len)?);
    }
    check_tiling(path, &entries, data_len)?;
    Ok(entries)
}

/// The tensors must cover the data section exactly, in offset order, as safetensors requires before
/// it loads anything: a gap, an overlap or bytes after the last tensor make the file unloadable.
fn check_tiling(path: &Path, entries: &[TensorEntry], data_len: u64) -> Result<()> {
    let mut by_offset: Vec<&TensorEntry> = entries.iter().collect();
    by_offset.sort_by_key(|e| (e.begin, e.end));
    let mut covered = 0u64;
    let mut previous: Option<&TensorEntry> = None;
    for e in by_offset {
        if e.begin < covered {
            let other = previous.map_or(String::new(), |p| format!("{:?}", p.name));
            return Err(bad(path, format!("tensors {other} and {:?} overlap", e.name)));
        }
        if e.begin > covered {
            let after = previous.map_or("the start of the data".to_string(), |p| format!("tensor {:?}", p.name));
            return Err(bad(
                path,
                format!(
                    "{} unused bytes (a gap) between {after} and tensor {:?} (data_offsets [{}, {}]); \
                     safetensors refuses files whose tensors do not cover the data section exactly",
                    e.begin - covered,
                    e.name,
                    e.begin,
                    e.end
                ),
            ));
        }
        covered = e.end;
        previous = Some(e);
    }
    if covered != data_len {
        let after = previous.map_or("the header (no tensor)".to_string(), |p| format!("tensor {:?}", p.name));
        return Err(bad(
            path,
            format!(
                "{} bytes of data after {after} belong to no tensor; safetensors refuses files whose \
                 tensors do not cover the data section exactly (a truncated header or an appended file?)",
                data_len - covered
            ),
        ));
    }
    Ok(())
}

/// serde_json keeps the last of repeated keys. safetensors does the same for tensors (so an
/// identical repeat loads) but refuses a repeated `__metadata__`; a tensor listed twice with
/// different entries is ambiguous and refused here.
fn check_duplicate_keys(path: &Path, header: &[u8], object: &Map<String, Value>) -> Result<()> {
    let members = raw_members(header);
    if members.len() == object.len() {
        return Ok(());
    }
    let mut first: HashMap<String, Value> = HashMap::with_capacity(members.len());
    for (raw_key, raw_value) in members {
        // Both slices come from JSON serde_json has just accepted, so they parse.
        let key: String = serde_json::from_slice(raw_key).unwrap_or_default();
        let value: Value = serde_json::from_slice(raw_value).unwrap_or(Value::Null);
        match first.get(&key) {
            None => {
                first.insert(key, value);
            }
            Some(_) if key == "__metadata__" => {
                return Err(bad(path, "the header has two \"__metadata__\" entries"));
            }
            Some(earlier) if *earlier != value => {
                return Err(bad(
                    path,
                    format!("tensor {key:?} is listed twice in the header, with different entries"),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The members of a JSON object as raw (key, value) byte slices, repeated keys kept. Only called on
/// text serde_json has accepted as an object, so tracking strings and nesting is enough.
fn raw_members(json: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut members = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let (mut key_start, mut key, mut value_start) = (0usize, None::<&[u8]>, 0usize);
    for (i, &byte) in json.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
                if depth == 1 && key.is_none() {
                    key = Some(&json[key_start..=i]);
                }
            }
            continue;
        }
        match byte {
            b'"' => {
                in_string = true;
                key_start = i;
            }
            b':' if depth == 1 => value_start = i + 1,
            b'{' | b'[' => depth += 1,
            b',' | b'}' | b']' => {
                if depth == 1 && byte != b']' {
                    if let Some(k) = key.take() {
                        members.push((k, json[value_start..i].trim_ascii()));
                    }
                }
                if byte != b',' {
                    depth = depth.saturating_sub(1);
                }
            }
            _ => {}
        }
    }
    members
}

fn parse_entry(path: &Path, file: usize, name: &str, value: &Value, data_len: u64) -> Result<TensorEntry> {
    if !value.is_object() {
        return Err(bad(
            path,
            format!("tensor {name:?}: its entry is not an object with dtype, shape and data_offsets"),
        ));
    }
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
                v.as_u64().ok_or_else(|| {
                    bad(
                        path,
                        format!("tensor {name:?}: {key} holds {v}, not a non-negative integer"),
                    )
                })
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
    let bits = shape
        .iter()
        .try_fold(1u64, |a, d| a.checked_mul(*d))
        .and_then(|n| n.checked_mul(stored_bits(dtype)));
    let Some(bits) = bits else {
        return Err(bad(
            path,
            format!("tensor {name:?}: shape {shape:?} has more elements than 64 bits can count"),
        ));
    };
    if bits % 8 != 0 {
        return Err(bad(
            path,
            format!("tensor {name:?}: shape {shape:?} of {dtype} does not fill a whole number of bytes"),
        ));
    }
    if bits / 8 != end - begin {
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

/// An index's tensor name -> position of its shard in the list of files read.
pub(crate) type WeightMap = BTreeMap<String, usize>;

/// The checkpoint files to read for `path` (a `.safetensors` file, a `model.safetensors.index.json`,
/// or a folder holding either) and, for an index, which of them holds each tensor.
pub(crate) fn resolve(path: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
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
        return resolve_index(path);
    }
    if !path.is_file() {
        return Err(bad(path, "no such file or folder"));
    }
    Ok((vec![path.to_path_buf()], None))
}

fn resolve_index(path: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>)> {
    let text = std::fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    let json: Value = serde_json::from_slice(&text).map_err(|e| bad(path, format!("malformed index JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(path, "the index has no \"weight_map\" object"))?;
    let folder = path.parent().unwrap_or(Path::new("."));
    // Shards by their path inside the folder, so "a.safetensors" and "./a.safetensors" are one file.
    let mut shards: BTreeMap<PathBuf, &str> = BTreeMap::new();
    let mut shard_of: Vec<(&String, PathBuf)> = Vec::with_capacity(map.len());
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(path, format!("weight_map[{tensor:?}] is not a file name")))?;
        let inside = shard_inside_folder(path, tensor, shard)?;
        shards.entry(inside.clone()).or_insert(shard);
        shard_of.push((tensor, inside));
    }
    let mut files = Vec::with_capacity(shards.len());
    let mut position: HashMap<&Path, usize> = HashMap::with_capacity(shards.len());
    for (inside, shard) in &shards {
        let file = folder.join(inside);
        if !file.is_file() {
            return Err(bad(path, format!("shard {shard:?} listed in the index is missing")));
        }
        position.insert(inside.as_path(), files.len());
        files.push(file);
    }
    let weight_map = shard_of
        .iter()
        .map(|(tensor, inside)| ((*tensor).clone(), position[inside.as_path()]))
        .collect();
    Ok((files, Some(weight_map)))
}

/// A shard name from an index as a path inside the index's folder. Subfolders are fine (transformers
/// loads them); an absolute path or `..` leaving the folder is refused before anything is opened, so
/// an index cannot make devicemap read, or report on, files outside the checkpoint. (Symbolic links
/// inside the folder are followed, as the Hugging Face cache is built of them.)
fn shard_inside_folder(index: &Path, tensor: &str, shard: &str) -> Result<PathBuf> {
    let refuse = |why: &str| {
        bad(
            index,
            format!(
                "weight_map[{tensor:?}] = {shard:?} {why}; shard names must be relative paths inside the \
                 index's folder, e.g. \"model-00001-of-00002.safetensors\""
            ),
        )
    };
    let mut inside = PathBuf::new();
    for part in Path::new(shard).components() {
        match part {
            Component::Normal(name) => inside.push(name),
            Component::CurDir => {}
            Component::ParentDir => {
                if !inside.pop() {
                    return Err(refuse("leaves the checkpoint folder"));
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(refuse("is an absolute path")),
        }
    }
    if inside.as_os_str().is_empty() {
        return Err(refuse("names no file"));
    }
    Ok(inside)
}

/// Every tensor of a checkpoint (headers only), checked against the index when there is one. The
/// one reader behind both planning and loading, so both accept the same files.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
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
        for (tensor, &shard) in &map {
            if seen.get(tensor.as_str()) != Some(&shard) {
                return Err(bad(
                    path,
                    format!(
                        "tensor {tensor:?} listed in the index is not in shard {:?}",
                        files[shard].display()
                    ),
                ));
            }
        }
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        files,
        entries,
    })
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
    fn reads_every_dtype_safetensors_writes() {
        // safetensors' own dtype list: each is sized, none is "unknown dtype"
        let dir = temp("dtypes");
        for (dtype, bits) in [
            ("F8_E4M3FNUZ", 8),
            ("F8_E5M2FNUZ", 8),
            ("F8_E8M0", 8),
            ("F6_E2M3", 6),
            ("F6_E3M2", 6),
            ("F4", 4),
            ("BOOL", 1),
            ("C64", 64),
        ] {
            let bytes = if dtype == "BOOL" { 8 } else { 8 * bits / 8 };
            let header = format!(r#"{{"a.w":{{"dtype":"{dtype}","shape":[8],"data_offsets":[0,{bytes}]}}}}"#);
            let file = write(&dir, &format!("{dtype}.safetensors"), &header, bytes);
            let entries = read_header(&file, 0).unwrap_or_else(|e| panic!("{dtype}: {e}"));
            assert_eq!(dtype_bits(&entries[0].dtype), Some(bits as u64), "{dtype}");
        }
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
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                12,
                "4 unused bytes (a gap) between tensor \"a\" and tensor \"b\"",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                6,
                "2 bytes of data after tensor \"a\"",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "listed twice",
            ),
            (r#"{"__metadata__":{},"__metadata__":{}}"#, 0, "two \"__metadata__\""),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[-1,4]}}"#,
                4,
                "holds -1",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}"#,
                0,
                "more elements than 64 bits",
            ),
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
        // Repeats serde_json would merge: identical ones load in safetensors, so they are accepted.
        let same = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":null}"#;
        assert_eq!(
            read_header(&write(&dir, "same.safetensors", same, 4), 0).unwrap().len(),
            1
        );
        let empty = write(&dir, "empty.safetensors", "", 0);
        assert!(read_header(&empty, 0).unwrap_err().to_string().contains("length is 0"));
        let huge = dir.join("huge.safetensors");
        std::fs::write(&huge, 1_000u64.to_le_bytes()).unwrap();
        assert!(read_header(&huge, 0)
            .unwrap_err()
            .to_string()
            .contains("larger than the file"));
    }

    #[test]
    fn members_keep_repeats_and_skip_nested_and_quoted_structure() {
        let json = br#"{"a": {"x": [1, {"y": "}"}]}, "b\"c": "d,e", "a": 2}"#;
        let members: Vec<(String, String)> = raw_members(json)
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(k).into(), String::from_utf8_lossy(v).into()))
            .collect();
        assert_eq!(members.len(), 3);
        assert_eq!(members[0].0, "\"a\"");
        assert_eq!(members[0].1, r#"{"x": [1, {"y": "}"}]}"#);
        assert_eq!(members[1], (r#""b\"c""#.to_string(), r#""d,e""#.to_string()));
        assert_eq!(members[2], ("\"a\"".to_string(), "2".to_string()));
    }

    #[test]
    fn index_shards_stay_inside_the_folder_and_may_be_in_subfolders() {
        let dir = temp("index");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        write(&dir.join("sub"), "part.safetensors", header, 4);
        let index = dir.join("model.safetensors.index.json");
        let refused = [
            ("/etc/passwd", "is an absolute path"),
            ("../part.safetensors", "leaves the checkpoint folder"),
            ("sub/../../part.safetensors", "leaves the checkpoint folder"),
            ("", "names no file"),
        ];
        for (shard, why) in refused {
            std::fs::write(&index, format!(r#"{{"weight_map": {{"w": {shard:?}}}}}"#)).unwrap();
            let err = read_checkpoint(&dir).unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("model.safetensors.index.json"),
                "{err}"
            );
        }
        for shard in ["sub/part.safetensors", "./sub/x/../part.safetensors"] {
            std::fs::write(&index, format!(r#"{{"weight_map": {{"w": {shard:?}}}}}"#)).unwrap();
            let checkpoint = read_checkpoint(&dir).unwrap();
            assert_eq!(checkpoint.files, vec![dir.join("sub/part.safetensors")]);
            assert_eq!(checkpoint.entries[0].name, "w");
        }
    }
}

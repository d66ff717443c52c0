//! Reading safetensors headers (never tensor data): one file, or every shard of an index.
//!
//! A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON
//! (`{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data. A header is accepted exactly when the safetensors library would load the file:
//! the header within its bound, the JSON of that shape, known dtypes, sizes matching shapes, and the
//! tensors tiling the data section with no gap, no overlap and nothing after the last one. Index
//! shards must lie inside the index's folder (subfolders allowed) and hold what the index says.

use crate::error::{PlacementError, Result};
use crate::header_json;
use foldhash::{HashMap as FoldMap, HashMapExt};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Bits per element of a safetensors dtype name, as held in memory once loaded (`BOOL`: the byte torch
/// stores per bool, as `devicemap.plan` sizes a module's), or `None` for a name torch cannot load.
pub(crate) fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" => 8,
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

/// Bits per element as stored on disk.
fn stored_bits(dtype: &str) -> u64 {
    dtype_bits(dtype).unwrap_or(8)
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

/// The largest index file read (`model.safetensors.index.json`): a million tensors take ~100 MB.
pub(crate) const MAX_INDEX_BYTES: u64 = 256_000_000;

/// What a path is, in words, when it is not a regular file (for "not a regular file" errors).
fn file_kind(metadata: &std::fs::Metadata) -> &'static str {
    let kind = metadata.file_type();
    if kind.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// Open a regular file (symlinks followed) for reading. Anything else is refused before it is opened:
/// opening a FIFO blocks until a writer comes, and a device can be read forever.
pub(crate) fn open_regular(path: &Path) -> Result<File> {
    let metadata = std::fs::metadata(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    if !metadata.is_file() {
        return Err(bad(
            path,
            format!(
                "is {}, not a regular file: pass a safetensors file, its index or their folder",
                file_kind(&metadata)
            ),
        ));
    }
    File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))
}

/// Whether `path` is a regular file (symlinks followed); `Err` names what else it is, `Ok(false)`: absent.
fn regular_or_absent(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(m) => Err(bad(path, format!("is {}, not a regular file", file_kind(&m)))),
        Err(_) => Ok(false),
    }
}

/// Read a whole file of at most `limit` bytes (a regular file: see [`open_regular`]).
fn read_bounded(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let handle = open_regular(path)?;
    let size = handle.metadata().map_or(0, |m| m.len());
    if size > limit {
        return Err(bad(
            path,
            format!("{what} is {size} bytes, above the {limit}-byte limit"),
        ));
    }
    let mut text = Vec::new();
    handle
        .take(limit + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(path, format!("cannot read: {e}")))?;
    if text.len() as u64 > limit {
        return Err(bad(path, format!("{what} is larger than the {limit}-byte limit")));
    }
    Ok(text)
}

/// Read and validate the header of one safetensors file.
pub(crate) fn read_header(path: &Path, file: usize) -> Result<Vec<TensorEntry>> {
    let mut handle = open_regular(path)?;
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
    let data_len = length - 8 - header_len;
    match typed_entries(path, file, &header, data_len) {
        Some(entries) => entries,
        None => reference_entries(path, file, &header, data_len),
    }
}

/// The fast path: a typed, borrowing parse of a well-formed header, then the same checks on each
/// tensor (in name order, as the reference reader meets them) and on the tiling. `None` when the
/// header is not plain enough for it: the reference reader then accepts it or names the fault.
fn typed_entries(path: &Path, file: usize, header: &[u8], data_len: u64) -> Option<Result<Vec<TensorEntry>>> {
    let text = std::str::from_utf8(header).ok()?;
    let mut tensors = header_json::parse_header(text)?;
    // The reference reader walks a name-ordered map; a repeated name is its to judge.
    tensors.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if tensors.windows(2).any(|pair| pair[0].0 == pair[1].0) {
        return None;
    }
    let entries = tensors
        .into_iter()
        .map(|(name, raw)| {
            let offsets = raw.data_offsets;
            checked_entry(path, file, &name.0, &raw.dtype.0, raw.shape, offsets, data_len)
        })
        .collect::<Result<Vec<_>>>()
        .and_then(|entries| check_tiling(path, &entries, data_len).map(|()| entries));
    Some(entries)
}

/// The reference reader: a generic JSON tree, every fault named. It decides every header the typed
/// path declines, so both accept exactly the same files.
fn reference_entries(path: &Path, file: usize, header: &[u8], data_len: u64) -> Result<Vec<TensorEntry>> {
    if let Err(e) = std::str::from_utf8(header) {
        return Err(bad(
            path,
            format!("the header is not UTF-8 (invalid byte at offset {})", e.valid_up_to()),
        ));
    }
    let json: Value = serde_json::from_slice(header).map_err(|e| bad(path, format!("malformed JSON header: {e}")))?;
    let object = json
        .as_object()
        .ok_or_else(|| bad(path, "the header is not a JSON object"))?;
    check_duplicate_keys(path, header, object)?;
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
    checked_entry(path, file, name, dtype, shape, [begin, end], data_len)
}

/// The checks on one tensor's fields once they have the right JSON types: a known dtype, offsets
/// inside the data section, and a byte size matching the shape.
fn checked_entry(
    path: &Path,
    file: usize,
    name: &str,
    dtype: &str,
    shape: Vec<u64>,
    [begin, end]: [u64; 2],
    data_len: u64,
) -> Result<TensorEntry> {
    if dtype_bits(dtype).is_none() {
        return Err(bad(path, format!("tensor {name:?} has unknown dtype {dtype:?}")));
    }
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

/// An index's (tensor name, position of its shard in the list of files read) pairs, names borrowed
/// from the index text. A name listed twice counts with its last shard, as in a JSON object.
pub(crate) type WeightMap<'a> = Vec<(Cow<'a, str>, usize)>;

/// The checkpoint files to read for `path` (a `.safetensors` file, a `model.safetensors.index.json`,
/// or a folder holding either) and, for an index, which of them holds each tensor. An index is read
/// into `index_text`, which the weight map borrows from.
pub(crate) fn resolve<'a>(path: &Path, index_text: &'a mut Vec<u8>) -> Result<(Vec<PathBuf>, Option<WeightMap<'a>>)> {
    if path.is_dir() {
        let index = path.join("model.safetensors.index.json");
        if std::fs::symlink_metadata(&index).is_ok() {
            return resolve(&index, index_text);
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
        *index_text = read_bounded(path, MAX_INDEX_BYTES, "the index")?;
        let text: &'a [u8] = index_text;
        return match typed_index(path, text) {
            Some(resolved) => Ok(resolved),
            None => reference_index(path, text),
        };
    }
    if !regular_or_absent(path)? {
        return Err(bad(path, "no such file or folder"));
    }
    Ok((vec![path.to_path_buf()], None))
}

/// The fast path for an index: its weight map parsed typed and borrowed, each distinct shard name
/// checked once. `None` for anything out of the ordinary (bad JSON, a shard name refused or
/// missing): the reference reader names the fault.
fn typed_index<'a>(path: &Path, text: &'a [u8]) -> Option<(Vec<PathBuf>, Option<WeightMap<'a>>)> {
    let pairs = header_json::parse_index(std::str::from_utf8(text).ok()?)?;
    // Each distinct shard name once (tensors of one shard are usually listed together).
    let mut slot_of_name: HashMap<&str, usize> = HashMap::new();
    let mut inside: Vec<PathBuf> = Vec::new();
    let mut slots: Vec<usize> = Vec::with_capacity(pairs.len());
    let mut last: Option<(&str, usize)> = None;
    for (tensor, shard) in &pairs {
        let shard: &str = &shard.0;
        let slot = match last {
            Some((name, slot)) if name == shard => slot,
            _ => match slot_of_name.get(shard) {
                Some(&slot) => slot,
                None => {
                    inside.push(shard_inside_folder(path, &tensor.0, shard).ok()?);
                    slot_of_name.insert(shard, inside.len() - 1);
                    inside.len() - 1
                }
            },
        };
        last = Some((shard, slot));
        slots.push(slot);
    }
    // Files in path order, so "a.safetensors" and "./a.safetensors" are one file.
    let mut order: Vec<usize> = (0..inside.len()).collect();
    order.sort_by(|&x, &y| inside[x].cmp(&inside[y]));
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut position = vec![0usize; inside.len()];
    let mut files: Vec<PathBuf> = Vec::with_capacity(inside.len());
    for &slot in &order {
        if files.last().is_some_and(|f| *f == folder.join(&inside[slot])) {
            position[slot] = files.len() - 1;
            continue;
        }
        let file = folder.join(&inside[slot]);
        if !file.is_file() {
            return None;
        }
        position[slot] = files.len();
        files.push(file);
    }
    drop(slot_of_name);
    let weight_map = pairs
        .into_iter()
        .zip(slots)
        .map(|((tensor, _), slot)| (tensor.0, position[slot]))
        .collect();
    Some((files, Some(weight_map)))
}

/// The reference index reader: a generic JSON tree, every fault named.
fn reference_index<'a>(path: &Path, text: &[u8]) -> Result<(Vec<PathBuf>, Option<WeightMap<'a>>)> {
    let json: Value = serde_json::from_slice(text).map_err(|e| bad(path, format!("malformed index JSON: {e}")))?;
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
        if !regular_or_absent(&file)? {
            return Err(bad(path, format!("shard {shard:?} listed in the index is missing")));
        }
        position.insert(inside.as_path(), files.len());
        files.push(file);
    }
    let weight_map = shard_of
        .iter()
        .map(|(tensor, inside)| (Cow::Owned((*tensor).clone()), position[inside.as_path()]))
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
    let mut index_text = Vec::new();
    let (files, weight_map) = resolve(path, &mut index_text)?;
    let entries = read_headers(&files)?;
    let mut seen: FoldMap<&str, usize> = FoldMap::with_capacity(entries.len());
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
        check_index(path, &files, &map, &seen)?;
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        files,
        entries,
    })
}

/// Every tensor the index lists is in the shard it names. When one is not, the first such name (in
/// name order, a repeated name counting with its last shard) is reported.
fn check_index(path: &Path, files: &[PathBuf], map: &WeightMap<'_>, seen: &FoldMap<&str, usize>) -> Result<()> {
    if map.iter().all(|(tensor, shard)| seen.get(&**tensor) == Some(shard)) {
        return Ok(());
    }
    let last_wins: BTreeMap<&str, usize> = map.iter().map(|(tensor, shard)| (&**tensor, *shard)).collect();
    for (tensor, &shard) in &last_wins {
        if seen.get(tensor) != Some(&shard) {
            return Err(bad(
                path,
                format!(
                    "tensor {tensor:?} listed in the index is not in shard {:?}",
                    files[shard].display()
                ),
            ));
        }
    }
    Ok(())
}

/// The headers of every file, in file order. Files are read and parsed on up to one thread per core
/// (each header is independent); the first failing file in order is the one reported.
fn read_headers(files: &[PathBuf]) -> Result<Vec<TensorEntry>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(files.len());
    let mut per_file: Vec<Option<Result<Vec<TensorEntry>>>> = (0..files.len()).map(|_| None).collect();
    if workers <= 1 {
        for (i, file) in files.iter().enumerate() {
            per_file[i] = Some(read_header(file, i));
        }
    } else {
        let next = AtomicUsize::new(0);
        let work = || {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(file) = files.get(i) else { break done };
                done.push((i, read_header(file, i)));
            }
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers).map(|_| scope.spawn(work)).collect();
            for handle in handles {
                // A worker's panic is re-raised here, where the binding's guard catches it.
                let done = handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                for (i, result) in done {
                    per_file[i] = Some(result);
                }
            }
        });
    }
    let mut entries = Vec::new();
    for result in per_file {
        let file_entries = result.expect("every file is read by one worker")?;
        if entries.is_empty() {
            entries.reserve(file_entries.len() * files.len());
        }
        entries.extend(file_entries);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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
            ("BOOL", 8),
            ("C64", 64),
        ] {
            let bytes = 8 * bits / 8;
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
        // A plain header is decided by the typed path alone.
        assert!(matches!(typed_entries(Path::new("ok"), 0, ok.as_bytes(), 16), Some(Ok(e)) if e == entries));
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

    /// One header member as JSON text: mostly valid tensors, sometimes each kind of fault.
    fn member() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just("a".to_string()),
            Just("b.w".to_string()),
            Just("c\\\"q".to_string()),
            Just("\\u0064".to_string()),
            Just("__metadata__".to_string()),
        ];
        let dtype = prop_oneof![
            Just("\"F32\""),
            Just("\"U8\""),
            Just("\"BOOL\""),
            Just("\"Q7\""),
            Just("3")
        ];
        let int = prop_oneof![4 => (0u64..6).prop_map(|n| n.to_string()), 1 => Just("-1".to_string()), 1 => Just("2.0".to_string())];
        let ints = proptest::collection::vec(int, 0..3).prop_map(|v| format!("[{}]", v.join(",")));
        let metadata = prop_oneof![Just("null"), Just("{\"k\":\"v\"}"), Just("{\"k\":1}"), Just("[]")];
        (name, dtype, ints.clone(), ints, metadata, 0u8..8).prop_map(|(name, dtype, shape, offsets, metadata, form)| {
            let value = match (name.as_str(), form) {
                ("__metadata__", _) => metadata.to_string(),
                (_, 0) => "7".to_string(),
                (_, 1) => format!("{{\"dtype\":{dtype},\"shape\":{shape}}}"),
                (_, 2) => format!("{{\"shape\":{shape},\"data_offsets\":{offsets},\"dtype\":{dtype},\"x\":[{{}}]}}"),
                _ => format!("{{\"dtype\":{dtype},\"shape\":{shape},\"data_offsets\":{offsets}}}"),
            };
            format!("\"{name}\":{value}")
        })
    }

    proptest::proptest! {
        /// The typed path never accepts what the reference reader refuses, and gives the same tensors or
        /// the same error whenever it decides.
        #[test]
        fn typed_path_agrees_with_the_reference_reader(
            members in proptest::collection::vec(member(), 0..5),
            data_len in 0u64..24,
        ) {
            let header = format!("{{{}}}", members.join(","));
            let path = Path::new("x.safetensors");
            let reference = reference_entries(path, 0, header.as_bytes(), data_len).map_err(|e| e.to_string());
            if let Some(typed) = typed_entries(path, 0, header.as_bytes(), data_len) {
                proptest::prop_assert_eq!(typed.map_err(|e| e.to_string()), reference, "{}", header);
            }
        }
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

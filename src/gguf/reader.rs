//! The GGUF reader: one pass over the header that validates everything, then zero-copy access.
//!
//! All validation happens in [`GgufFile::open`] / [`GgufFile::from_bytes`]: once a file is open,
//! looking up metadata and slicing tensor data cannot fail (beyond a key being absent). Every
//! count read from the file is checked against the bytes that remain before it is used, vectors
//! sized from such counts start small and grow only as elements are actually read, so a hostile
//! header cannot make the reader allocate more than the file's size justifies; every read is
//! bounds-checked, so truncation anywhere is an error, not a panic.
//!
//! Layout (v2 and v3; all little-endian):
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv x (key: string, type: u32, value)
//! n_tensors x (name: string, n_dims: u32, ne: u64 x n_dims, type: u32, offset: u64)
//! padding to general.alignment (default 32) | tensor data (offsets relative to here)
//! ```
//! A string is a u64 byte length then UTF-8 bytes; an array is an element type (u32), a count
//! (u64) and the elements. docs/gguf.md lists every check and why.

use super::GgmlType;
use super::error::{GgufError, GgufErrorKind as K};
use super::value::{Array, Value, ValueType};
use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// The GGUF magic, "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// The longest key (and tensor name) the GGUF spec allows.
pub const MAX_KEY_LEN: u64 = 65535;
/// Where the header's tensor count is.
const N_TENSORS_OFFSET: u64 = 8;
/// Vectors sized from a count in the file start with at most this many slots and grow as the
/// elements are actually read: a hostile count is disproved before it costs memory.
const PREALLOC_MAX: u64 = 256;

/// One tensor of the file: its name, shape, type and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `ne[0]` is the contiguous (row) dimension. A matrix with
    /// `ne = [k, n]` has `n` rows of `k` elements. Every dimension is at least 1 and their
    /// product fits in an i64 (checked at open).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (the product of the dimensions; checked not to overflow at open).
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.ne.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of all dimensions but the first).
    pub fn n_rows(&self) -> u64 {
        self.ne.iter().skip(1).product()
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    parsed: Parsed,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.parsed.version)
            .field("n_kv", &self.parsed.metadata.len())
            .field("n_tensors", &self.parsed.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let err = |e: std::io::Error| GgufError::new(path, K::Io(e));
        // Before opening: opening a fifo blocks until something writes to it.
        if !std::fs::metadata(path).map_err(err)?.is_file() {
            return Err(GgufError::new(path, K::NotAFile));
        }
        let file = std::fs::File::open(path).map_err(err)?;
        if !file.metadata().map_err(err)?.is_file() {
            return Err(GgufError::new(path, K::NotAFile));
        }
        // SAFETY: the map is read-only. Like every mmap-based model loader, we rely on the model
        // file not being truncated or rewritten by another process while it is open.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(err)?;
        Self::parse(path.to_path_buf(), Storage::Mmap(map))
    }

    /// Validates a GGUF image held in memory; `name` stands for the path in errors.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(name.into(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<GgufFile, GgufError> {
        match Parsed::parse(&storage) {
            Ok(parsed) => Ok(GgufFile {
                path,
                storage,
                parsed,
            }),
            Err(kind) => Err(GgufError { path, kind }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.parsed.version
    }

    /// Size of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        self.storage.len() as u64
    }

    pub fn alignment(&self) -> u64 {
        self.parsed.alignment
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.parsed.data_offset
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.parsed.metadata
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.parsed
            .key_index
            .get(key)
            .map(|&i| &self.parsed.metadata[i].1)
    }

    /// Where the entry of `key` starts in the file (for error messages).
    pub fn key_offset(&self, key: &str) -> Option<u64> {
        self.parsed
            .key_index
            .get(key)
            .map(|&i| self.parsed.kv_offsets[i])
    }

    /// All tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.parsed.tensors
    }

    /// The tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.parsed
            .tensor_index
            .get(name)
            .map(|&i| &self.parsed.tensors[i])
    }

    /// The bytes of a tensor of this file. Cannot fail for the file's own tensors: bounds were
    /// checked at open.
    ///
    /// # Panics
    /// If `t` is not one of this file's tensors and lies outside it.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.parsed.data_offset + t.offset) as usize;
        &self.storage[start..start + t.n_bytes as usize]
    }

    /// An error about this file, for callers that validate metadata on top of the reader.
    pub fn error(&self, kind: K) -> GgufError {
        GgufError::new(self.path.clone(), kind)
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// A required string.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.mistyped(key, "string", v))
    }

    /// A required non-negative integer (any integer type).
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.mistyped(key, "non-negative integer", v))
    }

    /// A required float (f32 or f64).
    pub fn require_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.mistyped(key, "float", v))
    }

    /// An optional non-negative integer: absent is `Ok(None)`, present with the wrong type is an
    /// error (a mistyped key is a broken file, not a missing option).
    pub fn optional_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.mistyped(key, "non-negative integer", v)),
        }
    }

    /// An optional float (f32 or f64); see [`Self::optional_u64`].
    pub fn optional_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.mistyped(key, "float", v)),
        }
    }

    /// An optional bool; see [`Self::optional_u64`].
    pub fn optional_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.mistyped(key, "bool", v)),
        }
    }

    /// An optional string; see [`Self::optional_u64`].
    pub fn optional_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.mistyped(key, "string", v)),
        }
    }

    /// An optional array; see [`Self::optional_u64`].
    pub fn optional_array(&self, key: &str) -> Result<Option<&Array>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.mistyped(key, "array", v)),
        }
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.get(key).ok_or_else(|| {
            self.error(K::MissingKey {
                key: key.to_string(),
            })
        })
    }

    /// The error for a key that is present with the wrong type.
    pub fn mistyped(&self, key: &str, expected: &'static str, found: &Value) -> GgufError {
        self.error(K::MistypedKey {
            offset: self.key_offset(key).unwrap_or(0),
            key: key.to_string(),
            expected,
            found: found.type_description(),
        })
    }

    /// The error for a key that is present with a well-typed but unusable value.
    pub fn invalid_value(
        &self,
        key: &str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> GgufError {
        self.error(K::InvalidValue {
            offset: self.key_offset(key).unwrap_or(0),
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        })
    }
}

/// The result of parsing, before it is tied to its storage.
struct Parsed {
    version: u32,
    metadata: Vec<(String, Value)>,
    /// Offset of each metadata entry (its key's length field), parallel to `metadata`.
    kv_offsets: Vec<u64>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], K> {
        if n > self.remaining() {
            return Err(K::Truncated {
                offset: self.offset(),
                what: what(),
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], K> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, K> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, K> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A count of items that each take at least `min_item_bytes`: it must fit in what remains.
    fn count(&mut self, min_item_bytes: u64, what: impl Fn() -> String) -> Result<u64, K> {
        let offset = self.offset();
        let n = self.u64(&what)?;
        let remaining = self.remaining();
        if n.checked_mul(min_item_bytes).is_none_or(|b| b > remaining) {
            return Err(K::ImplausibleCount {
                offset,
                what: what(),
                count: n,
                remaining,
            });
        }
        Ok(n)
    }

    /// A length-prefixed UTF-8 string of at most `max_len` bytes.
    fn string(&mut self, max_len: u64, what: impl Fn() -> String) -> Result<String, K> {
        let offset = self.offset();
        let len = self.u64(|| format!("the length of {}", what()))?;
        if len > max_len {
            return Err(K::TooLong {
                offset,
                what: what(),
                len,
                max: max_len,
            });
        }
        if len > self.remaining() {
            return Err(K::ImplausibleCount {
                offset,
                what: format!("the length of {}", what()),
                count: len,
                remaining: self.remaining(),
            });
        }
        let bytes = self.take(len, &what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(K::InvalidUtf8 {
                offset: offset + 8 + e.valid_up_to() as u64,
                what: what(),
            }),
        }
    }
}

/// Decodes little-endian scalars of `SIZE` bytes each from one bounds-checked slice.
fn decode_scalars<const SIZE: usize, T>(bytes: &[u8], f: impl Fn([u8; SIZE]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(SIZE)
        .map(|c| {
            let mut a = [0u8; SIZE];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

fn prealloc(n: u64) -> usize {
    n.min(PREALLOC_MAX) as usize
}

impl Parsed {
    fn parse(buf: &[u8]) -> Result<Parsed, K> {
        let mut c = Cursor { buf, pos: 0 };

        if buf.len() < GGUF_MAGIC.len() {
            if !GGUF_MAGIC.starts_with(buf) {
                return Err(K::BadMagic {
                    found: buf.to_vec(),
                });
            }
            return Err(K::Truncated {
                offset: 0,
                what: "the magic \"GGUF\"".into(),
                need: 4,
                have: buf.len() as u64,
            });
        }
        let magic = c.take(4, String::new)?;
        if magic != GGUF_MAGIC {
            return Err(K::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = c.u32(|| "the version".into())?;
        if version != 2 && version != 3 {
            let hint = if version == 1 {
                "; version 1 files predate 64-bit counts: convert them with a current llama.cpp"
            } else if matches!(version.swap_bytes(), 1..=3) {
                "; this looks like a big-endian file, and m40-llm reads little-endian files"
            } else {
                ""
            };
            return Err(K::UnsupportedVersion { version, hint });
        }

        // The tensor count is checked against the bytes left once the metadata is read (the
        // tensor infos follow it), so a file cut inside the metadata is reported there.
        let n_tensors = c.u64(|| "the tensor count".into())?;
        // Each key-value takes at least 8 (key length) + 4 (type) + 1 (smallest value). (Keys
        // cannot be empty, but counting them as such lets an empty key be reported as such.)
        let n_kv = c.count(13, || "the metadata key count".into())?;

        let mut metadata = Vec::with_capacity(prealloc(n_kv));
        let mut kv_offsets = Vec::with_capacity(prealloc(n_kv));
        let mut key_index = HashMap::with_capacity(prealloc(n_kv));
        for i in 0..n_kv {
            let key_offset = c.offset();
            let key = c.string(MAX_KEY_LEN, || format!("key #{i}"))?;
            if key.is_empty() {
                return Err(K::EmptyKey {
                    offset: key_offset,
                    index: i,
                });
            }
            if let Some(&first) = key_index.get(&key) {
                return Err(K::DuplicateKey {
                    offset: key_offset,
                    key,
                    first: kv_offsets[first],
                });
            }
            let value = read_value(&mut c, &key)?;
            key_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
            kv_offsets.push(key_offset);
        }

        let alignment = match key_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match &metadata[i].1 {
                Value::U32(a) => {
                    let a = u64::from(*a);
                    if a == 0 || !a.is_power_of_two() {
                        return Err(K::BadAlignment {
                            offset: kv_offsets[i],
                            alignment: a,
                        });
                    }
                    a
                }
                other => {
                    return Err(K::MistypedKey {
                        offset: kv_offsets[i],
                        key: "general.alignment".into(),
                        expected: "u32",
                        found: other.type_description(),
                    });
                }
            },
        };

        // Each tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        if n_tensors.checked_mul(24).is_none_or(|b| b > c.remaining()) {
            return Err(K::ImplausibleCount {
                offset: N_TENSORS_OFFSET,
                what: "the tensor count".into(),
                count: n_tensors,
                remaining: c.remaining(),
            });
        }
        let mut tensors = Vec::with_capacity(prealloc(n_tensors));
        let mut info_offsets = Vec::with_capacity(prealloc(n_tensors));
        let mut tensor_index = HashMap::with_capacity(prealloc(n_tensors));
        for i in 0..n_tensors {
            let info_offset = c.offset();
            let t = read_tensor_info(&mut c, i, alignment)?;
            if let Some(&first) = tensor_index.get(&t.name) {
                return Err(K::DuplicateTensor {
                    offset: info_offset,
                    tensor: t.name,
                    first: info_offsets[first],
                });
            }
            tensor_index.insert(t.name.clone(), tensors.len());
            tensors.push(t);
            info_offsets.push(info_offset);
        }

        // The data section starts at the next multiple of the alignment after the tensor infos;
        // every tensor's bytes must lie inside the file.
        let file_len = buf.len() as u64;
        let data_offset = c.offset().next_multiple_of(alignment);
        let mut ranges = Vec::with_capacity(tensors.len());
        for (t, &offset) in tensors.iter().zip(&info_offsets) {
            let start = data_offset.saturating_add(t.offset);
            let end = start.saturating_add(t.n_bytes);
            if end > file_len {
                return Err(K::TensorOutOfFile {
                    offset,
                    tensor: t.name.clone(),
                    start,
                    end,
                    file_len,
                });
            }
            ranges.push((start, end, t));
        }
        // No two tensors may share bytes: sorted by start, any overlap shows between neighbours.
        ranges.sort_by_key(|&(start, end, _)| (start, end));
        for pair in ranges.windows(2) {
            let ((a_start, a_end, a), (b_start, b_end, b)) = (pair[0], pair[1]);
            if a_end > b_start {
                return Err(K::OverlappingTensors {
                    first: a.name.clone(),
                    first_start: a_start,
                    first_end: a_end,
                    second: b.name.clone(),
                    second_start: b_start,
                    second_end: b_end,
                });
            }
        }

        Ok(Parsed {
            version,
            metadata,
            kv_offsets,
            key_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }
}

/// One tensor info: name, shape, type and data offset, each checked as it is read.
fn read_tensor_info(c: &mut Cursor<'_>, i: u64, alignment: u64) -> Result<TensorInfo, K> {
    let info_offset = c.offset();
    let name = c.string(MAX_KEY_LEN, || format!("the name of tensor #{i}"))?;
    let dims_offset = c.offset();
    let n_dims = c.u32(|| format!("the dimension count of tensor {name:?}"))?;
    if n_dims > MAX_DIMS {
        return Err(K::TooManyDims {
            offset: dims_offset,
            tensor: name,
            n_dims,
        });
    }
    let mut ne = Vec::with_capacity(n_dims as usize);
    let mut n_elements: u64 = 1;
    for d in 0..n_dims as usize {
        let offset = c.offset();
        let v = c.u64(|| format!("dimension {d} of tensor {name:?}"))?;
        let bad = |reason| K::BadDimension {
            offset,
            tensor: name.clone(),
            index: d,
            value: v,
            reason,
        };
        if v == 0 {
            return Err(bad("dimensions must be at least 1"));
        }
        if v > i64::MAX as u64 {
            return Err(bad("larger than ggml's signed 64-bit sizes"));
        }
        n_elements = n_elements
            .checked_mul(v)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| bad("the product of the dimensions overflows a signed 64-bit size"))?;
        ne.push(v);
    }
    let type_offset = c.offset();
    let type_id = c.u32(|| format!("the type of tensor {name:?}"))?;
    let ty = GgmlType::from_id(type_id).ok_or_else(|| K::UnknownTensorType {
        offset: type_offset,
        tensor: name.clone(),
        id: type_id,
    })?;
    let ne0 = ne.first().copied().unwrap_or(1);
    if ne0 % ty.block_size() != 0 {
        return Err(K::PartialBlock {
            offset: info_offset,
            tensor: name,
            ty,
            ne0,
            block: ty.block_size(),
        });
    }
    // Rows are whole blocks, so the element count is too.
    let Some(n_bytes) = (n_elements / ty.block_size()).checked_mul(ty.type_size()) else {
        return Err(K::BadDimension {
            offset: info_offset,
            tensor: name,
            index: 0,
            value: ne0,
            reason: "the tensor's size in bytes overflows",
        });
    };
    let data_offset_at = c.offset();
    let offset = c.u64(|| format!("the data offset of tensor {name:?}"))?;
    if offset % alignment != 0 {
        return Err(K::MisalignedTensor {
            offset: data_offset_at,
            tensor: name,
            data_offset: offset,
            alignment,
        });
    }
    Ok(TensorInfo {
        name,
        ne,
        ty,
        offset,
        n_bytes,
    })
}

fn read_value(c: &mut Cursor<'_>, key: &str) -> Result<Value, K> {
    let type_offset = c.offset();
    let type_id = c.u32(|| format!("the type of key {key:?}"))?;
    let ty = ValueType::from_id(type_id).ok_or_else(|| K::UnknownValueType {
        offset: type_offset,
        key: key.to_string(),
        id: type_id,
    })?;
    let what = || format!("the value of key {key:?}");
    let value_offset = c.offset();
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(what)?[0]),
        ValueType::I8 => Value::I8(c.array::<1>(what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(what)?)),
        ValueType::Bool => {
            let b = c.array::<1>(what)?[0];
            if b > 1 {
                return Err(K::InvalidValue {
                    offset: value_offset,
                    key: key.to_string(),
                    value: b.to_string(),
                    reason: "a bool must be 0 or 1".into(),
                });
            }
            Value::Bool(b == 1)
        }
        ValueType::String => Value::String(c.string(u64::MAX, what)?),
        ValueType::Array => Value::Array(read_array(c, key)?),
    })
}

fn read_array(c: &mut Cursor<'_>, key: &str) -> Result<Array, K> {
    let type_offset = c.offset();
    let type_id = c.u32(|| format!("the element type of array {key:?}"))?;
    let ty = ValueType::from_id(type_id).ok_or_else(|| K::UnknownValueType {
        offset: type_offset,
        key: key.to_string(),
        id: type_id,
    })?;
    if ty == ValueType::Array {
        return Err(K::NestedArray {
            offset: type_offset,
            key: key.to_string(),
        });
    }
    let n = c.count(ty.min_encoded_size(), || {
        format!("the element count of array {key:?}")
    })?;
    if ty == ValueType::String {
        let mut v = Vec::with_capacity(prealloc(n));
        for i in 0..n {
            v.push(c.string(u64::MAX, || format!("element {i} of array {key:?}"))?);
        }
        return Ok(Array::String(v));
    }
    // Scalars: one bounds check for the whole array (count() already proved it fits).
    let size = ty.scalar_size().unwrap_or(1);
    let elements_offset = c.offset();
    let bytes = c.take(n * size, || format!("the elements of array {key:?}"))?;
    Ok(match ty {
        ValueType::U8 => Array::U8(bytes.to_vec()),
        ValueType::I8 => Array::I8(bytes.iter().map(|&b| b as i8).collect()),
        ValueType::U16 => Array::U16(decode_scalars(bytes, u16::from_le_bytes)),
        ValueType::I16 => Array::I16(decode_scalars(bytes, i16::from_le_bytes)),
        ValueType::U32 => Array::U32(decode_scalars(bytes, u32::from_le_bytes)),
        ValueType::I32 => Array::I32(decode_scalars(bytes, i32::from_le_bytes)),
        ValueType::F32 => Array::F32(decode_scalars(bytes, f32::from_le_bytes)),
        ValueType::U64 => Array::U64(decode_scalars(bytes, u64::from_le_bytes)),
        ValueType::I64 => Array::I64(decode_scalars(bytes, i64::from_le_bytes)),
        ValueType::F64 => Array::F64(decode_scalars(bytes, f64::from_le_bytes)),
        ValueType::Bool => {
            if let Some(i) = bytes.iter().position(|&b| b > 1) {
                return Err(K::InvalidValue {
                    offset: elements_offset + i as u64,
                    key: key.to_string(),
                    value: bytes[i].to_string(),
                    reason: format!("element {i}: a bool must be 0 or 1"),
                });
            }
            Array::Bool(bytes.iter().map(|&b| b == 1).collect())
        }
        ValueType::String | ValueType::Array => unreachable!("handled above"),
    })
}

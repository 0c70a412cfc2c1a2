//! A small GGUF writer: builds tiny models and hostile files for tests, benches and tools, and
//! streams large files (`m40-llm synth`) without holding their data.
//!
//! The writer produces GGUF v3 with the tensors laid out in insertion order, each at an offset
//! aligned to `general.alignment` (32 unless set with [`GgufWriter::alignment`]).
//! [`GgufWriter::to_bytes`] builds the file in memory; [`GgufWriter::stream`] writes the same
//! header (every tensor's info and offset, known from the declared shapes and types) and then
//! takes the data piece by piece through [`GgufStreamWriter`].

use super::GgmlType;
use super::reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::value::{Array, Value};
use std::io::Write;
use std::path::Path;

/// Builds a GGUF file in memory.
#[derive(Default, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
    alignment: Option<u32>,
    version: Option<u32>,
}

#[derive(Clone)]
struct PendingTensor {
    name: String,
    ne: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets the GGUF version written in the header (3 by default; 2 has the same layout).
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// Sets `general.alignment` (written as a u32 key).
    pub fn alignment(mut self, alignment: u32) -> Self {
        self.alignment = Some(alignment);
        self.metadata
            .retain(|(k, _)| k.as_str() != "general.alignment");
        self.metadata
            .push(("general.alignment".into(), Value::U32(alignment)));
        self
    }

    /// Adds (or, for an existing key, replaces) a metadata value.
    pub fn kv(mut self, key: impl Into<String>, value: Value) -> Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    pub fn kv_str(self, key: impl Into<String>, s: impl Into<String>) -> Self {
        self.kv(key, Value::String(s.into()))
    }

    pub fn kv_u32(self, key: impl Into<String>, x: u32) -> Self {
        self.kv(key, Value::U32(x))
    }

    pub fn kv_f32(self, key: impl Into<String>, x: f32) -> Self {
        self.kv(key, Value::F32(x))
    }

    pub fn kv_strings<S: Into<String>>(
        self,
        key: impl Into<String>,
        items: impl IntoIterator<Item = S>,
    ) -> Self {
        let items = items.into_iter().map(Into::into).collect();
        self.kv(key, Value::Array(Array::String(items)))
    }

    /// Adds a tensor with `ne` in ggml order and `data` already encoded in `ty`'s layout.
    ///
    /// # Panics
    /// If `data` does not have the size `ty` and `ne` imply: this is a programming error in the
    /// test or tool that builds the file.
    pub fn tensor(
        mut self,
        name: impl Into<String>,
        ty: GgmlType,
        ne: &[u64],
        data: Vec<u8>,
    ) -> Self {
        let name = name.into();
        let rows: u64 = ne.iter().skip(1).product();
        let expected = ty
            .row_bytes(ne.first().copied().unwrap_or(1))
            .map(|r| r * rows);
        assert_eq!(
            expected,
            Some(data.len() as u64),
            "tensor {name}: {} bytes of data for {ty} {ne:?}",
            data.len()
        );
        self.tensors.push(PendingTensor {
            name,
            ne: ne.to_vec(),
            ty,
            data,
        });
        self
    }

    /// Adds an F32 tensor.
    pub fn tensor_f32(self, name: impl Into<String>, ne: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, GgmlType::F32, ne, data)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let layout: Vec<(&str, &[u64], GgmlType, u64)> = self
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.ne.as_slice(), t.ty, t.data.len() as u64))
            .collect();
        let (mut out, offsets) = self.header(&layout);
        if !self.tensors.is_empty() {
            let data_start = out.len() as u64;
            for (t, off) in self.tensors.iter().zip(offsets) {
                pad_to_len(&mut out, data_start + off);
                out.extend_from_slice(&t.data);
            }
            pad_to(&mut out, self.alignment_bytes());
        }
        out
    }

    fn alignment_bytes(&self) -> u64 {
        u64::from(self.alignment.unwrap_or(DEFAULT_ALIGNMENT as u32)).max(1)
    }

    /// The header of a file holding `tensors` (name, `ne`, type, data bytes), through the
    /// padding before the data, and each tensor's offset from the start of the data.
    fn header(&self, tensors: &[(&str, &[u64], GgmlType, u64)]) -> (Vec<u8>, Vec<u64>) {
        let alignment = self.alignment_bytes();
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.unwrap_or(3).to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(tensors.len());
        for (name, ne, ty, bytes) in tensors {
            write_string(&mut out, name);
            out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for d in *ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + bytes).next_multiple_of(alignment);
        }
        if !tensors.is_empty() {
            pad_to(&mut out, alignment);
        }
        (out, offsets)
    }

    /// Starts a file on `out` whose tensors are `tensors` (in this order), without holding
    /// their data: the header (this writer's metadata, every tensor's info and offset) is
    /// written at once, then the data is given piece by piece to
    /// [`GgufStreamWriter::write_data`]. Tensors added with [`GgufWriter::tensor`] are ignored.
    pub fn stream<W: Write>(
        &self,
        mut out: W,
        tensors: Vec<TensorDecl>,
    ) -> Result<GgufStreamWriter<W>, StreamError> {
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in &tensors {
            sizes.push(t.data_bytes().ok_or_else(|| StreamError::PartialBlock {
                tensor: t.name.clone(),
                ty: t.ty,
                ne: t.ne.clone(),
            })?);
        }
        let layout: Vec<(&str, &[u64], GgmlType, u64)> = tensors
            .iter()
            .zip(&sizes)
            .map(|(t, &b)| (t.name.as_str(), t.ne.as_slice(), t.ty, b))
            .collect();
        let (header, offsets) = self.header(&layout);
        out.write_all(&header)?;
        let data_start = header.len() as u64;
        let tensors = tensors
            .into_iter()
            .zip(sizes)
            .zip(offsets)
            .map(|((decl, bytes), offset)| Slot {
                decl,
                bytes,
                offset,
            })
            .collect();
        Ok(GgufStreamWriter {
            out,
            tensors,
            current: 0,
            filled: 0,
            pos: 0,
            data_start,
            alignment: self.alignment_bytes(),
        })
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&self.to_bytes())?;
        f.sync_all()
    }
}

/// A tensor of a streamed file, declared before its data: name, type and `ne` (ggml order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDecl {
    pub name: String,
    pub ty: GgmlType,
    pub ne: Vec<u64>,
}

impl TensorDecl {
    /// The size of the tensor's data, or `None` when its rows are not whole blocks of `ty`.
    pub fn data_bytes(&self) -> Option<u64> {
        let rows = self
            .ne
            .iter()
            .skip(1)
            .try_fold(1u64, |a, &d| a.checked_mul(d))?;
        self.ty
            .row_bytes(self.ne.first().copied().unwrap_or(1))?
            .checked_mul(rows)
    }
}

/// Why a streamed file cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("tensor {tensor:?}: rows of {ne:?} are not whole {ty} blocks")]
    PartialBlock {
        tensor: String,
        ty: GgmlType,
        ne: Vec<u64>,
    },
    #[error("tensor {tensor:?} takes {expected} bytes, but {given} bytes were written to it")]
    TooMuchData {
        tensor: String,
        expected: u64,
        given: u64,
    },
    #[error("more data was written than the declared tensors hold")]
    NoTensorLeft,
    #[error("the file ended in tensor {tensor:?} after {written} of its {expected} bytes")]
    Incomplete {
        tensor: String,
        expected: u64,
        written: u64,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

struct Slot {
    decl: TensorDecl,
    bytes: u64,
    offset: u64,
}

/// A GGUF file being written: the header is out, the tensors' data follows in declared order
/// (from [`GgufWriter::stream`]). Memory use does not depend on the tensors' sizes.
pub struct GgufStreamWriter<W: Write> {
    out: W,
    tensors: Vec<Slot>,
    /// The tensor being written.
    current: usize,
    /// Bytes of the current tensor written so far.
    filled: u64,
    /// Bytes written after the start of the data (padding included).
    pos: u64,
    data_start: u64,
    alignment: u64,
}

impl<W: Write> GgufStreamWriter<W> {
    /// The size of the header (where the data starts).
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// The size the whole file will have.
    pub fn file_bytes(&self) -> u64 {
        let end = self
            .tensors
            .last()
            .map_or(0, |t| (t.offset + t.bytes).next_multiple_of(self.alignment));
        self.data_start + end
    }

    /// The tensor the next [`write_data`](Self::write_data) goes to (`None` when all are
    /// complete).
    pub fn current(&self) -> Option<&TensorDecl> {
        self.skip_complete_index().map(|i| &self.tensors[i].decl)
    }

    fn skip_complete_index(&self) -> Option<usize> {
        let mut i = self.current;
        let mut filled = self.filled;
        while let Some(t) = self.tensors.get(i) {
            if filled < t.bytes {
                return Some(i);
            }
            i += 1;
            filled = 0;
        }
        None
    }

    /// Appends `data` to the current tensor; a tensor is complete once it has all its bytes,
    /// and the next write goes to the next one. Data that runs past the end of the current
    /// tensor is an error (nothing of it is written).
    pub fn write_data(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if data.is_empty() {
            return Ok(());
        }
        let i = self
            .skip_complete_index()
            .ok_or(StreamError::NoTensorLeft)?;
        if i != self.current {
            self.current = i;
            self.filled = 0;
        }
        let t = &self.tensors[i];
        let given = self.filled + data.len() as u64;
        if given > t.bytes {
            return Err(StreamError::TooMuchData {
                tensor: t.decl.name.clone(),
                expected: t.bytes,
                given,
            });
        }
        if self.filled == 0 {
            let pad = t.offset - self.pos;
            self.write_zeros(pad)?;
        }
        self.out.write_all(data)?;
        self.filled = given;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, n: u64) -> std::io::Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROS.len() as u64) as usize;
            self.out.write_all(&ZEROS[..k])?;
            left -= k as u64;
        }
        self.pos += n;
        Ok(())
    }

    /// Checks every tensor is complete, writes the final padding, flushes and returns the
    /// output.
    pub fn finish(mut self) -> Result<W, StreamError> {
        if let Some(i) = self.skip_complete_index() {
            let t = &self.tensors[i];
            return Err(StreamError::Incomplete {
                tensor: t.decl.name.clone(),
                expected: t.bytes,
                written: if i == self.current { self.filled } else { 0 },
            });
        }
        // Zero-sized tensors at the end still need their (empty) place.
        let end = self.file_bytes() - self.data_start;
        let pad = end.saturating_sub(self.pos);
        self.write_zeros(pad)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let target = (out.len() as u64).next_multiple_of(alignment);
    pad_to_len(out, target);
}

fn pad_to_len(out: &mut Vec<u8>, len: u64) {
    out.resize(len as usize, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => write_string(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(a) => {
            out.extend_from_slice(&a.element_type().id().to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                Array::U8(v) => out.extend_from_slice(v),
                Array::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
                Array::U16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::I16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::U32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::I32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::F32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::U64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::I64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::F64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Array::Bool(v) => out.extend(v.iter().map(|&x| u8::from(x))),
                Array::String(v) => v.iter().for_each(|s| write_string(out, s)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn round_trips_metadata_and_tensors() {
        let bytes = GgufWriter::new()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_strings("tokenizer.ggml.tokens", ["a", "b"])
            .kv("x.i8s", Value::Array(Array::I8(vec![-1, 2])))
            .tensor_f32("a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
            .tensor("b", GgmlType::Q8_0, &[32], vec![7u8; 34])
            .to_bytes();
        let f = GgufFile::from_bytes("mem", bytes).unwrap();
        assert_eq!(f.version(), 3);
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.require_u64("llama.block_count").unwrap(), 2);
        assert_eq!(f.get("x.i8s"), Some(&Value::Array(Array::I8(vec![-1, 2]))));
        let a = f.tensor("a").unwrap();
        assert_eq!(a.ne, vec![2, 3]);
        assert_eq!(f.tensor_data(a).len(), 24);
        assert_eq!(&f.tensor_data(a)[4..8], &2.0f32.to_le_bytes());
        let b = f.tensor("b").unwrap();
        assert_eq!(b.offset % 32, 0);
        assert_eq!(f.tensor_data(b), &[7u8; 34][..]);
    }

    fn decl(name: &str, ty: GgmlType, ne: &[u64]) -> TensorDecl {
        TensorDecl {
            name: name.into(),
            ty,
            ne: ne.to_vec(),
        }
    }

    #[test]
    fn streaming_writes_the_same_bytes_as_the_in_memory_writer() {
        let a: Vec<u8> = (0..24).collect();
        let b = vec![7u8; 68];
        let meta = GgufWriter::new()
            .kv_str("general.architecture", "llama")
            .alignment(64);
        let whole = meta
            .clone()
            .tensor("a", GgmlType::F32, &[2, 3], a.clone())
            .tensor("b", GgmlType::Q8_0, &[32, 2], b.clone())
            .to_bytes();
        let mut s = meta
            .stream(
                Vec::new(),
                vec![
                    decl("a", GgmlType::F32, &[2, 3]),
                    decl("b", GgmlType::Q8_0, &[32, 2]),
                ],
            )
            .unwrap();
        assert_eq!(s.current().unwrap().name, "a");
        s.write_data(&a[..10]).unwrap();
        s.write_data(&a[10..]).unwrap();
        assert_eq!(s.current().unwrap().name, "b");
        s.write_data(&b[..34]).unwrap();
        s.write_data(&b[34..]).unwrap();
        assert!(s.current().is_none());
        let expected_len = s.file_bytes();
        let streamed = s.finish().unwrap();
        assert_eq!(streamed.len() as u64, expected_len);
        assert_eq!(streamed, whole);
    }

    #[test]
    fn streaming_refuses_wrong_amounts_of_data() {
        let w = GgufWriter::new();
        let err = w
            .stream(Vec::new(), vec![decl("k", GgmlType::Q4_K, &[32, 1])])
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "tensor \"k\": rows of [32, 1] are not whole Q4_K blocks"
        );
        let mut s = w
            .stream(Vec::new(), vec![decl("a", GgmlType::F32, &[2])])
            .unwrap();
        let err = s.write_data(&[0; 12]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor \"a\" takes 8 bytes, but 12 bytes were written to it"
        );
        s.write_data(&[0; 4]).unwrap();
        let err = s.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the file ended in tensor \"a\" after 4 of its 8 bytes"
        );
        let mut s = w
            .stream(Vec::new(), vec![decl("a", GgmlType::F32, &[2])])
            .unwrap();
        s.write_data(&[0; 8]).unwrap();
        let err = s.write_data(&[0; 1]).unwrap_err();
        assert!(matches!(err, StreamError::NoTensorLeft), "{err}");
    }
}

//! A small GGUF writer: builds tiny models and hostile files for tests, benches and tools.
//!
//! The writer produces GGUF v3 with the tensors laid out in insertion order, each at an offset
//! aligned to `general.alignment` (32 unless set with [`GgufWriter::alignment`]).

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
        let alignment = u64::from(self.alignment.unwrap_or(DEFAULT_ALIGNMENT as u32)).max(1);
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.unwrap_or(3).to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
        }
        if !self.tensors.is_empty() {
            pad_to(&mut out, alignment);
            let data_start = out.len() as u64;
            for (t, off) in self.tensors.iter().zip(offsets) {
                pad_to_len(&mut out, data_start + off);
                out.extend_from_slice(&t.data);
            }
            pad_to(&mut out, alignment);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&self.to_bytes())?;
        f.sync_all()
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
}

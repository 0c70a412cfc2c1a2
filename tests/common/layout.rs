//! Where each field of a valid GGUF file lies, found by a walker written independently of the
//! reader under test, so tests can corrupt a real file at exact offsets.
//!
//! This walker trusts its input (it panics on malformed files): it only ever reads files that
//! are valid before the test corrupts them.

/// One metadata entry.
#[derive(Clone, Debug)]
pub struct Kv {
    pub key: String,
    /// Start of the entry: the key's u64 length.
    pub offset: u64,
    /// The u32 value type.
    pub type_offset: u64,
    pub ty: u32,
    /// The value (for strings, their u64 length; for arrays, the element type).
    pub value_offset: u64,
    pub array: Option<ArrayLayout>,
}

/// The fields of an array value.
#[derive(Clone, Debug)]
pub struct ArrayLayout {
    pub elem_type_offset: u64,
    pub elem_type: u32,
    pub count_offset: u64,
    pub count: u64,
    pub elements_offset: u64,
}

/// One tensor info.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    /// Start of the info: the name's u64 length.
    pub offset: u64,
    pub n_dims_offset: u64,
    pub dims_offsets: Vec<u64>,
    pub dims: Vec<u64>,
    pub type_offset: u64,
    pub ty: u32,
    /// The u64 data offset field, and its value (relative to the data section).
    pub data_offset_field: u64,
    pub data_offset: u64,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub kvs: Vec<Kv>,
    pub tensors: Vec<Tensor>,
    /// End of the tensor infos (the data section starts at the next multiple of the alignment).
    pub infos_end: u64,
    /// Start of the data section, assuming the default alignment of 32.
    pub data_start: u64,
}

/// Offsets of the header's fixed fields.
pub const VERSION_OFFSET: u64 = 4;
pub const N_TENSORS_OFFSET: u64 = 8;
pub const N_KV_OFFSET: u64 = 16;

struct Walk<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Walk<'_> {
    fn u32(&mut self) -> u32 {
        let v = u32::from_le_bytes(self.b[self.pos..self.pos + 4].try_into().unwrap());
        self.pos += 4;
        v
    }
    fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(self.b[self.pos..self.pos + 8].try_into().unwrap());
        self.pos += 8;
        v
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        let s = String::from_utf8(self.b[self.pos..self.pos + n].to_vec()).unwrap();
        self.pos += n;
        s
    }
    fn skip_value(&mut self, ty: u32) {
        match ty {
            0 | 1 | 7 => self.pos += 1,
            2 | 3 => self.pos += 2,
            4..=6 => self.pos += 4,
            10..=12 => self.pos += 8,
            8 => {
                self.string();
            }
            other => panic!("layout walker: unexpected value type {other}"),
        }
    }
}

impl Layout {
    /// Walks a valid GGUF file's header.
    pub fn of(bytes: &[u8]) -> Layout {
        assert_eq!(&bytes[..4], b"GGUF");
        let mut w = Walk { b: bytes, pos: 8 };
        let n_tensors = w.u64();
        let n_kv = w.u64();
        let mut kvs = Vec::new();
        for _ in 0..n_kv {
            let offset = w.pos as u64;
            let key = w.string();
            let type_offset = w.pos as u64;
            let ty = w.u32();
            let value_offset = w.pos as u64;
            let array = if ty == 9 {
                let elem_type_offset = w.pos as u64;
                let elem_type = w.u32();
                let count_offset = w.pos as u64;
                let count = w.u64();
                let elements_offset = w.pos as u64;
                for _ in 0..count {
                    w.skip_value(elem_type);
                }
                Some(ArrayLayout {
                    elem_type_offset,
                    elem_type,
                    count_offset,
                    count,
                    elements_offset,
                })
            } else {
                w.skip_value(ty);
                None
            };
            kvs.push(Kv {
                key,
                offset,
                type_offset,
                ty,
                value_offset,
                array,
            });
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let offset = w.pos as u64;
            let name = w.string();
            let n_dims_offset = w.pos as u64;
            let n_dims = w.u32();
            let mut dims_offsets = Vec::new();
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims_offsets.push(w.pos as u64);
                dims.push(w.u64());
            }
            let type_offset = w.pos as u64;
            let ty = w.u32();
            let data_offset_field = w.pos as u64;
            let data_offset = w.u64();
            tensors.push(Tensor {
                name,
                offset,
                n_dims_offset,
                dims_offsets,
                dims,
                type_offset,
                ty,
                data_offset_field,
                data_offset,
            });
        }
        let infos_end = w.pos as u64;
        Layout {
            kvs,
            tensors,
            infos_end,
            data_start: infos_end.next_multiple_of(32),
        }
    }

    pub fn kv(&self, key: &str) -> &Kv {
        self.kvs
            .iter()
            .find(|k| k.key == key)
            .unwrap_or_else(|| panic!("no key {key}"))
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }
}

pub fn put_u32(bytes: &mut [u8], at: u64, v: u32) {
    bytes[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(bytes: &mut [u8], at: u64, v: u64) {
    bytes[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Overwrites bytes at `at` (for renaming a key or tensor to another name of the same length).
pub fn put_bytes(bytes: &mut [u8], at: u64, v: &[u8]) {
    bytes[at as usize..at as usize + v.len()].copy_from_slice(v);
}

//! Errors of the GGUF reader. Every error names the file and says where and what is wrong.

use super::{GgmlType, ValueType};
use std::path::PathBuf;

/// A GGUF file could not be opened, or it is invalid.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    /// The file (or, for in-memory files, the name they were given).
    pub path: PathBuf,
    pub kind: GgufErrorKind,
}

/// What is wrong with a GGUF file. Offsets are byte offsets from the start of the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),

    #[error("not a GGUF file: the first bytes are {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { found: Vec<u8> },

    #[error("unsupported GGUF version {version}{hint} (m40-llm reads versions 2 and 3)")]
    UnsupportedVersion { version: u32, hint: &'static str },

    #[error("truncated at offset {offset}: {what} needs {need} bytes but only {have} remain")]
    Truncated {
        offset: u64,
        what: String,
        need: u64,
        have: u64,
    },

    #[error(
        "at offset {offset}: {what} is {count}, more than the {remaining} bytes left in the file could hold"
    )]
    ImplausibleCount {
        offset: u64,
        what: String,
        count: u64,
        remaining: u64,
    },

    #[error("at offset {offset}: {what} is not valid UTF-8")]
    InvalidUtf8 { offset: u64, what: String },

    #[error("at offset {offset}: key {key:?} has unknown value type {id}")]
    UnknownValueType { offset: u64, key: String, id: u32 },

    #[error(
        "at offset {offset}: key {key:?} is an array of arrays, which GGUF readers do not support"
    )]
    NestedArray { offset: u64, key: String },

    #[error("at offset {offset}: key {key:?} appears twice")]
    DuplicateKey { offset: u64, key: String },

    #[error("key {key:?} has type {found}, expected {expected}")]
    MistypedKey {
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("required key {key:?} is missing")]
    MissingKey { key: String },

    #[error("key {key:?} has invalid value {value}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },

    #[error("general.alignment is {0}: it must be a non-zero power of two")]
    BadAlignment(u64),

    #[error(
        "at offset {offset}: tensor {tensor:?} has {n_dims} dimensions (at most 4 are allowed)"
    )]
    TooManyDims {
        offset: u64,
        tensor: String,
        n_dims: u32,
    },

    #[error("at offset {offset}: tensor {tensor:?} dimension {index} is {value}: {reason}")]
    BadDimension {
        offset: u64,
        tensor: String,
        index: usize,
        value: u64,
        reason: &'static str,
    },

    #[error("at offset {offset}: tensor {tensor:?} has unknown ggml type {id}")]
    UnknownTensorType {
        offset: u64,
        tensor: String,
        id: u32,
    },

    #[error(
        "tensor {tensor:?} of type {ty} has rows of {ne0} elements, not a whole number of {block}-element blocks"
    )]
    PartialBlock {
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block: u64,
    },

    #[error("tensor {tensor:?} appears twice")]
    DuplicateTensor { tensor: String },

    #[error(
        "tensor {tensor:?} data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error("tensor {tensor:?} data [{start}, {end}) lies outside the file ({file_len} bytes)")]
    TensorOutOfFile {
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    OverlappingTensors { first: String, second: String },

    #[error("tensor {tensor:?} has type {found}, expected one of {expected}")]
    UnexpectedTensorType {
        tensor: String,
        found: GgmlType,
        expected: String,
    },

    #[error("metadata value type {found} where {expected} was expected")]
    ValueTypeMismatch {
        expected: ValueType,
        found: ValueType,
    },
}

impl GgufError {
    pub fn new(path: impl Into<PathBuf>, kind: GgufErrorKind) -> Self {
        GgufError {
            path: path.into(),
            kind,
        }
    }
}

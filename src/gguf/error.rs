//! Errors of the GGUF reader. Every error names the file and says where (a byte offset from the
//! start of the file, a key or a tensor) and what is wrong.

use super::GgmlType;
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

    #[error("not a regular file")]
    NotAFile,

    #[error("not a GGUF file: the first bytes are {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { found: Vec<u8> },

    #[error("unsupported GGUF version {version}: m40-llm reads versions 2 and 3{hint}")]
    UnsupportedVersion { version: u32, hint: &'static str },

    #[error("truncated at offset {offset}: {what} needs {need} bytes but only {have} remain")]
    Truncated {
        offset: u64,
        what: String,
        need: u64,
        have: u64,
    },

    #[error(
        "at offset {offset}: {what} is {count}, more than the {remaining} bytes left in the file \
         can hold (the file is corrupt or truncated)"
    )]
    ImplausibleCount {
        offset: u64,
        what: String,
        count: u64,
        remaining: u64,
    },

    #[error("at offset {offset}: {what} is {len} bytes long, more than the {max} GGUF allows")]
    TooLong {
        offset: u64,
        what: String,
        len: u64,
        max: u64,
    },

    #[error("at offset {offset}: {what} is not valid UTF-8")]
    InvalidUtf8 { offset: u64, what: String },

    #[error("at offset {offset}: key #{index} is empty")]
    EmptyKey { offset: u64, index: u64 },

    #[error("at offset {offset}: key {key:?} has unknown value type {id} (known: 0 to 12)")]
    UnknownValueType { offset: u64, key: String, id: u32 },

    #[error(
        "at offset {offset}: key {key:?} is an array of arrays, which GGUF readers do not support"
    )]
    NestedArray { offset: u64, key: String },

    #[error("at offset {offset}: key {key:?} appears a second time (first at offset {first})")]
    DuplicateKey {
        offset: u64,
        key: String,
        first: u64,
    },

    #[error("key {key:?} (at offset {offset}) has type {found}, expected {expected}")]
    MistypedKey {
        offset: u64,
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("required key {key:?} is missing")]
    MissingKey { key: String },

    #[error("key {key:?} (at offset {offset}) has invalid value {value}: {reason}")]
    InvalidValue {
        offset: u64,
        key: String,
        value: String,
        reason: String,
    },

    #[error(
        "general.alignment (at offset {offset}) is {alignment}: it must be a non-zero power of two"
    )]
    BadAlignment { offset: u64, alignment: u64 },

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
        "at offset {offset}: tensor {tensor:?} of type {ty} has rows of {ne0} elements, not a \
         whole number of {block}-element blocks"
    )]
    PartialBlock {
        offset: u64,
        tensor: String,
        ty: GgmlType,
        ne0: u64,
        block: u64,
    },

    #[error(
        "at offset {offset}: tensor {tensor:?} appears a second time (first at offset {first})"
    )]
    DuplicateTensor {
        offset: u64,
        tensor: String,
        first: u64,
    },

    #[error(
        "at offset {offset}: tensor {tensor:?} has data offset {data_offset}, not a multiple of \
         the alignment {alignment}"
    )]
    MisalignedTensor {
        offset: u64,
        tensor: String,
        data_offset: u64,
        alignment: u64,
    },

    #[error(
        "tensor {tensor:?} (described at offset {offset}) has its data at file bytes \
         [{start}, {end}), past the end of the file ({file_len} bytes): the file is truncated or \
         the tensor's offset or shape is corrupt"
    )]
    TensorOutOfFile {
        offset: u64,
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    #[error(
        "tensors {first:?} (data bytes [{first_start}, {first_end})) and {second:?} (data bytes \
         [{second_start}, {second_end})) overlap"
    )]
    OverlappingTensors {
        first: String,
        first_start: u64,
        first_end: u64,
        second: String,
        second_start: u64,
        second_end: u64,
    },

    #[error("tensor {tensor:?} has type {found}, expected one of {expected}")]
    UnexpectedTensorType {
        tensor: String,
        found: GgmlType,
        expected: String,
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

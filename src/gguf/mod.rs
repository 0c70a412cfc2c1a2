//! GGUF: reading, validating and writing model files, and dequantizing their tensors.
//!
//! This module knows the file format and nothing about models: architecture-specific checks
//! (which keys and tensors a llama needs) live in `lower`.

mod error;
pub mod quants;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{GgufError, GgufErrorKind};
pub use reader::{DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufFile, MAX_DIMS, TensorInfo};
pub use types::{GgmlType, QK_K, file_type_name};
pub use value::{Array, Value, ValueType};
pub use writer::{GgufStreamWriter, GgufWriter, StreamError, TensorDecl};

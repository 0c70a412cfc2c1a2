//! Opening a GGUF file never allocates more than a small multiple of the file's size, however
//! large the counts and lengths its header claims. A counting global allocator measures the peak
//! of live heap bytes during `GgufFile::open`; this binary holds a single test so that no other
//! test's allocations are counted.

mod common;

use common::layout::{self, Layout, put_u64};
use m40_llm::gguf::{GgufFile, GgufWriter, Value};
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(live, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let live =
                    LIVE.fetch_add(new_size - layout.size(), Relaxed) + new_size - layout.size();
                PEAK.fetch_max(live, Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The most bytes opening a file may allocate: a small multiple of its size (each metadata value
/// or tensor info decodes into a struct a few times its smallest encoding), plus a fixed
/// allowance for the first slots of each table.
fn budget(file_len: u64) -> usize {
    4 * file_len as usize + 256 * 1024
}

/// Writes `bytes` to a temporary file and returns the peak heap bytes `open` held beyond what
/// was live before, and whether it succeeded.
fn peak_of_open(dir: &std::path::Path, name: &str, bytes: &[u8]) -> (usize, bool) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let ok = GgufFile::open(&path).is_ok();
    let peak = PEAK.load(Relaxed) - before;
    (peak, ok)
}

#[test]
fn hostile_headers_allocate_no_more_than_the_file_justifies() {
    let dir = std::env::temp_dir().join(format!("m40llm-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases: Vec<(String, Vec<u8>, bool)> = Vec::new();

    // A small valid file with a string array, and its hostile variants.
    let tokens: Vec<String> = (0..1000).map(|i| format!("tok{i}")).collect();
    let small = GgufWriter::new()
        .kv_str("general.architecture", "llama")
        .kv_strings("tokenizer.ggml.tokens", tokens)
        .kv(
            "tokenizer.ggml.token_type",
            Value::Array(m40_llm::gguf::Array::I32(vec![1; 1000])),
        )
        .tensor_f32("t", &[4, 2], &[0.0; 8])
        .to_bytes();
    let l = Layout::of(&small);
    cases.push(("valid".into(), small.clone(), true));
    let mut patch = |name: &str, at: u64, v: u64| {
        let mut b = small.clone();
        put_u64(&mut b, at, v);
        cases.push((name.into(), b, false));
    };
    patch("n_tensors u64::MAX", layout::N_TENSORS_OFFSET, u64::MAX);
    patch("n_kv 2^40", layout::N_KV_OFFSET, 1 << 40);
    let tok = l.kv("tokenizer.ggml.tokens");
    let tok_array = tok.array.clone().unwrap();
    patch("key length 2^60", tok.offset, 1 << 60);
    patch("string array count 2^61", tok_array.count_offset, 1 << 61);
    patch(
        "string element length 2^40",
        tok_array.elements_offset,
        1 << 40,
    );
    let types = l.kv("tokenizer.ggml.token_type").array.clone().unwrap();
    patch("i32 array count u64::MAX", types.count_offset, u64::MAX);
    let arch = l.kv("general.architecture");
    patch("string value length 2^62", arch.value_offset, 1 << 62);
    // The largest counts that still pass the bytes-left bound, so parsing starts and must grow
    // its tables as it goes.
    let left = |after: u64| small.len() as u64 - after;
    patch("n_kv max", layout::N_KV_OFFSET, left(24) / 13);
    let count_end = tok_array.count_offset + 8;
    patch(
        "string array count max",
        tok_array.count_offset,
        left(count_end) / 8,
    );
    patch("n_tensors max", layout::N_TENSORS_OFFSET, left(16) / 24);
    patch(
        "tensor dims 2^31 x 2^31",
        l.tensors[0].dims_offsets[0],
        1 << 31,
    );

    // An honest worst case: 20000 empty strings (8 bytes each in the file, a 24-byte String
    // each in memory).
    let empty = GgufWriter::new()
        .kv_strings("tokenizer.ggml.tokens", vec![""; 20000])
        .to_bytes();
    cases.push(("20000 empty strings".into(), empty, true));

    // The real model: its header, and its header with absurd counts.
    if let Some(path) = common::default_model() {
        let bytes = std::fs::read(path).unwrap();
        let l = Layout::of(&bytes);
        cases.push(("default model".into(), bytes.clone(), true));
        let header = &bytes[..l.data_start as usize];
        let mut real = |name: &str, at: u64, v: u64| {
            let mut b = header.to_vec();
            put_u64(&mut b, at, v);
            cases.push((name.into(), b, false));
        };
        let tokens = l.kv("tokenizer.ggml.tokens").array.clone().unwrap();
        let left = |after: u64| header.len() as u64 - after;
        let count_end = tokens.count_offset + 8;
        real(
            "model: tokens count max",
            tokens.count_offset,
            left(count_end) / 8,
        );
        real("model: n_kv max", layout::N_KV_OFFSET, left(24) / 13);
        real("model: n_tensors 2^60", layout::N_TENSORS_OFFSET, 1 << 60);
    }

    let mut report = Vec::new();
    for (name, bytes, should_open) in &cases {
        let (peak, ok) = peak_of_open(&dir, "case.gguf", bytes);
        report.push(format!(
            "{name}: {} bytes, peak {peak} ({:.2}x)",
            bytes.len(),
            peak as f64 / bytes.len() as f64
        ));
        assert_eq!(ok, *should_open, "{name}");
        assert!(
            peak <= budget(bytes.len() as u64),
            "{name}: opening a {}-byte file allocated {peak} bytes",
            bytes.len()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // Shown with --nocapture: the measured peaks.
    println!("{}", report.join("\n"));
}

//! NVRTC, loaded by path with `libloading` (cudarc loads one `libnvrtc` by name and cannot be
//! pointed at another): discovery of every NVRTC on the machine, and compilation.
//!
//! CUDA 13's NVRTC cannot target sm_52, and Tesla M40 owners run CUDA 12.x. So for a given arch
//! m40-llm takes the first NVRTC that lists it among its supported architectures, in this order:
//! `$M40LLM_NVRTC` (only that one when it is set), the `libnvrtc` the dynamic loader finds, the
//! CUDA toolkits under `/usr/local/cuda*/`, and the pip package `nvidia-cuda-nvrtc-cu12`'s
//! `libnvrtc.so.12` in Python's site directories. None fits: an error with the advice to install
//! one ([`NVRTC_ADVICE`]).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};

/// What to do when no NVRTC can compile for the device.
pub const NVRTC_ADVICE: &str = "install an NVRTC 12 (`python3 -m pip install nvidia-cuda-nvrtc-cu12==12.4.*`) or CUDA 12.x, \
     or point M40LLM_NVRTC at a libnvrtc.so that supports this architecture";

/// Why NVRTC could not be found, loaded or could not compile.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("cannot load NVRTC from {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("NVRTC {path}: {call} failed: {message}")]
    Call {
        path: String,
        call: &'static str,
        message: String,
    },
    #[error("no NVRTC that can compile for sm_{arch} was found (tried: {tried}); {NVRTC_ADVICE}")]
    NotFound { arch: u32, tried: String },
    #[error("kernel source `{name}` contains a NUL byte")]
    Nul { name: String },
    #[error("NVRTC {version} failed to compile kernels/{name}.cu for sm_{arch}:\n{log}")]
    Compile {
        name: String,
        arch: u32,
        version: String,
        log: String,
    },
}

type NvrtcResult = c_int;
type Program = *mut c_void;

/// The NVRTC entry points m40-llm uses.
struct Fns {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult,
    num_archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    archs: unsafe extern "C" fn(*mut c_int) -> NvrtcResult,
    error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    destroy: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
}

/// Where an NVRTC candidate came from (shown by `doctor`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    /// A path, or a bare library name for the dynamic loader to find.
    pub path: String,
    /// `M40LLM_NVRTC`, `dynamic loader`, `CUDA toolkit`, `pip nvidia-cuda-nvrtc-cu12`.
    pub origin: String,
}

/// A loaded NVRTC.
pub struct Nvrtc {
    fns: Fns,
    path: String,
    version: (i32, i32),
    archs: Vec<u32>,
    // Keeps the library mapped while `fns` points into it; dropped last.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvrtc")
            .field("path", &self.path)
            .field("version", &self.version)
            .finish()
    }
}

/// The output of one compilation.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// A CUBIN for the exact arch.
    pub cubin: Vec<u8>,
    /// NVRTC's log (with `--ptxas-options=-v`: ptxas's resource report).
    pub log: String,
}

/// The output of one compilation to PTX.
#[derive(Clone, Debug)]
pub struct CompiledPtx {
    /// PTX text for `compute_{arch}` (the trailing NUL removed).
    pub ptx: String,
    /// NVRTC's log.
    pub log: String,
}

/// What a compilation hands back: a CUBIN for a real architecture (`sm_XY`), or PTX for a
/// virtual one (`compute_XY`, before ptxas).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Cubin,
    Ptx,
}

impl Output {
    fn arch_option(self, arch: u32) -> String {
        match self {
            Output::Cubin => format!("--gpu-architecture=sm_{arch}"),
            Output::Ptx => format!("--gpu-architecture=compute_{arch}"),
        }
    }
}

impl Nvrtc {
    /// Loads the NVRTC at `path` (a path or a library name) and asks its version and archs.
    pub fn load(path: &str) -> Result<Nvrtc, NvrtcError> {
        let load_err = |reason: String| NvrtcError::Load {
            path: path.to_string(),
            reason,
        };
        // SAFETY: loading NVRTC runs its initializers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| load_err(e.to_string()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has this C signature in every NVRTC since 11.2 (nvrtc.h);
                // the function pointer is kept only while `lib` is alive (both live in `Nvrtc`).
                *unsafe { lib.get($name) }.map_err(|e| load_err(e.to_string()))?
            };
        }
        let fns = Fns {
            version: sym!(b"nvrtcVersion\0"),
            num_archs: sym!(b"nvrtcGetNumSupportedArchs\0"),
            archs: sym!(b"nvrtcGetSupportedArchs\0"),
            error_string: sym!(b"nvrtcGetErrorString\0"),
            create: sym!(b"nvrtcCreateProgram\0"),
            compile: sym!(b"nvrtcCompileProgram\0"),
            destroy: sym!(b"nvrtcDestroyProgram\0"),
            log_size: sym!(b"nvrtcGetProgramLogSize\0"),
            log: sym!(b"nvrtcGetProgramLog\0"),
            cubin_size: sym!(b"nvrtcGetCUBINSize\0"),
            cubin: sym!(b"nvrtcGetCUBIN\0"),
            ptx_size: sym!(b"nvrtcGetPTXSize\0"),
            ptx: sym!(b"nvrtcGetPTX\0"),
        };
        let mut nvrtc = Nvrtc {
            fns,
            path: path.to_string(),
            version: (0, 0),
            archs: Vec::new(),
            _lib: lib,
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        nvrtc.check("nvrtcVersion", unsafe {
            (nvrtc.fns.version)(&mut major, &mut minor)
        })?;
        nvrtc.version = (major, minor);
        if let Some(real) = library_file(nvrtc.fns.version as *const c_void) {
            nvrtc.path = real;
        }
        let mut n = 0;
        // SAFETY: a valid out-pointer.
        nvrtc.check("nvrtcGetNumSupportedArchs", unsafe {
            (nvrtc.fns.num_archs)(&mut n)
        })?;
        let mut archs = vec![0 as c_int; usize::try_from(n).unwrap_or(0)];
        if !archs.is_empty() {
            // SAFETY: `archs` has room for the `n` values NVRTC said it returns.
            nvrtc.check("nvrtcGetSupportedArchs", unsafe {
                (nvrtc.fns.archs)(archs.as_mut_ptr())
            })?;
        }
        nvrtc.archs = archs
            .into_iter()
            .filter_map(|a| u32::try_from(a).ok())
            .collect();
        Ok(nvrtc)
    }

    /// The path or name it was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `(major, minor)`, e.g. `(12, 4)`.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// `12.4`.
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    /// The architectures it can compile for (`52` for sm_52).
    pub fn archs(&self) -> &[u32] {
        &self.archs
    }

    /// Whether it can compile for `sm_{arch}`.
    pub fn supports(&self, arch: u32) -> bool {
        self.archs.contains(&arch)
    }

    fn check(&self, call: &'static str, code: NvrtcResult) -> Result<(), NvrtcError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string for any code (or null).
        let ptr = unsafe { (self.fns.error_string)(code) };
        let message = if ptr.is_null() {
            format!("error {code}")
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned()
        };
        Err(NvrtcError::Call {
            path: self.path.clone(),
            call,
            message,
        })
    }

    /// Compiles `source` (the kernel family `name`) with `headers` ((include name, source)) and
    /// `options` into a CUBIN for `sm_{arch}`. Compile errors carry NVRTC's log.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: u32,
        options: &[String],
    ) -> Result<Compiled, NvrtcError> {
        let (cubin, log) = self.compile_to(Output::Cubin, name, source, headers, arch, options)?;
        Ok(Compiled { cubin, log })
    }

    /// As [`Nvrtc::compile`], for the virtual architecture `compute_{arch}`: the PTX NVVM
    /// generates (what ptxas would be given), with NVRTC's log.
    pub fn compile_ptx(
        &self,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: u32,
        options: &[String],
    ) -> Result<CompiledPtx, NvrtcError> {
        let (ptx, log) = self.compile_to(Output::Ptx, name, source, headers, arch, options)?;
        let end = ptx.iter().position(|&b| b == 0).unwrap_or(ptx.len());
        Ok(CompiledPtx {
            ptx: String::from_utf8_lossy(&ptx[..end]).into_owned(),
            log,
        })
    }

    fn compile_to(
        &self,
        output: Output,
        name: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: u32,
        options: &[String],
    ) -> Result<(Vec<u8>, String), NvrtcError> {
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| NvrtcError::Nul {
                name: name.to_string(),
            })
        };
        let src = cstr(source)?;
        let prog_name = cstr(&format!("{name}.cu"))?;
        let header_src = headers
            .iter()
            .map(|(_, s)| cstr(s))
            .collect::<Result<Vec<_>, _>>()?;
        let header_names = headers
            .iter()
            .map(|(n, _)| cstr(n))
            .collect::<Result<Vec<_>, _>>()?;
        let header_src_ptrs: Vec<*const c_char> = header_src.iter().map(|s| s.as_ptr()).collect();
        let header_name_ptrs: Vec<*const c_char> =
            header_names.iter().map(|s| s.as_ptr()).collect();
        let mut opts = vec![output.arch_option(arch)];
        opts.extend(options.iter().cloned());
        let opts = opts
            .iter()
            .map(|o| cstr(o))
            .collect::<Result<Vec<_>, _>>()?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: all strings are NUL-terminated and outlive the call; the header arrays have
        // `headers.len()` entries each.
        self.check("nvrtcCreateProgram", unsafe {
            (self.fns.create)(
                &mut prog,
                src.as_ptr(),
                prog_name.as_ptr(),
                headers.len() as c_int,
                header_src_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        })?;
        let result = self.compile_program(prog, output, name, arch, &opt_ptrs);
        // SAFETY: `prog` was created above and is destroyed once.
        unsafe { (self.fns.destroy)(&mut prog) };
        result
    }

    fn compile_program(
        &self,
        prog: Program,
        output: Output,
        name: &str,
        arch: u32,
        opts: &[*const c_char],
    ) -> Result<(Vec<u8>, String), NvrtcError> {
        // SAFETY: `prog` is a live program; `opts` holds `opts.len()` valid C strings.
        let code = unsafe { (self.fns.compile)(prog, opts.len() as c_int, opts.as_ptr()) };
        let log = self.program_log(prog)?;
        if code != 0 {
            return Err(NvrtcError::Compile {
                name: name.to_string(),
                arch,
                version: self.version_string(),
                log: if log.trim().is_empty() {
                    format!("(no log; NVRTC returned {code})")
                } else {
                    log
                },
            });
        }
        let (size_call, size_fn, get_call, get_fn) = match output {
            Output::Cubin => (
                "nvrtcGetCUBINSize",
                self.fns.cubin_size,
                "nvrtcGetCUBIN",
                self.fns.cubin,
            ),
            Output::Ptx => (
                "nvrtcGetPTXSize",
                self.fns.ptx_size,
                "nvrtcGetPTX",
                self.fns.ptx,
            ),
        };
        let mut size = 0usize;
        // SAFETY: a compiled program and a valid out-pointer.
        self.check(size_call, unsafe { size_fn(prog, &mut size) })?;
        let mut image = vec![0u8; size];
        if size > 0 {
            // SAFETY: `image` has the `size` bytes NVRTC reported.
            self.check(get_call, unsafe { get_fn(prog, image.as_mut_ptr().cast()) })?;
        }
        Ok((image, log))
    }

    fn program_log(&self, prog: Program) -> Result<String, NvrtcError> {
        let mut size = 0usize;
        // SAFETY: a live program and a valid out-pointer.
        self.check("nvrtcGetProgramLogSize", unsafe {
            (self.fns.log_size)(prog, &mut size)
        })?;
        if size <= 1 {
            return Ok(String::new());
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` has the `size` bytes (NUL included) NVRTC reported.
        self.check("nvrtcGetProgramLog", unsafe {
            (self.fns.log)(prog, buf.as_mut_ptr().cast())
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

/// The file the dynamic loader mapped the symbol at `addr` from (a bare name such as
/// `libnvrtc.so.12` may resolve to a library already loaded by path).
fn library_file(addr: *const c_void) -> Option<String> {
    #[cfg(unix)]
    {
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        // SAFETY: `addr` is a function of a loaded library; `info` is a valid out-pointer.
        if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
            return None;
        }
        // SAFETY: non-null and NUL-terminated, owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy();
        let path = Path::new(name.as_ref());
        Some(
            path.canonicalize()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| name.into_owned()),
        )
    }
    #[cfg(not(unix))]
    {
        let _ = addr;
        None
    }
}

/// Every NVRTC candidate, in the order they are tried (see the module docs). Only existing files
/// are listed, except the bare names for the dynamic loader.
pub fn candidates() -> Vec<Candidate> {
    if let Some(p) = std::env::var_os("M40LLM_NVRTC") {
        return vec![Candidate {
            path: p.to_string_lossy().into_owned(),
            origin: "M40LLM_NVRTC".into(),
        }];
    }
    let mut out = Vec::new();
    for name in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
        out.push(Candidate {
            path: name.into(),
            origin: "dynamic loader".into(),
        });
    }
    let mut toolkits: Vec<PathBuf> = glob_dirs(Path::new("/usr/local"), "cuda")
        .into_iter()
        .chain(std::env::var_os("CUDA_HOME").map(PathBuf::from))
        .chain(std::env::var_os("CUDA_PATH").map(PathBuf::from))
        .collect();
    toolkits.sort();
    toolkits.dedup();
    for root in toolkits {
        for lib in ["lib64", "lib", "targets/x86_64-linux/lib"] {
            for file in ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"] {
                push_file(&mut out, root.join(lib).join(file), "CUDA toolkit");
            }
        }
    }
    for site in python_site_dirs() {
        push_file(
            &mut out,
            site.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12"),
            "pip nvidia-cuda-nvrtc-cu12",
        );
    }
    out
}

fn push_file(out: &mut Vec<Candidate>, path: PathBuf, origin: &str) {
    let Ok(real) = path.canonicalize() else {
        return;
    };
    let real = real.to_string_lossy().into_owned();
    if out.iter().any(|c| c.path == real) {
        return;
    }
    out.push(Candidate {
        path: real,
        origin: origin.into(),
    });
}

/// Entries of `dir` whose name starts with `prefix` that are directories.
fn glob_dirs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// Python's site directories: those `python3` reports, and the usual places for the user's and
/// the system's packages (globbed, for machines where `python3` is not the one pip used).
fn python_site_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let script = "import site, sys\nprint('\\n'.join(site.getsitepackages() + [site.getusersitepackages()] + sys.path))";
    if let Ok(out) = std::process::Command::new("python3")
        .args(["-c", script])
        .stderr(std::process::Stdio::null())
        .output()
        && out.status.success()
    {
        dirs.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(PathBuf::from),
        );
    }
    let mut roots = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/local/lib")];
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(Path::new(&home).join(".local/lib"));
    }
    for root in roots {
        for py in glob_dirs(&root, "python3") {
            dirs.push(py.join("site-packages"));
            dirs.push(py.join("dist-packages"));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Every candidate, loaded or with the reason it could not be (for `doctor`).
pub fn probe_all() -> Vec<(Candidate, Result<Nvrtc, NvrtcError>)> {
    let mut out: Vec<(Candidate, Result<Nvrtc, NvrtcError>)> = Vec::new();
    for c in candidates() {
        let loaded = Nvrtc::load(&c.path);
        match &loaded {
            // A bare name the loader cannot find is no finding.
            Err(_) if c.origin == "dynamic loader" => continue,
            // Several names and paths often resolve to one library: list it once.
            Ok(n)
                if out
                    .iter()
                    .any(|(_, r)| r.as_ref().is_ok_and(|m| m.path == n.path)) =>
            {
                continue;
            }
            _ => {}
        }
        out.push((c, loaded));
    }
    out
}

/// The first NVRTC (in [`candidates`] order) that can compile for `sm_{arch}`.
pub fn find_for_arch(arch: u32) -> Result<Nvrtc, NvrtcError> {
    let mut tried = Vec::new();
    for c in candidates() {
        match Nvrtc::load(&c.path) {
            Ok(n) if n.supports(arch) => {
                tracing::info!(
                    "NVRTC {} from {} ({}) compiles for sm_{arch}",
                    n.version_string(),
                    c.path,
                    c.origin
                );
                return Ok(n);
            }
            Ok(n) => tried.push(format!(
                "{} (NVRTC {}, no sm_{arch})",
                c.path,
                n.version_string()
            )),
            Err(NvrtcError::Load { .. }) if c.origin == "dynamic loader" => {
                tried.push(format!("{} (not found)", c.path))
            }
            Err(e) => tried.push(format!("{} ({e})", c.path)),
        }
    }
    Err(NvrtcError::NotFound {
        arch,
        tried: tried.join(", "),
    })
}

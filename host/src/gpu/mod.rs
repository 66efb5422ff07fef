//! The CUDA device: context, one stream, cuBLAS, kernels compiled by NVRTC and a caching
//! allocator. cudarc loads the driver and libraries at run time, so this builds and runs on
//! machines without CUDA (`Gpu::open` then fails in one line).
//!
//! - Kernels: CUDA C source (the host's `kernels/*.cu` or a plugin's) compiled for the device's
//!   architecture on first use, cached on disk by (arch, hash of the source) in `$PITH_KERNEL_CACHE`
//!   or `~/.cache/pith/kernels`, and in memory by (hash of the source, kernel name): see [`Src`].
//!   Each launch's arguments are checked against the kernel's parameters, read from its PTX.
//! - Memory: every buffer comes from [`Pool`], which keeps freed blocks by size and hands them out
//!   again, so the steady-state step calls no cudaMalloc. Work runs on the compute stream (a
//!   stream of its own, not the legacy default one, which would serialise with NCCL's side
//!   stream), so reusing a block freed by an earlier op is ordered after that op; a block also
//!   used on another stream ([`DTensor::used_on`]) is reused only once that stream has passed
//!   its free (PyTorch's caching allocator rule, `record_stream`).
//! - GEMMs: gemm.rs (cuBLAS `cublasGemmEx`, `cublasGemmStridedBatchedEx` and the experts'
//!   `cublasGemmGroupedBatchedEx`).

pub mod attention;
pub mod gemm;
pub mod kernels;
pub mod model;
pub mod nccl;
pub mod ops;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as drv, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream};
use pith_plugin_api::{Arg, DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// `sm_XY` of the device, what NVRTC compiles for.
    pub arch: &'static str,
    pub pool: Arc<Pool>,
    /// Loaded modules by source hash, and kernels by source hash, then name.
    modules: Mutex<HashMap<u64, Arc<Loaded>>>,
    functions: Mutex<HashMap<u64, HashMap<String, Kernel>>>,
    /// While profiling: (op name, start, end) events of every kernel and GEMM.
    profile: Mutex<Option<Vec<(String, CudaEvent, CudaEvent)>>>,
    staging: Mutex<Staging>,
}

/// Pinned host memory for small uploads (pointer arrays, tokens, offsets): a copy from pageable
/// memory may wait for the stream, a copy from pinned memory never does. Used front to back
/// and reused after the next full sync, when every copy out of it has happened.
struct Staging {
    ptr: usize,
    cap: usize,
    used: usize,
}

const STAGING_BYTES: usize = 8 << 20;

/// A loaded module and the parameter sizes of each of its kernels (from the PTX).
struct Loaded {
    module: Arc<CudaModule>,
    params: HashMap<String, Arc<[usize]>>,
}

struct Kernel {
    f: CudaFunction,
    params: Arc<[usize]>,
}

/// Kernel source text with the hash of its content, the key of the kernel caches: two sources
/// at one address (a freed string's memory reused) never share an entry, one source at two
/// addresses never misses. The host's own sources hash at compile time ([`src`]); a plugin's
/// are hashed at each launch (a word at a time: ~1 µs for 8 KiB).
#[derive(Clone, Copy, Debug)]
pub struct Src<'a> {
    pub text: &'a str,
    pub hash: u64,
}

impl<'a> Src<'a> {
    pub const fn new(text: &'a str) -> Src<'a> {
        Src { text, hash: content_hash(text.as_bytes()) }
    }
}

impl<'a> From<&'a str> for Src<'a> {
    fn from(text: &'a str) -> Src<'a> {
        Src::new(text)
    }
}

/// A 64-bit hash of `b`: 8-byte words through rotate-xor-multiply, then MurmurHash3's finalizer.
const fn content_hash(b: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut h, mut i) = ((b.len() as u64).wrapping_mul(K), 0);
    while i < b.len() {
        let mut w = [0u8; 8];
        if i + 8 <= b.len() {
            w = [b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]];
        } else {
            let mut j = 0;
            while i + j < b.len() {
                w[j] = b[i + j];
                j += 1;
            }
        }
        h = (h.rotate_left(23) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        i += 8;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The host's kernel sources, embedded in the binary, hashed at compile time.
pub mod src {
    use super::Src;
    pub const NORM: Src = Src::new(include_str!("../../../kernels/norm.cu"));
    pub const ROPE: Src = Src::new(include_str!("../../../kernels/rope.cu"));
    pub const ATTENTION: Src = Src::new(include_str!("../../../kernels/attention.cu"));
    pub const ATTENTION_HOPPER: Src = Src::new(include_str!("../../../kernels/attention_hopper.cu"));
    pub const LOSS: Src = Src::new(include_str!("../../../kernels/cross_entropy.cu"));
    pub const ELEMENTWISE: Src = Src::new(include_str!("../../../kernels/elementwise.cu"));
    pub const GROUPED_GEMM: Src = Src::new(include_str!("../../../kernels/grouped_gemm.cu"));
}

/// The byte size of each parameter of every `.entry` (kernel) in PTX text, e.g.
/// `.param .u64 .ptr .global .align 4 k_param_0` is 8, `.param .align 8 .b8 k_param_1[24]` 24.
fn ptx_params(ptx: &str) -> HashMap<String, Arc<[usize]>> {
    let size = |decl: &str| {
        let ty = decl.split_whitespace().skip(1).find_map(|w| {
            let w = w.strip_prefix('.')?;
            let bits = w.strip_prefix(['b', 'u', 's', 'f'])?;
            bits.parse::<usize>().ok()
        });
        let count = decl.rsplit_once('[').and_then(|(_, n)| n.trim_end_matches(']').parse::<usize>().ok());
        ty.unwrap_or(0) / 8 * count.unwrap_or(1)
    };
    let mut out = HashMap::new();
    for part in ptx.split(".entry ").skip(1) {
        let Some((name, rest)) = part.split_once('(') else { continue };
        let Some((list, _)) = rest.split_once(')') else { continue };
        let sizes = list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(size).collect();
        out.insert(name.trim().to_string(), sizes);
    }
    out
}

/// Check a launch's `args` against kernel `name`'s parameter sizes: as many, and an 8-byte
/// argument (`Ptr`, `I64`) for each 8-byte parameter, a 4-byte one for each of 1 to 4 bytes.
fn check_args(name: &str, params: &[usize], args: &[Arg]) -> Result<(), String> {
    if params.len() != args.len() {
        return Err(format!("kernel `{name}` takes {} arguments, the launch passes {}", params.len(), args.len()));
    }
    for (i, (&p, a)) in params.iter().zip(args).enumerate() {
        let size = if matches!(a, Arg::Ptr(_) | Arg::I64(_)) { 8 } else { 4 };
        if (size == 8 && p != 8) || (size == 4 && !(1..=4).contains(&p)) {
            return Err(format!("kernel `{name}`: argument {i} is {a:?} ({size} bytes), the parameter has {p} bytes"));
        }
    }
    Ok(())
}

/// Where compiled kernels are kept: `$PITH_KERNEL_CACHE`, else `~/.cache/pith/kernels`.
fn cache_dir() -> PathBuf {
    match std::env::var_os("PITH_KERNEL_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/pith/kernels"),
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let st = self.staging.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let freed = self.ctx.bind_to_thread().and_then(|_| unsafe { drv::free_host(st.ptr as *mut std::ffi::c_void) });
        if let Err(e) = freed {
            tracing::warn!("freeing the pinned staging buffer: {e:?}");
        }
    }
}

fn derr(what: &str) -> impl Fn(cudarc::driver::DriverError) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// Freed device blocks by size; what is reserved, in use, and the peaks.
#[derive(Default)]
pub struct Pool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<u64>>,
    /// Blocks freed while another stream may still use them: (size, address, an event on each
    /// such stream recorded at the free).
    pending: Vec<(usize, u64, Vec<CudaEvent>)>,
    reserved: usize,
    in_use: usize,
    peak_reserved: usize,
    peak_in_use: usize,
    mallocs: usize,
}

/// Sizes round up to 512 B below 1 MiB and to 2 MiB above, so a step's identical requests reuse.
fn round(bytes: usize) -> usize {
    let q = if bytes < 1 << 20 { 512 } else { 2 << 20 };
    bytes.max(1).div_ceil(q) * q
}

/// Memory numbers of the pool, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct MemStats {
    pub reserved: usize,
    pub in_use: usize,
    pub peak_reserved: usize,
    pub peak_in_use: usize,
    pub mallocs: usize,
}

impl Pool {
    fn take(self: &Arc<Self>, bytes: usize) -> Result<Buf, String> {
        let size = round(bytes);
        let mut s = self.state.lock().unwrap();
        s.reclaim();
        let ptr = match s.free.get_mut(&size).and_then(|v| v.pop()) {
            Some(p) => p,
            None => {
                let mut p = unsafe { drv::malloc_sync(size) };
                if p.is_err() {
                    // Out of memory with blocks cached: give them back and try once more.
                    drop(s);
                    if let Err(e) = self.release_cached() {
                        tracing::warn!("out of GPU memory, giving cached blocks back: {e}");
                    }
                    s = self.state.lock().unwrap();
                    p = unsafe { drv::malloc_sync(size) };
                }
                let p = p.map_err(|e| {
                    format!(
                        "GPU out of memory allocating {:.2} GiB ({:.2} GiB in use): {e:?}",
                        gib(size),
                        gib(s.in_use)
                    )
                })?;
                s.reserved += size;
                s.mallocs += 1;
                s.peak_reserved = s.peak_reserved.max(s.reserved);
                p
            }
        };
        s.in_use += size;
        s.peak_in_use = s.peak_in_use.max(s.in_use);
        Ok(Buf { ptr, size, pool: self.clone(), streams: Mutex::default() })
    }
    pub fn stats(&self) -> MemStats {
        let s = self.state.lock().unwrap();
        MemStats {
            reserved: s.reserved,
            in_use: s.in_use,
            peak_reserved: s.peak_reserved,
            peak_in_use: s.peak_in_use,
            mallocs: s.mallocs,
        }
    }
    /// Give cached blocks back to the driver; tries every block, returns the first failure (a
    /// block that could not be freed stays counted as reserved).
    pub fn release_cached(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        for (size, ptr, events) in std::mem::take(&mut s.pending) {
            for e in events {
                e.synchronize().map_err(|e| format!("waiting for a stream to pass a freed block: {e:?}"))?;
            }
            s.free.entry(size).or_default().push(ptr);
        }
        let cached: Vec<(usize, Vec<u64>)> = s.free.drain().collect();
        let mut first = None;
        for (sz, list) in cached {
            for q in list {
                match unsafe { drv::free_sync(q) } {
                    Ok(()) => s.reserved -= sz,
                    Err(e) => _ = first.get_or_insert_with(|| format!("freeing a cached {sz}-byte block: {e:?}")),
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
    pub fn reset_peaks(&self) {
        let mut s = self.state.lock().unwrap();
        (s.peak_reserved, s.peak_in_use) = (s.reserved, s.in_use);
    }
}

impl PoolState {
    /// Pending blocks whose streams have all passed their free become free.
    fn reclaim(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let (done, waiting) =
            std::mem::take(&mut self.pending).into_iter().partition(|b| b.2.iter().all(|e| e.is_complete()));
        self.pending = waiting;
        for (size, ptr, _) in done {
            self.free.entry(size).or_default().push(ptr);
        }
    }
}

pub fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// A device block from the pool; returned to it on drop (to be reused after the compute
/// stream's work queued so far, and after the work queued on each of `streams` at the drop).
pub struct Buf {
    pub ptr: u64,
    size: usize,
    pool: Arc<Pool>,
    streams: Mutex<Vec<Arc<CudaStream>>>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        let streams = std::mem::take(self.streams.get_mut().unwrap_or_else(PoisonError::into_inner));
        let mut events = Vec::new();
        for st in streams {
            match st.record_event(None) {
                Ok(e) => events.push(e),
                // Without an event, wait here: never hand out a block a stream may still touch.
                Err(_) => _ = st.synchronize(),
            }
        }
        let mut s = self.pool.state.lock().unwrap();
        s.in_use -= self.size;
        match events.is_empty() {
            true => s.free.entry(self.size).or_default().push(self.ptr),
            false => s.pending.push((self.size, self.ptr, events)),
        }
    }
}

/// A device tensor that owns its memory: the view `t` plus the block behind it.
pub struct DTensor {
    pub t: Tensor,
    buf: Buf,
}

impl DTensor {
    /// Mark the block as used on `stream` too (besides the compute stream): once freed, it is
    /// reused only after `stream` has done the work it had queued by then.
    pub fn used_on(&self, stream: &Arc<CudaStream>) {
        self.buf.streams.lock().unwrap_or_else(PoisonError::into_inner).push(stream.clone());
    }
}

impl std::ops::Deref for DTensor {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.t
    }
}

/// A kernel's launch shape: grid blocks, block threads, dynamic shared memory.
pub fn dims(grid: u32, block: u32) -> ([u32; 3], [u32; 3], u32) {
    ([grid, 1, 1], [block, 1, 1], 0)
}

/// The number of blocks for a grid-stride loop over `n` elements with `block` threads.
pub fn blocks(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).clamp(1, 65_535 * 16) as u32
}

impl Gpu {
    /// Open GPU `ordinal`, or say in one line what was looked for and not found.
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        // cudarc panics when it cannot load the driver; look for it first.
        unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| {
            format!("device = \"cuda\": no NVIDIA driver (libcuda.so.1 could not be loaded: {e}); use device = \"cpu\"")
        })?;
        let ctx =
            CudaContext::new(ordinal).map_err(|e| format!("device = \"cuda\": no usable GPU {ordinal}: {e:?}"))?;
        let stream = ctx.new_stream().map_err(|e| format!("GPU {ordinal}: a stream: {e:?}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| format!("GPU {ordinal}: {e:?}"))?;
        // Hopper compiles for sm_90a: its warpgroup MMA (kernels/grouped_gemm.cu) exists only there.
        let suffix = if (major, minor) == (9, 0) { "a" } else { "" };
        let arch = Box::leak(format!("sm_{major}{minor}{suffix}").into_boxed_str());
        Ok(Gpu {
            ctx,
            stream,
            blas,
            arch,
            pool: Arc::default(),
            modules: Mutex::default(),
            functions: Mutex::default(),
            profile: Mutex::default(),
            staging: Mutex::new(Staging {
                ptr: unsafe { drv::malloc_host(STAGING_BYTES, 0) }.map_err(|e| format!("pinned memory: {e:?}"))?
                    as usize,
                cap: STAGING_BYTES,
                used: 0,
            }),
        })
    }

    /// Compile `src` for this device (or load it from the disk cache); returns the module and
    /// whether it was cached (in memory or on disk).
    pub fn module<'s>(&self, src: impl Into<Src<'s>>) -> Result<(Arc<CudaModule>, bool), String> {
        self.load(src.into()).map(|(l, cached)| (l.module.clone(), cached))
    }

    fn load(&self, src: Src) -> Result<(Arc<Loaded>, bool), String> {
        if let Some(m) = self.modules.lock().unwrap().get(&src.hash) {
            return Ok((m.clone(), true));
        }
        let path = cache_dir().join(format!("{}-{:016x}.ptx", self.arch, src.hash));
        let cached = path.is_file();
        let ptx = if cached {
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some(self.arch),
                include_paths: vec![format!("{cuda_home}/include")],
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(src.text, opts).map_err(|e| match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    format!("NVRTC: {}", log.to_string_lossy().trim())
                }
                e => format!("NVRTC: {e:?}"),
            })?;
            let ptx = ptx.to_src();
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(path.parent().unwrap())
                .and_then(|_| std::fs::write(&tmp, &ptx))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!("kernel cache {}: {e}", path.display());
            }
            ptx
        };
        let params = ptx_params(&ptx);
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("loading the kernel module: {e:?}"))?;
        let loaded = Arc::new(Loaded { module, params });
        self.modules.lock().unwrap().insert(src.hash, loaded.clone());
        Ok((loaded, cached))
    }

    /// Kernel `name` of `src` and its parameter sizes.
    fn function(&self, src: Src, name: &str) -> Result<(sys::CUfunction, Arc<[usize]>), String> {
        if let Some(k) = self.functions.lock().unwrap().get(&src.hash).and_then(|m| m.get(name)) {
            return Ok((k.f.cu_function(), k.params.clone()));
        }
        let (m, _) = self.load(src)?;
        let f = m.module.load_function(name).map_err(|_| format!("no kernel `{name}` in its source"))?;
        let params = m.params.get(name).cloned().ok_or_else(|| format!("no `.entry {name}` in its PTX"))?;
        let cu = f.cu_function();
        let kernel = Kernel { f, params: params.clone() };
        self.functions.lock().unwrap().entry(src.hash).or_default().insert(name.to_string(), kernel);
        Ok((cu, params))
    }

    /// Start recording every kernel and GEMM with CUDA events (`pith bench --profile`).
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap() = Some(Vec::new());
    }
    /// Stop recording; the GPU time per op name in ms, heaviest first (waits for the device).
    pub fn take_profile(&self) -> Result<Vec<(String, f64, usize)>, String> {
        let events = self.profile.lock().unwrap().take().unwrap_or_default();
        self.sync()?;
        let mut by: HashMap<String, (f64, usize)> = HashMap::new();
        for (name, a, b) in &events {
            let ms = a.elapsed_ms(b).map_err(|e| format!("profile: {e:?}"))? as f64;
            let e = by.entry(name.clone()).or_default();
            (e.0, e.1) = (e.0 + ms, e.1 + 1);
        }
        let mut v: Vec<(String, f64, usize)> = by.into_iter().map(|(n, (ms, c))| (n, ms, c)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }
    /// Run `f` (which enqueues work), timing it under `name` while profiling.
    fn timed<R>(&self, name: &str, f: impl FnOnce() -> R) -> R {
        if self.profile.lock().unwrap().is_none() {
            return f();
        }
        let ev = || match self.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!("profile: recording an event for {name}: {e:?}; {name} is left out");
                None
            }
        };
        let start = ev();
        let r = f();
        if let (Some(a), Some(b)) = (start, ev()) {
            if let Some(p) = self.profile.lock().unwrap().as_mut() {
                p.push((name.to_string(), a, b));
            }
        }
        r
    }

    /// Launch kernel `name` of `src` with `args` on the stream; `args` must fit its parameters.
    pub fn launch<'s>(
        &self,
        src: impl Into<Src<'s>>,
        name: &str,
        d: ([u32; 3], [u32; 3], u32),
        args: &[Arg],
    ) -> Result<(), String> {
        let (f, params) = self.function(src.into(), name).map_err(|e| format!("kernel `{name}`: {e}"))?;
        check_args(name, &params, args)?;
        let mut vals: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::U32(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
                Arg::I64(v) => v as u64,
            })
            .collect();
        // cuLaunchKernel reads each parameter's size from the kernel; little-endian u64 slots
        // hold 4-byte values in their first bytes.
        let mut ptrs: Vec<*mut std::ffi::c_void> = vals.iter_mut().map(|v| v as *mut u64 as *mut _).collect();
        let (g, b, shared) = d;
        if shared > 48 * 1024 {
            // Past 48 KiB of dynamic shared memory a kernel must opt in.
            let max = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            unsafe { drv::function::set_function_attribute(f, max, shared as i32) }
                .map_err(|e| format!("kernel `{name}`: {shared} bytes of shared memory: {e:?}"))?;
        }
        let stream = self.stream.cu_stream();
        self.timed(name, || unsafe {
            drv::launch_kernel(f, (g[0], g[1], g[2]), (b[0], b[1], b[2]), shared, stream, &mut ptrs)
        })
        .map_err(|e| format!("launching kernel `{name}`: {e:?}"))
    }

    /// An uninitialised device tensor.
    pub fn tensor(&self, shape: &[usize], dtype: DType) -> Result<DTensor, String> {
        let n: usize = shape.iter().product();
        let buf = self.pool.take(n * dtype.size())?;
        Ok(DTensor { t: Tensor::new(buf.ptr, dtype, Device::Cuda, shape), buf })
    }
    /// A zero-filled device tensor.
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<DTensor, String> {
        let t = self.tensor(shape, dtype)?;
        self.zero(&t)?;
        Ok(t)
    }
    pub fn zero(&self, t: &Tensor) -> Result<(), String> {
        let bytes = t.numel() * t.dtype.size();
        unsafe { drv::memset_d8_async(t.addr, 0, bytes, self.stream.cu_stream()) }.map_err(derr("memset"))
    }
    /// A device tensor holding `data` (4-byte elements as f32/i32 bits, or bf16 as u16).
    pub fn upload<T: Copy>(&self, data: &[T], shape: &[usize], dtype: DType) -> Result<DTensor, String> {
        assert_eq!(std::mem::size_of_val(data), shape.iter().product::<usize>() * dtype.size(), "upload size");
        let t = self.tensor(shape, dtype)?;
        self.copy_to_device(data, t.addr)?;
        Ok(t)
    }
    /// Copy host `data` to device address `dst` without waiting: small copies go through the
    /// pinned staging buffer, large ones (weights at start-up) straight from `data`.
    pub fn copy_to_device<T: Copy>(&self, data: &[T], dst: u64) -> Result<(), String> {
        let bytes = std::mem::size_of_val(data);
        let mut st = self.staging.lock().unwrap();
        let at = st.used.div_ceil(256) * 256;
        if bytes > st.cap / 4 || at + bytes > st.cap {
            drop(st);
            return unsafe { drv::memcpy_htod_async(dst, data, self.stream.cu_stream()) }.map_err(derr("upload"));
        }
        st.used = at + bytes;
        let pinned = unsafe { std::slice::from_raw_parts_mut((st.ptr + at) as *mut u8, bytes) };
        pinned.copy_from_slice(unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes) });
        unsafe { drv::memcpy_htod_async(dst, pinned, self.stream.cu_stream()) }.map_err(derr("upload"))
    }
    /// Copy `t` into `out` (waits for the device).
    pub fn download<T: Copy>(&self, t: &Tensor, out: &mut [T]) -> Result<(), String> {
        assert_eq!(std::mem::size_of_val(out), t.numel() * t.dtype.size(), "download size");
        unsafe { drv::memcpy_dtoh_async(out, t.addr, self.stream.cu_stream()) }.map_err(derr("download"))?;
        self.sync()
    }
    /// The values of an f32 or bf16 tensor as f32 (waits for the device).
    pub fn to_f32(&self, t: &Tensor) -> Result<Vec<f32>, String> {
        match t.dtype {
            DType::BF16 => {
                let mut v = vec![half::bf16::ZERO; t.numel()];
                self.download(t, &mut v)?;
                Ok(v.into_iter().map(|x| x.to_f32()).collect())
            }
            _ => {
                let mut v = vec![0f32; t.numel()];
                self.download(t, &mut v)?;
                Ok(v)
            }
        }
    }
    /// Device-to-device copy of `src` into `dst` (same byte size).
    pub fn copy_d2d(&self, src: &Tensor, dst: &Tensor) -> Result<(), String> {
        let bytes = src.numel() * src.dtype.size();
        assert_eq!(bytes, dst.numel() * dst.dtype.size(), "copy size");
        unsafe { drv::memcpy_dtod_async(dst.addr, src.addr, bytes, self.stream.cu_stream()) }.map_err(derr("copy"))
    }
    /// Wait for the device; the staging buffer is free again afterwards.
    pub fn sync(&self) -> Result<(), String> {
        let mut st = self.staging.lock().unwrap();
        self.stream.synchronize().map_err(|e| format!("GPU: {e:?}"))?;
        st.used = 0;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpu::sgemm;
    use crate::rng::Rng;
    use half::bf16;

    /// GPU 0; a GPU test fails without one (GPU tests are `#[ignore = "needs a CUDA GPU"]`: run
    /// them with `--ignored` on the GPU machine, docs/performance.md).
    pub fn gpu() -> Gpu {
        Gpu::open(0).unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"))
    }

    /// A block freed while another stream still has work queued comes back only once that
    /// stream has passed the free; a block of the compute stream alone comes back at once.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_block_used_on_another_stream_is_reused_only_after_it() {
        let gpu = gpu();
        let spin =
            "extern \"C\" __global__ void spin(long long n) { long long t = clock64(); while (clock64() - t < n) {} }";
        let side = gpu.ctx.new_stream().unwrap();
        // The side stream waits behind ~0.2 s of compute-stream work.
        gpu.launch(spin, "spin", dims(1, 1), &[Arg::I64(400_000_000)]).unwrap();
        side.wait(&gpu.stream.record_event(None).unwrap()).unwrap();
        let a = gpu.tensor(&[1 << 20], DType::F32).unwrap();
        let addr = a.addr;
        a.used_on(&side);
        drop(a);
        let b = gpu.tensor(&[1 << 20], DType::F32).unwrap();
        assert_ne!(b.addr, addr, "handed out again while the side stream was behind its free");
        side.synchronize().unwrap();
        let c = gpu.tensor(&[1 << 20], DType::F32).unwrap();
        assert_eq!(c.addr, addr, "the side stream passed the free");
        let b_addr = b.addr;
        drop(b);
        assert_eq!(gpu.tensor(&[1 << 20], DType::F32).unwrap().addr, b_addr, "compute stream only: at once");
    }

    /// The cache key is the content: the compile-time hash of a host source is its run-time
    /// hash, equal texts at two addresses share it, texts of one length that differ do not.
    #[test]
    fn kernel_sources_are_keyed_by_content() {
        for s in [src::NORM, src::ROPE, src::ATTENTION, src::ATTENTION_HOPPER, src::LOSS, src::ELEMENTWISE] {
            assert_eq!(s.hash, Src::from(String::from(s.text).as_str()).hash);
        }
        let (a, b) = ("x[0] = 1.0f;".to_string(), "x[0] = 1.0f;".to_string());
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(Src::from(a.as_str()).hash, Src::from(b.as_str()).hash);
        let texts = ["x[0] = 1.0f;", "x[0] = 2.0f;", "x[1] = 1.0f;", "x[0] = 1.0f; ", "y"];
        let mut hashes: Vec<u64> = texts.iter().map(|t| content_hash(t.as_bytes())).collect();
        hashes.extend((0..9).map(|n| content_hash(&vec![0u8; n])));
        let n = hashes.len();
        hashes.sort();
        hashes.dedup();
        assert_eq!(hashes.len(), n, "distinct texts must hash apart");
    }

    /// Parameter sizes read from PTX as NVRTC writes it, and the launch check against them.
    #[test]
    fn launch_arguments_are_checked_against_the_ptx() {
        let ptx = "//\n// Generated by NVIDIA NVVM Compiler\n.version 8.7\n.target sm_90\n.address_size 64\n\n\
                   \t// .globl\tscale_f32\n.visible .entry scale_f32(\n\
                   \t.param .u64 .ptr .global .align 4 scale_f32_param_0,\n\
                   \t.param .u64 scale_f32_param_1,\n\t.param .f32 scale_f32_param_2\n)\n.maxntid 256, 1, 1\n{\n\tret;\n}\n\
                   .visible .entry empty()\n{\n\tret;\n}\n\
                   .visible .entry odd(\n\t.param .u8 odd_param_0,\n\t.param .align 8 .b8 odd_param_1[24]\n)\n{\n}\n";
        let p = ptx_params(ptx);
        assert_eq!(p.len(), 3);
        assert_eq!((&*p["scale_f32"], &*p["empty"], &*p["odd"]), (&[8, 8, 4][..], &[][..], &[1, 24][..]));
        let ok = [Arg::Ptr(16), Arg::I64(4), Arg::F32(2.0)];
        check_args("scale_f32", &p["scale_f32"], &ok).unwrap();
        let e = check_args("scale_f32", &p["scale_f32"], &ok[..2]).unwrap_err();
        assert_eq!(e, "kernel `scale_f32` takes 3 arguments, the launch passes 2");
        let e = check_args("scale_f32", &p["scale_f32"], &[Arg::Ptr(16), Arg::I32(4), Arg::F32(2.0)]).unwrap_err();
        assert_eq!(e, "kernel `scale_f32`: argument 1 is I32(4) (4 bytes), the parameter has 8 bytes");
        let e = check_args("scale_f32", &p["scale_f32"], &[Arg::Ptr(16), Arg::I64(4), Arg::Ptr(0)]).unwrap_err();
        assert!(e.contains("argument 2 is Ptr(0) (8 bytes), the parameter has 4 bytes"), "{e}");
        check_args("empty", &p["empty"], &[]).unwrap();
        let e = check_args("odd", &p["odd"], &[Arg::U32(1), Arg::I64(0)]).unwrap_err();
        assert!(e.contains("argument 1 is I64(0) (8 bytes), the parameter has 24 bytes"), "{e}");
    }

    /// On the device: a launch with the wrong arguments fails naming the kernel, and a kernel
    /// is found by its source's content, not its address.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn launches_are_checked_and_cached_by_content() {
        let g = gpu();
        let x = g.zeros(&[4], DType::F32).unwrap();
        let e = g.launch(src::ELEMENTWISE, "scale_f32", dims(1, 32), &[x.arg(), Arg::I64(4)]).unwrap_err();
        assert_eq!(e, "kernel `scale_f32` takes 3 arguments, the launch passes 2");
        let e = g.launch(src::ELEMENTWISE, "scale_f32", dims(1, 32), &[x.arg(), Arg::I32(4), Arg::F32(2.0)]);
        assert!(e.unwrap_err().contains("argument 1 is I32(4) (4 bytes), the parameter has 8 bytes"));
        let kernel = |v: &str| format!("extern \"C\" __global__ void set(float* x) {{ x[0] = {v}; }}");
        let run = |text: &str| {
            g.launch(text, "set", dims(1, 1), &[x.arg()]).unwrap();
            g.to_f32(&x).unwrap()[0]
        };
        let a = kernel("1.0f");
        assert_eq!((run(&a), run(&a.clone())), (1.0, 1.0));
        drop(a);
        let b = kernel("2.0f"); // same length: often at a's address
        assert_eq!(run(&b), 2.0);
        assert!(g.module(b.as_str()).unwrap().1, "loaded once, then cached");
        g.launch(src::ELEMENTWISE, "scale_f32", dims(1, 32), &[x.arg(), Arg::I64(4), Arg::F32(3.0)]).unwrap();
        assert_eq!(g.to_f32(&x).unwrap(), [6.0, 0.0, 0.0, 0.0]);
    }

    /// Random bf16-representable values (as f32) and their bf16 device copy.
    pub fn rand_bf16(g: &Gpu, rng: &mut Rng, shape: &[usize], std: f32) -> (Vec<f32>, DTensor) {
        let n: usize = shape.iter().product();
        let h: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.normal() * std)).collect();
        (h.iter().map(|v| v.to_f32()).collect(), g.upload(&h, shape, DType::BF16).unwrap())
    }

    /// max |got − want| / max(|want|, 1).
    pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max)
    }

    /// cuBLAS GEMM (bf16 in, f32 out, every transpose) against the CPU sgemm. Tolerance 1e-3:
    /// inputs are exact in bf16, so only the fp32 summation order differs.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gemm_matches_cpu_for_all_transposes() {
        let g = gpu();
        let (m, k, n) = (37, 70, 23);
        let mut rng = Rng::new(1);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let (a, da) = rand_bf16(&g, &mut rng, &if ta { [k, m] } else { [m, k] }, 1.0);
            let (b, db) = rand_bf16(&g, &mut rng, &if tb { [n, k] } else { [k, n] }, 1.0);
            let c = g.zeros(&[m, n], DType::F32).unwrap();
            g.gemm(&da, &db, &c, ta, tb, 1.0, 0.0).unwrap();
            let mut want = vec![0.0; m * n];
            sgemm(m, k, n, 1.0, &a, ta, &b, tb, 0.0, &mut want);
            let err = rel_err(&g.to_f32(&c).unwrap(), &want);
            println!("gemm ta={ta} tb={tb}: max relative error {err:.2e}");
            assert!(err < 1e-3, "{err}");
        }
    }

    /// The strided-batched GEMM against one plain GEMM per batch, for every transpose, bf16 and f32
    /// inputs, f32 and bf16 outputs, alpha 1.5 and beta 0.5 onto a random c. Same cuBLAS math, so
    /// only the summation order may differ: 1e-5 for f32 outputs, one bf16 ulp for bf16 ones.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn gemm_batched_matches_a_loop_of_gemms() {
        let g = gpu();
        let (b, m, k, n) = (5, 19, 40, 13);
        let mut rng = Rng::new(4);
        for (ab, ct) in [(DType::BF16, DType::F32), (DType::BF16, DType::BF16), (DType::F32, DType::F32)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let sa = if ta { [b, k, m] } else { [b, m, k] };
                let sb = if tb { [b, n, k] } else { [b, k, n] };
                let (a, da) = rand_bf16(&g, &mut rng, &sa, 1.0);
                let (bv, db) = rand_bf16(&g, &mut rng, &sb, 1.0);
                let (c0, _) = rand_bf16(&g, &mut rng, &[b, m, n], 1.0);
                let as_ = |v: &[f32], shape: &[usize], d: DType| match d {
                    DType::BF16 => g.upload(&v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(), shape, d),
                    _ => g.upload(v, shape, d),
                };
                let (da, db) = match ab {
                    DType::F32 => (as_(&a, &sa, ab).unwrap(), as_(&bv, &sb, ab).unwrap()),
                    _ => (da, db),
                };
                let (c, want) = (as_(&c0, &[b, m, n], ct).unwrap(), as_(&c0, &[b, m, n], ct).unwrap());
                g.gemm_batched(&da, &db, &c, ta, tb, 1.5, 0.5).unwrap();
                let at = |t: &Tensor, i: usize, r: usize, cl: usize| {
                    Tensor::new(t.addr + (i * r * cl * t.dtype.size()) as u64, t.dtype, Device::Cuda, &[r, cl])
                };
                for i in 0..b {
                    let (ai, bi, ci) = (at(&da, i, sa[1], sa[2]), at(&db, i, sb[1], sb[2]), at(&want, i, m, n));
                    g.gemm(&ai, &bi, &ci, ta, tb, 1.5, 0.5).unwrap();
                }
                let err = rel_err(&g.to_f32(&c).unwrap(), &g.to_f32(&want).unwrap());
                println!("gemm_batched {ab:?}->{ct:?} ta={ta} tb={tb}: max relative error vs gemm loop {err:.2e}");
                assert!(err <= if ct == DType::BF16 { 1.0 / 128.0 } else { 1e-5 }, "{err}");
            }
        }
        let (x, y) = (g.zeros(&[2, 3, 4], DType::F32).unwrap(), g.zeros(&[3, 4, 5], DType::F32).unwrap());
        let c = g.zeros(&[2, 3, 5], DType::F32).unwrap();
        let e = g.gemm_batched(&x, &y, &c, false, false, 1.0, 0.0).unwrap_err();
        assert!(e.starts_with("gemm_batched: 2 × op(a) 3x4"), "{e}");
    }

    /// The grouped GEMM (plain, transposed weights, accumulate) and its weight gradient against
    /// the CPU per expert, uneven groups with one empty. Tolerance: one bf16 ulp (2⁻⁷) for bf16
    /// outputs and for the weight gradient (cuBLAS's grouped GEMM writes it in bf16 before the fp32
    /// add). H200: 3.8e-3, 3.9e-3, 3.9e-3.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn grouped_gemm_and_wgrad_match_cpu() {
        let g = gpu();
        let (e, k, n) = (8, 96, 40);
        let rows = [5, 0, 17, 3, 64, 1, 9, 30];
        let mut off = vec![0];
        rows.iter().for_each(|r| off.push(off.last().unwrap() + r));
        let total = off[e];
        let mut rng = Rng::new(3);
        let (x, dx) = rand_bf16(&g, &mut rng, &[total, k], 1.0);
        let (w, dw) = rand_bf16(&g, &mut rng, &[e, k, n], 0.1);
        let y = g.zeros(&[total, n], DType::BF16).unwrap();
        g.grouped_gemm(&dx, &dw, &y, &off, false, false).unwrap();
        // Transposed: x2 [total, n] · w[g]ᵀ (w [E,K,N] seen as [E,N',K'] with N'=k, K'=n).
        let (x2, dx2) = rand_bf16(&g, &mut rng, &[total, n], 1.0);
        let y2 = g.zeros(&[total, k], DType::BF16).unwrap();
        g.grouped_gemm(&dx2, &dw, &y2, &off, true, false).unwrap();
        let gw = g.zeros(&[e, k, n], DType::F32).unwrap();
        g.grouped_wgrad(&dx, &dx2, &gw, &off).unwrap();
        let (got, got2, got_w) = (g.to_f32(&y).unwrap(), g.to_f32(&y2).unwrap(), g.to_f32(&gw).unwrap());
        let (mut want, mut want2, mut want_w) = (vec![0.0; total * n], vec![0.0; total * k], vec![0.0; e * k * n]);
        for gi in 0..e {
            let (r0, r1) = (off[gi], off[gi + 1]);
            let wg = &w[gi * k * n..(gi + 1) * k * n];
            sgemm(r1 - r0, k, n, 1.0, &x[r0 * k..r1 * k], false, wg, false, 0.0, &mut want[r0 * n..r1 * n]);
            sgemm(r1 - r0, n, k, 1.0, &x2[r0 * n..r1 * n], false, wg, true, 0.0, &mut want2[r0 * k..r1 * k]);
            let dwg = &mut want_w[gi * k * n..(gi + 1) * k * n];
            sgemm(k, r1 - r0, n, 1.0, &x[r0 * k..r1 * k], true, &x2[r0 * n..r1 * n], false, 0.0, dwg);
        }
        let (e1, e2, e3) = (rel_err(&got, &want), rel_err(&got2, &want2), rel_err(&got_w, &want_w));
        println!("grouped gemm vs cpu: {e1:.2e}, transposed {e2:.2e}, wgrad {e3:.2e}");
        assert!(e1 < 1.0 / 128.0 && e2 < 1.0 / 128.0 && e3 < 1.0 / 128.0, "{e1} {e2} {e3}");
    }

    /// kernels/grouped_gemm.cu (Hopper; shapes with K % 128 == 0 and N % 128 == 0) against the
    /// CPU: plain, transposed weights, accumulating into y, and the weight gradient accumulated
    /// into f32; groups empty, partial and over one 128-row tile. Tolerance: one bf16 ulp (2⁻⁷)
    /// of relative error (the f32 weight gradient: 1e-3).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tiled_grouped_gemm_matches_cpu() {
        let g = gpu();
        let (e, k, n) = (6, 256, 512);
        let rows = [300, 0, 17, 128, 1, 129];
        let mut off = vec![0];
        rows.iter().for_each(|r| off.push(off.last().unwrap() + r));
        let total = off[e];
        let mut rng = Rng::new(4);
        let (x, dx) = rand_bf16(&g, &mut rng, &[total, k], 1.0);
        let (w, dw) = rand_bf16(&g, &mut rng, &[e, k, n], 0.1);
        let (y0, dy0) = rand_bf16(&g, &mut rng, &[total, n], 1.0);
        let (x2, dx2) = rand_bf16(&g, &mut rng, &[total, n], 1.0);
        let y = g.zeros(&[total, n], DType::BF16).unwrap();
        g.grouped_gemm(&dx, &dw, &y, &off, false, false).unwrap();
        g.grouped_gemm(&dx, &dw, &dy0, &off, false, true).unwrap();
        let y2 = g.zeros(&[total, k], DType::BF16).unwrap();
        g.grouped_gemm(&dx2, &dw, &y2, &off, true, false).unwrap();
        let (mut want, mut want2) = (vec![0.0; total * n], vec![0.0; total * k]);
        for gi in 0..e {
            let (r0, r1) = (off[gi], off[gi + 1]);
            let wg = &w[gi * k * n..(gi + 1) * k * n];
            sgemm(r1 - r0, k, n, 1.0, &x[r0 * k..r1 * k], false, wg, false, 0.0, &mut want[r0 * n..r1 * n]);
            sgemm(r1 - r0, n, k, 1.0, &x2[r0 * n..r1 * n], false, wg, true, 0.0, &mut want2[r0 * k..r1 * k]);
        }
        let want_acc: Vec<f32> = want.iter().zip(&y0).map(|(a, b)| a + b).collect();
        // dw[g] += x_gᵀ · x2_g on top of random values.
        let mut want_w: Vec<f32> = (0..e * k * n).map(|i| (i % 7) as f32 * 0.25).collect();
        let gw = g.upload(&want_w, &[e, k, n], DType::F32).unwrap();
        g.grouped_wgrad(&dx, &dx2, &gw, &off).unwrap();
        for gi in 0..e {
            let (r0, r1) = (off[gi], off[gi + 1]);
            let dwg = &mut want_w[gi * k * n..(gi + 1) * k * n];
            sgemm(k, r1 - r0, n, 1.0, &x[r0 * k..r1 * k], true, &x2[r0 * n..r1 * n], false, 1.0, dwg);
        }
        let got = |t: &Tensor| g.to_f32(t).unwrap();
        let (e1, e2, e3) = (rel_err(&got(&y), &want), rel_err(&got(&y2), &want2), rel_err(&got(&dy0), &want_acc));
        let e4 = rel_err(&got(&gw), &want_w);
        println!("tiled grouped gemm vs cpu: {e1:.2e}, transposed {e2:.2e}, accumulate {e3:.2e}, wgrad {e4:.2e}");
        assert!(e1 < 1.0 / 128.0 && e2 < 1.0 / 128.0 && e3 < 1.0 / 128.0 && e4 < 1e-3, "{e1} {e2} {e3} {e4}");
    }
}

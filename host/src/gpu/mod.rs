//! The CUDA device: context, one stream, cuBLAS, kernels compiled by NVRTC and a caching
//! allocator. cudarc loads the driver and libraries at run time, so this builds and runs on
//! machines without CUDA (`Gpu::open` then fails in one line).
//!
//! - Kernels: CUDA C source (the host's `kernels/*.cu` or a plugin's) compiled for the device's
//!   architecture on first use, cached on disk by hash of (source, arch) in `$PITH_KERNEL_CACHE`
//!   or `~/.cache/pith/kernels`, and in memory by the source's address.
//! - Memory: every buffer comes from [`Pool`], which keeps freed blocks by size and hands them out
//!   again, so the steady-state step calls no cudaMalloc. All work runs on one stream, so reusing a
//!   block freed by an earlier op is ordered after that op (PyTorch's caching allocator rule).
//! - GEMMs: gemm.rs (cuBLAS `cublasGemmEx` and the experts' `cublasGemmGroupedBatchedEx`).

pub mod gemm;
pub mod kernels;
pub mod model;
pub mod ops;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as drv, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream};
use pith_plugin_api::{Arg, DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// `sm_XY` of the device, what NVRTC compiles for.
    pub arch: &'static str,
    pub pool: Arc<Pool>,
    /// Loaded modules by source hash, and functions by (source address, length, name).
    modules: Mutex<HashMap<u64, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(usize, usize, String), CudaFunction>>,
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

/// The host's kernel sources, embedded in the binary.
pub mod src {
    pub const NORM: &str = include_str!("../../../kernels/norm.cu");
    pub const ROPE: &str = include_str!("../../../kernels/rope.cu");
    pub const ATTENTION: &str = include_str!("../../../kernels/attention.cu");
    pub const LOSS: &str = include_str!("../../../kernels/cross_entropy.cu");
    pub const ELEMENTWISE: &str = include_str!("../../../kernels/elementwise.cu");
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
        let st = self.staging.lock().unwrap();
        if self.ctx.bind_to_thread().is_ok() {
            unsafe { drv::free_host(st.ptr as *mut std::ffi::c_void) }.ok();
        }
    }
}

/// FNV-1a over bytes.
fn fnv(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
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
        let ptr = match s.free.get_mut(&size).and_then(|v| v.pop()) {
            Some(p) => p,
            None => {
                let mut p = unsafe { drv::malloc_sync(size) };
                if p.is_err() {
                    // Out of memory with blocks cached: give them back and try once more.
                    drop(s);
                    self.release_cached();
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
        Ok(Buf { ptr, size, pool: self.clone() })
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
    /// Give cached blocks back to the driver.
    pub fn release_cached(&self) {
        let mut s = self.state.lock().unwrap();
        let cached: Vec<(usize, Vec<u64>)> = s.free.drain().collect();
        for (sz, list) in cached {
            for q in list {
                unsafe { drv::free_sync(q) }.ok();
                s.reserved -= sz;
            }
        }
    }
    pub fn reset_peaks(&self) {
        let mut s = self.state.lock().unwrap();
        (s.peak_reserved, s.peak_in_use) = (s.reserved, s.in_use);
    }
}

pub fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// A device block from the pool; returned to it on drop.
pub struct Buf {
    pub ptr: u64,
    size: usize,
    pool: Arc<Pool>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        let mut s = self.pool.state.lock().unwrap();
        s.in_use -= self.size;
        s.free.entry(self.size).or_default().push(self.ptr);
    }
}

/// A device tensor that owns its memory: the view `t` plus the block behind it.
pub struct DTensor {
    pub t: Tensor,
    _buf: Buf,
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
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| format!("GPU {ordinal}: {e:?}"))?;
        let arch = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
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
    /// whether the disk cache had it.
    pub fn module(&self, src: &str) -> Result<(Arc<CudaModule>, bool), String> {
        let key = fnv(src.bytes().chain(self.arch.bytes()));
        if let Some(m) = self.modules.lock().unwrap().get(&key) {
            return Ok((m.clone(), true));
        }
        let path = cache_dir().join(format!("{}-{key:016x}.ptx", self.arch));
        let cached = path.is_file();
        let ptx = if cached {
            cudarc::nvrtc::Ptx::from_src(
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?,
            )
        } else {
            let cuda_home = std::env::var("CUDA_HOME").unwrap_or_else(|_| "/usr/local/cuda".into());
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some(self.arch),
                include_paths: vec![format!("{cuda_home}/include")],
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    format!("NVRTC: {}", log.to_string_lossy().trim())
                }
                e => format!("NVRTC: {e:?}"),
            })?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(path.parent().unwrap())
                .and_then(|_| std::fs::write(&tmp, ptx.to_src()))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!("kernel cache {}: {e}", path.display());
            }
            ptx
        };
        let module = self.ctx.load_module(ptx).map_err(|e| format!("loading the kernel module: {e:?}"))?;
        self.modules.lock().unwrap().insert(key, module.clone());
        Ok((module, cached))
    }

    fn function(&self, src: &str, name: &str) -> Result<sys::CUfunction, String> {
        let key = (src.as_ptr() as usize, src.len(), name.to_string());
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.cu_function());
        }
        let (m, _) = self.module(src)?;
        let f = m.load_function(name).map_err(|_| format!("no kernel `{name}` in its source"))?;
        let cu = f.cu_function();
        self.functions.lock().unwrap().insert(key, f);
        Ok(cu)
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
        let ev = || self.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).ok();
        let start = ev();
        let r = f();
        if let (Some(a), Some(b)) = (start, ev()) {
            if let Some(p) = self.profile.lock().unwrap().as_mut() {
                p.push((name.to_string(), a, b));
            }
        }
        r
    }

    /// Launch kernel `name` of `src` with `args` on the stream.
    pub fn launch(&self, src: &str, name: &str, d: ([u32; 3], [u32; 3], u32), args: &[Arg]) -> Result<(), String> {
        let f = self.function(src, name).map_err(|e| format!("kernel `{name}`: {e}"))?;
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
        Ok(DTensor { t: Tensor::new(buf.ptr, dtype, Device::Cuda, shape), _buf: buf })
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
mod tests {
    use super::*;
    use crate::cpu::sgemm;
    use crate::rng::Rng;
    use half::bf16;

    /// The GPU, or None after printing why the test is skipped.
    pub fn gpu() -> Option<Gpu> {
        match Gpu::open(0) {
            Ok(g) => Some(g),
            Err(e) => {
                println!("skipped: no GPU here ({e})");
                None
            }
        }
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
    fn gemm_matches_cpu_for_all_transposes() {
        let Some(g) = gpu() else { return };
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

    /// The grouped GEMM (plain, transposed weights, accumulate) and its weight gradient against
    /// the CPU per expert, uneven groups with one empty. Tolerance: one bf16 ulp (2⁻⁷) for bf16
    /// outputs and for the weight gradient (cuBLAS's grouped GEMM writes it in bf16 before the fp32
    /// add). H200: 3.8e-3, 3.9e-3, 3.9e-3.
    #[test]
    fn grouped_gemm_and_wgrad_match_cpu() {
        let Some(g) = gpu() else { return };
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
}

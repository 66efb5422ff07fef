//! The CUDA device (groundwork for the CUDA backend): opening a GPU with a one-line error when
//! there is none, kernels from `kernels/*.cu` compiled by NVRTC for the device's architecture and
//! cached on disk by (source, arch) hash, and the expert grouped GEMM. cudarc loads the driver
//! and libraries at run time, so this builds and runs on machines without CUDA.
//!
//! Grouped GEMM calls `cublasGemmGroupedBatchedEx` directly with the pointer arrays in device
//! memory: cudarc 0.19's safe `GroupedGemm` wrapper passes host arrays and faults on the H200
//! (docs/performance.md has the measurement).

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::path::PathBuf;
use std::sync::Arc;

pub struct Cuda {
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    /// `sm_XY` of the device, what NVRTC compiles for.
    pub arch: &'static str,
}

/// The kernel sources, by file name.
pub const KERNELS: &[(&str, &str)] = &[("rmsnorm.cu", include_str!("../../kernels/rmsnorm.cu"))];

/// Where compiled kernels are kept: `$PITH_KERNEL_CACHE`, else `~/.cache/pith/kernels`.
fn cache_dir() -> PathBuf {
    match std::env::var_os("PITH_KERNEL_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/pith/kernels"),
    }
}

impl Cuda {
    /// Open GPU `ordinal`, or say in one line what was looked for and not found.
    pub fn open(ordinal: usize) -> Result<Cuda, String> {
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
        Ok(Cuda { stream, blas, arch })
    }

    /// Function `name` of kernel file `file` (one of [`KERNELS`]), compiled for this device on
    /// first use and cached on disk; returns it and whether the cache had it.
    pub fn function(&self, file: &str, name: &str) -> Result<(CudaFunction, bool), String> {
        let src = KERNELS
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(_, s)| *s)
            .ok_or_else(|| format!("no kernel file {file}"))?;
        // FNV-1a of (source, arch): a changed kernel or another GPU gets its own entry.
        let key = src
            .bytes()
            .chain(self.arch.bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let path = cache_dir().join(format!("{}-{}-{key:016x}.ptx", file.trim_end_matches(".cu"), self.arch));
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
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| format!("kernels/{file}: {e:?}"))?;
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let written = std::fs::create_dir_all(path.parent().unwrap())
                .and_then(|_| std::fs::write(&tmp, ptx.to_src()))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!("kernel cache {}: {e}", path.display());
            }
            ptx
        };
        let module = self.stream.context().load_module(ptx).map_err(|e| format!("kernels/{file}: {e:?}"))?;
        Ok((module.load_function(name).map_err(|e| format!("kernels/{file}: {name}: {e:?}"))?, cached))
    }

    /// RMSNorm forward over rows of `h` (bf16 x, w, y; fp32 rstd per row): kernels/rmsnorm.cu.
    pub fn rmsnorm_fwd(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        rstd: &mut CudaSlice<f32>,
        h: usize,
        eps: f32,
    ) -> Result<(), String> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        let (f, _) = self.function("rmsnorm.cu", "rmsnorm_fwd")?;
        let rows = x.len() / h;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 256 * 4 };
        let h32 = h as i32;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(y).arg(rstd).arg(&h32).arg(&eps);
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("rmsnorm_fwd: {e:?}"))
    }

    /// For each expert e with rows offsets[e]..offsets[e+1] of x [N,K] and y [N,N2] (row-major):
    /// y_e = x_e · w[e], w [E,K,N2]; bf16 in and out, fp32 accumulation. `offsets` is on the host.
    pub fn grouped_gemm(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        offsets: &[usize],
        k: usize,
        n: usize,
    ) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Debug| format!("grouped gemm: {e:?}");
        let experts: Vec<usize> = (0..offsets.len() - 1).filter(|&e| offsets[e + 1] > offsets[e]).collect();
        if experts.is_empty() {
            return Ok(());
        }
        let st = &self.stream;
        let (xp, _gx) = x.device_ptr(st);
        let (wp, _gw) = w.device_ptr(st);
        let (yp, _gy) = y.device_ptr_mut(st);
        let bytes = std::mem::size_of::<bf16>() as u64;
        // Row-major y_e = x_e·w_e is column-major y_eᵀ = w_eᵀ·x_eᵀ: A = w_e (ld n), B = x_e (ld k).
        let a: Vec<u64> = experts.iter().map(|&e| wp + (e * k * n) as u64 * bytes).collect();
        let b: Vec<u64> = experts.iter().map(|&e| xp + (offsets[e] * k) as u64 * bytes).collect();
        let c: Vec<u64> = experts.iter().map(|&e| yp + (offsets[e] * n) as u64 * bytes).collect();
        let (ad, bd, cd) = (st.clone_htod(&a), st.clone_htod(&b), st.clone_htod(&c));
        let (ad, bd, cd) = (ad.map_err(|e| err(&e))?, bd.map_err(|e| err(&e))?, cd.map_err(|e| err(&e))?);
        let g = experts.len();
        let ops = vec![sys::cublasOperation_t::CUBLAS_OP_N; g];
        let rows: Vec<i32> = experts.iter().map(|&e| (offsets[e + 1] - offsets[e]) as i32).collect();
        let (ns, ks) = (vec![n as i32; g], vec![k as i32; g]);
        let (alpha, beta, ones) = (vec![1.0f32; g], vec![0.0f32; g], vec![1i32; g]);
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let ((a, _ga), (b, _gb), (c, _gc)) = (ad.device_ptr(st), bd.device_ptr(st), cd.device_ptr(st));
        unsafe {
            sys::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                ops.as_ptr(),
                ops.as_ptr(),
                ns.as_ptr(),
                rows.as_ptr(),
                ks.as_ptr(),
                alpha.as_ptr() as _,
                a as _,
                bf,
                ns.as_ptr(),
                b as _,
                bf,
                ks.as_ptr(),
                beta.as_ptr() as _,
                c as _,
                bf,
                ns.as_ptr(),
                g as i32,
                ones.as_ptr(),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
            .result()
            .map_err(|e| err(&e))?;
        }
        // The pointer arrays must outlive the call, which is asynchronous.
        st.synchronize().map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::sgemm;
    use crate::rng::Rng;

    /// kernels/rmsnorm.cu against the CPU backend's RMSNorm on random bf16 rows, compiled once
    /// and then loaded from the disk cache. Tolerance: one bf16 ulp (2⁻⁷ relative): rounding the
    /// output costs up to half of one, the fp32 reduction order a little more. H200: 3.9e-3.
    #[test]
    fn rmsnorm_kernel_matches_cpu_and_is_cached() {
        let cuda = match Cuda::open(0) {
            Ok(c) => c,
            Err(e) => {
                println!("skipped: no GPU here ({e})");
                return;
            }
        };
        let dir = std::env::temp_dir().join(format!("pith-kernels-{}", std::process::id()));
        std::env::set_var("PITH_KERNEL_CACHE", &dir);
        let (rows, h) = (37, 300);
        let mut rng = Rng::new(5);
        let xh: Vec<bf16> = (0..rows * h).map(|_| bf16::from_f32(rng.normal() * 3.0)).collect();
        let wh: Vec<bf16> = (0..h).map(|_| bf16::from_f32(1.0 + 0.2 * rng.normal())).collect();
        let st = &cuda.stream;
        let (x, w) = (st.clone_htod(&xh).unwrap(), st.clone_htod(&wh).unwrap());
        let (mut y, mut rstd) = (st.alloc_zeros::<bf16>(rows * h).unwrap(), st.alloc_zeros::<f32>(rows).unwrap());
        assert!(!cuda.function("rmsnorm.cu", "rmsnorm_fwd").unwrap().1, "cache should start empty");
        cuda.rmsnorm_fwd(&x, &w, &mut y, &mut rstd, h, 1e-6).unwrap();
        assert!(cuda.function("rmsnorm.cu", "rmsnorm_fwd").unwrap().1, "second load should hit the cache");
        let (got, got_rstd) = (st.clone_dtoh(&y).unwrap(), st.clone_dtoh(&rstd).unwrap());
        let xf: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let wf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
        let (mut want, mut want_rstd) = (vec![0.0; rows * h], vec![0.0; rows]);
        crate::layers::rmsnorm_fwd(&xf, &wf, 1e-6, &mut want, &mut want_rstd);
        let worst = got.iter().zip(&want).map(|(g, w)| (g.to_f32() - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max);
        let worst_rstd = got_rstd.iter().zip(&want_rstd).map(|(g, w)| (g - w).abs() / w).fold(0f32, f32::max);
        println!("rmsnorm kernel vs cpu: max relative error {worst:.2e} (rstd {worst_rstd:.2e})");
        assert!(worst < 1.0 / 128.0 && worst_rstd < 1e-5, "{worst} {worst_rstd}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The grouped GEMM on the GPU against the CPU backend's sgemm per expert, on random bf16
    /// inputs with uneven groups (one empty). Tolerance: one bf16 ulp (2⁻⁷ relative): the output's
    /// rounding plus cuBLAS's own reduction order. Measured on the H200: 3.8e-3.
    #[test]
    fn grouped_gemm_matches_cpu() {
        let cuda = match Cuda::open(0) {
            Ok(c) => c,
            Err(e) => {
                println!("skipped: no GPU here ({e})");
                return;
            }
        };
        let (e, k, n) = (8, 96, 40);
        let rows = [5, 0, 17, 3, 64, 1, 9, 30];
        let mut offsets = vec![0];
        rows.iter().for_each(|r| offsets.push(offsets.last().unwrap() + r));
        let total = offsets[e];
        let mut rng = Rng::new(3);
        let xh: Vec<bf16> = (0..total * k).map(|_| bf16::from_f32(rng.normal())).collect();
        let wh: Vec<bf16> = (0..e * k * n).map(|_| bf16::from_f32(rng.normal() * 0.1)).collect();
        let st = &cuda.stream;
        let (x, w) = (st.clone_htod(&xh).unwrap(), st.clone_htod(&wh).unwrap());
        let mut y = st.alloc_zeros::<bf16>(total * n).unwrap();
        cuda.grouped_gemm(&x, &w, &mut y, &offsets, k, n).unwrap();
        let got = st.clone_dtoh(&y).unwrap();
        let (xf, wf): (Vec<f32>, Vec<f32>) =
            (xh.iter().map(|v| v.to_f32()).collect(), wh.iter().map(|v| v.to_f32()).collect());
        let mut worst = 0f32;
        for g in 0..e {
            let (r0, r1) = (offsets[g], offsets[g + 1]);
            let mut want = vec![0.0; (r1 - r0) * n];
            let wg = &wf[g * k * n..(g + 1) * k * n];
            sgemm(r1 - r0, k, n, 1.0, &xf[r0 * k..r1 * k], false, wg, false, 0.0, &mut want);
            for (i, v) in want.iter().enumerate() {
                let d = (got[r0 * n + i].to_f32() - v).abs() / v.abs().max(1.0);
                worst = worst.max(d);
            }
        }
        println!("grouped gemm vs cpu: max relative error {worst:.2e}");
        assert!(worst < 1.0 / 128.0, "max relative error {worst}");
    }
}

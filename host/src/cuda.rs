//! The CUDA device (groundwork for the CUDA backend): opening a GPU with a one-line error when
//! there is none, and the expert grouped GEMM. cudarc loads the driver and libraries at run
//! time, so this builds and runs on machines without CUDA.
//!
//! Grouped GEMM calls `cublasGemmGroupedBatchedEx` directly with the pointer arrays in device
//! memory: cudarc 0.19's safe `GroupedGemm` wrapper passes host arrays and faults on the H200
//! (docs/performance.md has the measurement).

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

pub struct Cuda {
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
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
        Ok(Cuda { stream, blas })
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

    /// The grouped GEMM on the GPU against the CPU backend's sgemm per expert, on random bf16
    /// inputs with uneven groups (one empty). Tolerance: two bf16 ulps (2⁻⁷ relative): the output's
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

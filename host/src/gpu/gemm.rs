//! cuBLAS on the device's stream: a row-major GEMM over tensor views (`cublasGemmEx`), its
//! batched form (`cublasGemmStridedBatchedEx`); the experts' grouped GEMMs through
//! kernels/grouped_gemm.cu (wgmma) on Hopper where the shape allows (K % 64 == 0, N % 128 == 0;
//! weight gradients K % 128 == 0), else
//! `cublasGemmGroupedBatchedEx` (pointer arrays on the device; cudarc's safe `GroupedGemm`
//! wrapper passes host arrays and faults on the H200).

use super::{src, Gpu};
use cudarc::cublas::sys as blas;
use pith_plugin_api::{Arg, DType, Tensor};

/// `PITH_GROUPED_GEMM=cublas` sends every grouped GEMM to cuBLAS (to compare the two paths).
fn wgmma_allowed() -> bool {
    static CUBLAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*CUBLAS.get_or_init(|| std::env::var("PITH_GROUPED_GEMM").is_ok_and(|v| v == "cublas"))
}

impl Gpu {
    /// c = alpha · op(a) · op(b) + beta · c on row-major 2-D views (a tensor of higher rank is
    /// [rows, last]): a and b both bf16 or both f32, c bf16 or f32, fp32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        let rc = |t: &Tensor| (t.numel() / t.dim(-1).max(1), t.dim(-1));
        let ((ar, ac), (br, bc), (cr, cc)) = (rc(a), rc(b), rc(c));
        let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if tb { (bc, br) } else { (br, bc) };
        if k != kb || cr != m || cc != n || a.dtype != b.dtype {
            return Err(format!(
                "gemm: op(a) {m}x{k} ({:?}) · op(b) {kb}x{n} ({:?}) into c {cr}x{cc}: shapes or dtypes do not fit",
                a.dtype, b.dtype
            ));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major c = op(a)·op(b) is column-major cᵀ = op(b)ᵀ·op(a)ᵀ.
        let p = Problem { m: n, n: m, k, a: b.addr, b: a.addr, c: c.addr };
        self.timed("cuBLAS gemm", || self.gemm_cm((tb, ta), &p, (bc, ac, n), (b.dtype, a.dtype, c.dtype), alpha, beta))
    }

    /// c[g] = alpha · op(a[g]) · op(b[g]) + beta · c[g] for each g of the leading dimension of 3-D
    /// row-major views (a [G,M,K] or [G,K,M] when `ta`, b [G,K,N] or [G,N,K] when `tb`, c [G,M,N]);
    /// dtypes as for [`Gpu::gemm`]. One cublasGemmStridedBatchedEx.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        ta: bool,
        tb: bool,
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        if a.rank != 3 || b.rank != 3 || c.rank != 3 {
            let (da, db, dc) = (a.dims(), b.dims(), c.dims());
            return Err(format!("gemm_batched: a {da:?}, b {db:?}, c {dc:?}: expected 3-D [G, rows, cols] tensors"));
        }
        let g = a.dim(0);
        let (m, k) = if ta { (a.dim(2), a.dim(1)) } else { (a.dim(1), a.dim(2)) };
        let (kb, n) = if tb { (b.dim(2), b.dim(1)) } else { (b.dim(1), b.dim(2)) };
        if b.dim(0) != g || c.dim(0) != g || k != kb || c.dim(1) != m || c.dim(2) != n || a.dtype != b.dtype {
            return Err(format!(
                "gemm_batched: {g} × op(a) {m}x{k} ({:?}) · {} × op(b) {kb}x{n} ({:?}) into c {:?} ({:?}): shapes or \
                 dtypes do not fit",
                a.dtype,
                b.dim(0),
                b.dtype,
                c.dims(),
                c.dtype
            ));
        }
        if [g, m, n, k].iter().any(|&d| d > i32::MAX as usize) {
            return Err(format!("gemm_batched: {g} × {m}x{k}x{n} exceeds cuBLAS's 32-bit sizes"));
        }
        if g == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major c[g] = op(a[g])·op(b[g]) is column-major c[g]ᵀ = op(b[g])ᵀ·op(a[g])ᵀ.
        let (lda, ldb, ldc) = (b.dim(2) as i32, a.dim(2) as i32, n as i32);
        let (sa, sb, sc) = ((k * n) as i64, (m * k) as i64, (m * n) as i64);
        let types = (a.dtype, b.dtype, c.dtype);
        // cuBLAS's A is our b, its B our a.
        let (at, bt, ct) = (cuda_type(b.dtype)?, cuda_type(a.dtype)?, cuda_type(c.dtype)?);
        self.timed("cuBLAS batched gemm", || unsafe {
            blas::cublasGemmStridedBatchedEx(
                *self.blas.handle(),
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as _,
                b.addr as _,
                at,
                lda,
                sa,
                a.addr as _,
                bt,
                ldb,
                sb,
                &beta as *const f32 as _,
                c.addr as _,
                ct,
                ldc,
                sc,
                g as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()
            .map_err(|e| format!("cublasGemmStridedBatchedEx {g} × {m}x{k}x{n} ta={ta} tb={tb} {types:?}: {e:?}"))
        })
    }

    /// One column-major cublasGemmEx: c = alpha·op(a)·op(b) + beta·c.
    fn gemm_cm(
        &self,
        trans: (bool, bool),
        p: &Problem,
        ld: (usize, usize, usize),
        types: (DType, DType, DType),
        alpha: f32,
        beta: f32,
    ) -> Result<(), String> {
        unsafe {
            blas::cublasGemmEx(
                *self.blas.handle(),
                op(trans.0),
                op(trans.1),
                p.m as i32,
                p.n as i32,
                p.k as i32,
                &alpha as *const f32 as _,
                p.a as _,
                cuda_type(types.0)?,
                ld.0 as i32,
                p.b as _,
                cuda_type(types.1)?,
                ld.1 as i32,
                &beta as *const f32 as _,
                p.c as _,
                cuda_type(types.2)?,
                ld.2 as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .result()
            .map_err(|e| format!("cublasGemmEx {}x{}x{} {trans:?} {types:?}: {e:?}", p.m, p.n, p.k))
        }
    }

    /// For each group g (rows offsets[g]..offsets[g+1] of x [N,K] and y [N,N2], bf16):
    /// y_g (+)= x_g · w[g] (w [G,K,N2]) or x_g · w[g]ᵀ when `trans_w` (w [G,N2,K]).
    pub fn grouped_gemm(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        offsets: &[usize],
        trans_w: bool,
        accumulate: bool,
    ) -> Result<(), String> {
        let (k, n) = (x.dim(-1), y.dim(-1));
        let g = offsets.len() - 1;
        if w.numel() != g * k * n || x.dtype != DType::BF16 || w.dtype != DType::BF16 || y.dtype != DType::BF16 {
            return Err(format!(
                "grouped gemm: w {:?} {:?} for {g} groups of {k}x{n}: expected bf16 x, w, y",
                w.dtype,
                w.dims()
            ));
        }
        if self.arch == "sm_90a" && k % 64 == 0 && n % 128 == 0 && wgmma_allowed() {
            let name = if trans_w { "grouped_gemm_nt" } else { "grouped_gemm_nn" };
            let tiles = |rows: usize| rows.div_ceil(128) * (n / 128);
            return self.grouped_kernel(name, (x, w, y), offsets, (k, n), tiles, accumulate);
        }
        // Column-major per group: y_gᵀ [N2, n_g] = op(w_g)ᵀ · x_gᵀ.
        let groups: Vec<Problem> = (0..g)
            .filter(|&e| offsets[e + 1] > offsets[e])
            .map(|e| Problem {
                m: n,
                n: offsets[e + 1] - offsets[e],
                k,
                a: w.addr + (e * k * n * 2) as u64,
                b: x.addr + (offsets[e] * k * 2) as u64,
                c: y.addr + (offsets[e] * n * 2) as u64,
            })
            .collect();
        let lda = if trans_w { k } else { n };
        let t = DType::BF16;
        self.grouped(&groups, (trans_w, false), (lda, k, n), (t, t, t), if accumulate { 1.0 } else { 0.0 })
    }

    /// One launch of kernel `name` of kernels/grouped_gemm.cu over every group's 128×128 tiles
    /// (`tiles(rows of the group)` each); the group offsets and each group's first tile go to the
    /// device with the launch.
    fn grouped_kernel(
        &self,
        name: &str,
        (x, w, out): (&Tensor, &Tensor, &Tensor),
        offsets: &[usize],
        (k, n): (usize, usize),
        tiles_of: impl Fn(usize) -> usize,
        accumulate: bool,
    ) -> Result<(), String> {
        let g = offsets.len() - 1;
        let mut meta: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
        let mut tiles = 0;
        meta.push(0);
        for e in 0..g {
            tiles += tiles_of(offsets[e + 1] - offsets[e]);
            meta.push(tiles as i32);
        }
        if tiles == 0 {
            return Ok(());
        }
        let dev = self.upload(&meta, &[meta.len()], DType::I32)?;
        let (offs, starts) = (dev.addr, dev.addr + 4 * (g as u64 + 1));
        let mut args = vec![x.arg(), w.arg(), out.arg(), Arg::Ptr(offs), Arg::Ptr(starts)];
        args.extend([g, k, n, accumulate as usize].map(|v| Arg::I32(v as i32)));
        // 3 stages of two 16 KiB tiles, and 1 KiB to align them to the 1024-byte swizzle atoms.
        let shared = 3 * 2 * 16 * 1024 + 1024;
        self.launch(src::GROUPED_GEMM, name, ([tiles as u32, 1, 1], [256, 1, 1], shared), &args)
        // `dev` returns to the pool here; reuse is ordered after this launch on the stream.
    }

    /// Weight gradient of a grouped GEMM: dw[g] (f32 [K,N2]) += x_gᵀ · dy_g (x, dy bf16),
    /// accumulated in f32: kernels/grouped_gemm.cu on Hopper, else one cuBLAS GEMM per group.
    pub fn grouped_wgrad(&self, x: &Tensor, dy: &Tensor, dw: &Tensor, offsets: &[usize]) -> Result<(), String> {
        let (k, n) = (x.dim(-1), dy.dim(-1));
        let g = offsets.len() - 1;
        if dw.numel() != g * k * n || dw.dtype != DType::F32 || x.dtype != DType::BF16 || dy.dtype != DType::BF16 {
            let got = (dw.dtype, dw.dims());
            return Err(format!("grouped wgrad: dw {got:?} for {g} groups of {k}x{n}: expected bf16 x, dy and f32 dw"));
        }
        if self.arch == "sm_90a" && k % 128 == 0 && n % 128 == 0 && wgmma_allowed() {
            let tiles = |rows: usize| if rows > 0 { (k / 128) * (n / 128) } else { 0 };
            return self.grouped_kernel("grouped_wgrad", (x, dy, dw), offsets, (k, n), tiles, true);
        }
        // Column-major per group: dw_gᵀ [N2, K] += dy_gᵀ · x_g, accumulated in f32 in place
        // (experts without rows get no product: their slots are left as they are). One GEMM per
        // expert: cublasGemmGroupedBatchedEx refuses bf16 inputs with an f32 output, and the
        // alternative (a bf16 product, then an add into dw) was slower on bench-1b
        // (docs/performance.md).
        let groups: Vec<Problem> = (0..g)
            .filter(|&e| offsets[e + 1] > offsets[e])
            .map(|e| Problem {
                m: n,
                n: k,
                k: offsets[e + 1] - offsets[e],
                a: dy.addr + (offsets[e] * n * 2) as u64,
                b: x.addr + (offsets[e] * k * 2) as u64,
                c: dw.addr + (e * k * n * 4) as u64,
            })
            .collect();
        let (t, f) = (DType::BF16, DType::F32);
        self.timed("cuBLAS gemm per expert (wgrad)", || {
            groups.iter().try_for_each(|p| self.gemm_cm((false, true), p, (n, k, n), (t, t, f), 1.0, 1.0))
        })
    }

    /// One cublasGemmGroupedBatchedEx over column-major problems c = op(a)·op(b) + beta·c that
    /// share transposes, leading dimensions and types (one problem per group).
    fn grouped(
        &self,
        groups: &[Problem],
        trans: (bool, bool),
        ld: (usize, usize, usize),
        types: (DType, DType, DType),
        beta: f32,
    ) -> Result<(), String> {
        let g = groups.len();
        if g == 0 {
            return Ok(());
        }
        // The pointer arrays live on the device: [a..., b..., c...].
        let ptrs: Vec<u64> = (0..3).flat_map(|j| groups.iter().map(move |p| [p.a, p.b, p.c][j])).collect();
        let arrays = self.upload(&ptrs, &[6 * g], DType::I32)?;
        let (a_arr, b_arr, c_arr) = (arrays.addr, arrays.addr + 8 * g as u64, arrays.addr + 16 * g as u64);
        let (ta, tb) = (vec![op(trans.0); g], vec![op(trans.1); g]);
        let col = |f: fn(&Problem) -> usize| groups.iter().map(|p| f(p) as i32).collect::<Vec<i32>>();
        let (m, n, k) = (col(|p| p.m), col(|p| p.n), col(|p| p.k));
        let (lda, ldb, ldc) = (vec![ld.0 as i32; g], vec![ld.1 as i32; g], vec![ld.2 as i32; g]);
        let (alpha, betas, ones) = (vec![1.0f32; g], vec![beta; g], vec![1i32; g]);
        let name = "cuBLAS grouped gemm";
        let (at, bt, ct) = (cuda_type(types.0)?, cuda_type(types.1)?, cuda_type(types.2)?);
        let grouped = self.timed(name, || unsafe {
            blas::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr() as _,
                a_arr as _,
                at,
                lda.as_ptr(),
                b_arr as _,
                bt,
                ldb.as_ptr(),
                betas.as_ptr() as _,
                c_arr as _,
                ct,
                ldc.as_ptr(),
                g as i32,
                ones.as_ptr(),
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
            .result()
        });
        match grouped {
            Ok(()) => Ok(()),
            // Some type/transpose combinations are refused by some cuBLAS versions: one GEMM per
            // group instead (correct, slower), said once per combination; a failure there names both.
            Err(cudarc::cublas::result::CublasError(blas::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                let refused =
                    format!("cublasGemmGroupedBatchedEx: CUBLAS_STATUS_NOT_SUPPORTED for trans {trans:?} {types:?}");
                static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
                let mut said = SAID.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if !said.contains(&refused) {
                    tracing::warn!("{refused}: one GEMM per group instead (slower)");
                    said.push(refused.clone());
                }
                drop(said);
                let name = format!("{name}, per-group fallback");
                self.timed(&name, || groups.iter().try_for_each(|p| self.gemm_cm(trans, p, ld, types, 1.0, beta)))
                    .map_err(|e| format!("{refused}, and the per-group fallback failed: {e}"))
            }
            Err(e) => Err(format!("cublasGemmGroupedBatchedEx ({g} groups, trans {trans:?}, {types:?}): {e:?}")),
        }
        // `arrays` returns to the pool here; reuse is ordered after this GEMM on the stream.
    }
}

/// One column-major GEMM problem: sizes and device addresses.
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    a: u64,
    b: u64,
    c: u64,
}

fn op(t: bool) -> blas::cublasOperation_t {
    if t {
        blas::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas::cublasOperation_t::CUBLAS_OP_N
    }
}

fn cuda_type(d: DType) -> Result<blas::cudaDataType_t, String> {
    match d {
        DType::F32 => Ok(blas::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(blas::cudaDataType_t::CUDA_R_16BF),
        DType::I32 => Err("GEMMs take f32 or bf16 tensors, not i32".into()),
    }
}

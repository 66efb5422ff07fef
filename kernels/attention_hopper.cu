// Causal flash attention forward and backward on Hopper's warpgroup MMA (sm_90a), FlashAttention-3
// style, for head sizes (64, 64) and (128, 128) without a window: same arguments, layouts, host
// duties and results as flash_attn_{fwd,bwd}_d64 / _d128 of kernels/attention.cu (read its header
// first), which the host uses for every other case and GPU.
//
// Launch (the host raises each kernel's dynamic shared memory limit):
//   flash_attn_fwd_wg_d{64,128}  grid (Hq, B, cdiv(S, 128))   block (256, 1, 1)  shared FWD_SMEM(D) + 1024
//   flash_attn_bwd_wg_d{64,128}  grid (Hkv, B, cdiv(S, 128))  block (256, 1, 1)  shared BWD_SMEM(D) + 1024
//
// Forward: a block owns 128 query rows of one (batch, query head), warpgroup w rows 64w..64w+63, Q
// in shared memory; it streams 128-key tiles of K and V (double-buffered: tile j+1 loads while j
// is computed) through S = Q K^T (wgmma m64n128k16, both operands in shared memory), the online
// softmax on the accumulators in registers, and O += P V (wgmma m64nDk16, P from registers, V
// MN-major). Only the diagonal tile is masked. Blocks run heaviest first.
//
// Backward: a block owns 128 keys of one (batch, kv head); warpgroup w (128 threads) owns keys
// 64w..64w+63 and works in the transposed frame (keys as MMA rows), looping over every query head of the group
// and every query tile of BM rows (BM = 128 for D = 64, 64 for D = 128) at or below the diagonal:
//   S^T = K Q^T, dP^T = V dO^T             wgmma m64nBMk16, both operands in shared memory
//   P^T = exp2(S^T·scale·log2e − lse·log2e), dS^T = P^T (dP^T − delta)      in registers
//   dV += P^T dO, dK += dS^T Q             wgmma m64nDk16, A (P^T, dS^T) from registers
//   dQ += scale · dS K                     wgmma m64n64k16 through dS^T in shared memory, fp32
//                                          atomics into dq_acc (D = 64: warpgroup w takes query
//                                          rows 64w.., D = 128: dQ^T = K^T dS^T, dims 64w..)
// dK and dV stay in registers over the whole loop and are written once. The next query tile's Q,
// dO, lse and delta load with cp.async into the other buffer while this one is computed.
//
// Shared tiles use the 128-byte swizzle wgmma reads, as kernels/grouped_gemm.cu: a tile of R rows
// × D columns is [D/64 halves][R rows][64] (16-byte chunk c of row r at chunk c ^ (r % 8)); read
// K-major (rows are M or N, columns the reduction: SBO 1024) or MN-major (rows are the reduction,
// columns M or N: SBO 1024, LBO = R·128 between halves, transposed). So Q and dO serve as K-major
// B of S^T and dP^T and as MN-major B of dK and dV; K as K-major A of S^T and MN-major B (or A)
// of dQ.
//
// Measured on H200 inside bench-1b's step (B=4, S=4096, Hq=16, Hkv=4, D=64; causal FLOPs): fwd
// ~360 TFLOP/s, bwd ~280 (attention.cu's: ~250, ~200); D=128, Hq=8: bwd ~310. docs/performance.md
// has the variants that were tried and dropped.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&t);
}
// A shared-memory matrix descriptor: start address, leading and stride byte offsets (16-byte
// units), 128-byte swizzle.
__device__ __forceinline__ unsigned long long desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ACC8(o)                                                                                                        \
    "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]),        \
        "+f"(d[o + 7])
#define ACC32 ACC8(0), ACC8(8), ACC8(16), ACC8(24)
#define ACC64 ACC32, ACC8(32), ACC8(40), ACC8(48), ACC8(56)
#define D32                                                                                                            \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29," \
    "%30,%31}"
#define D64                                                                                                            \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29," \
    "%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,"     \
    "%57,%58,%59,%60,%61,%62,%63}"

// d (the warpgroup's 64×N f32 tile, N/2 per thread) += A (64×16) · B (16×N), both in shared memory;
// TA / TB: the operand is MN-major (read transposed).
template <int N, int TA, int TB>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], unsigned long long a, unsigned long long b) {
    if constexpr (N == 64)
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " D32 ", %32, %33, 1, 1, 1, %34, %35;\n"
                     : ACC32
                     : "l"(a), "l"(b), "n"(TA), "n"(TB));
    else
        asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " D64 ", %64, %65, 1, 1, 1, %66, %67;\n"
                     : ACC64
                     : "l"(a), "l"(b), "n"(TA), "n"(TB));
}
// The same with A from registers (the m16n8k16 A fragment of each warp's 16 rows) and B MN-major.
template <int N>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long b) {
    if constexpr (N == 64)
        asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " D32
                     ", {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
                     : ACC32
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    else
        asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " D64
                     ", {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
                     : ACC64
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
#define WG_FENCE() asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory")
#define WG_COMMIT() asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory")
#define WG_WAIT0() asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory")
#endif

// Rows r0.. of a [*, rs]-strided bf16 matrix with D columns into a swizzled [D/64][R][64] tile at
// shared address dst; rows >= S are zero-filled.
template <int R, int D>
__device__ __forceinline__ void load_tile(unsigned dst, const bf16* g, size_t rs, int r0, int S, int tid) {
    constexpr int CPR = D / 8;
#pragma unroll
    for (int i = 0; i < R * CPR / 256; ++i) {
        const int c = tid + i * 256, row = c / CPR, ch = c % CPR, half = ch >> 3, cc = ch & 7;
        const bool ok = r0 + row < S;
        cp_async16(dst + half * (R * 128) + row * 128 + ((cc ^ (row & 7)) << 4),
                   g + (size_t)(ok ? r0 + row : 0) * rs + ch * 8, ok);
    }
}

// Shared bytes: K and V tiles (128 keys), two buffers of Q and dO tiles, dS^T, two buffers of lse
// and delta.
#define BM_OF(D) ((D) == 64 ? 128 : 64)
#define BWD_SMEM(D) (2 * 128 * (D) * 2 + 4 * BM_OF(D) * (D) * 2 + 128 * BM_OF(D) * 2 + 4 * BM_OF(D) * 4)
// Forward: the Q tile and two buffers of K and V tiles (128 rows each).
#define FWD_SMEM(D) (5 * 128 * (D) * 2)

template <int D>
__device__ __forceinline__ void fwd_wg(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                                       const bf16* __restrict__ sinks, int B, int S, int Hq, int Hkv, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BM = 128, BN = 128, T = 128 * D * 2;
    extern __shared__ unsigned char smem_raw[];
    const unsigned sQ = (smem_u32(smem_raw) + 1023) & ~1023u, sK0 = sQ + T, sV0 = sK0 + 2 * T;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g8 = lane >> 2, t4 = lane & 3;
    const int h = blockIdx.x, b = blockIdx.y, hk = h / (Hq / Hkv);
    const int m0 = (gridDim.z - 1 - blockIdx.z) * BM;  // heaviest (last) query tiles first
    const size_t qrs = (size_t)Hq * D, krs = (size_t)Hkv * D;
    const bf16* kb = k + (size_t)b * S * krs + (size_t)hk * D;
    const bf16* vb = v + (size_t)b * S * krs + (size_t)hk * D;
    const int n_tiles = (min(S, m0 + BM) + BN - 1) / BN;

    load_tile<BM, D>(sQ, q + (size_t)b * S * qrs + (size_t)h * D, qrs, m0, S, tid);
    load_tile<BN, D>(sK0, kb, krs, 0, S, tid);
    load_tile<BN, D>(sV0, vb, krs, 0, S, tid);
    asm volatile("cp.async.commit_group;\n" ::: "memory");

    const float sl2 = scale * LOG2E;
    const int row0 = m0 + wg * 64 + warp * 16 + g8;  // query of accumulator rows (and +8)
    float m_i[2] = {NEG_INF, NEG_INF}, l_i[2] = {0.f, 0.f}, acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;

    for (int j = 0; j < n_tiles; ++j) {
        const int n0 = j * BN, buf = j & 1;
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // tile j landed everywhere; every warpgroup is done with tile j - 1
        if (j + 1 < n_tiles) {
            load_tile<BN, D>(sK0 + (buf ^ 1) * T, kb, krs, n0 + BN, S, tid);
            load_tile<BN, D>(sV0 + (buf ^ 1) * T, vb, krs, n0 + BN, S, tid);
            asm volatile("cp.async.commit_group;\n" ::: "memory");
        }
        const unsigned sK = sK0 + buf * T, sV = sV0 + buf * T;
        float s[BN / 2];
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
        WG_FENCE();
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            const unsigned half = (ks >> 2) * (128 * 128) + (ks & 3) * 32;
            mma_ss<BN, 0, 0>(s, desc(sQ + half + wg * 8192, 16, 1024), desc(sK + half, 16, 1024));
        }
        WG_COMMIT();
        WG_WAIT0();
        if (n0 + BN - 1 > m0 + wg * 64) {  // the diagonal tile: keys j > i are masked
#pragma unroll
            for (int i = 0; i < BN / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (n0 + i * 8 + 2 * t4 + (e & 1) > row0 + (e >> 1) * 8) s[i * 4 + e] = NEG_INF;
        }
        // Online softmax; each row lives in the 4 lanes of a quad. Every row sees key 0, so the
        // running max is finite from the first tile on.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_i[r];
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) mx = fmaxf(mx, fmaxf(s[i * 4 + 2 * r], s[i * 4 + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float msc = mx * sl2, corr = exp2f(m_i[r] * sl2 - msc);
            m_i[r] = mx;
            float l = l_i[r] * corr;
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
                s[i * 4 + 2 * r] = exp2f(fmaf(s[i * 4 + 2 * r], sl2, -msc));
                s[i * 4 + 2 * r + 1] = exp2f(fmaf(s[i * 4 + 2 * r + 1], sl2, -msc));
                l += s[i * 4 + 2 * r] + s[i * 4 + 2 * r + 1];
            }
            l_i[r] = l;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                acc[i * 4 + 2 * r] *= corr;
                acc[i * 4 + 2 * r + 1] *= corr;
            }
        }
        // O += P V: P re-packed from the accumulator layout into A fragments.
        WG_FENCE();
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
            const unsigned pa[4] = {pack_bf16(s[8 * ks], s[8 * ks + 1]), pack_bf16(s[8 * ks + 2], s[8 * ks + 3]),
                                    pack_bf16(s[8 * ks + 4], s[8 * ks + 5]), pack_bf16(s[8 * ks + 6], s[8 * ks + 7])};
            mma_rs<D>(acc, pa, desc(sV + ks * 2048, BN * 128, 1024));
        }
        WG_COMMIT();
        WG_WAIT0();
    }

    // Epilogue: normalise, write o (bf16) and lse (natural log); a sink logit joins the sum.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_i[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int row = row0 + r * 8;
        if (row < S) {
            float mx = m_i[r] * scale, inv = 1.f / l;
            if (sinks) {
                const float sk = __bfloat162float(sinks[h]), top = fmaxf(mx, sk), a = expf(mx - top);
                l = l * a + expf(sk - top);
                inv = a / l;
                mx = top;
            }
            bf16* orow = o + ((size_t)b * S + row) * qrs + (size_t)h * D + 2 * t4;
#pragma unroll
            for (int i = 0; i < D / 8; ++i)
                *reinterpret_cast<unsigned*>(orow + i * 8) = pack_bf16(acc[i * 4 + 2 * r] * inv, acc[i * 4 + 2 * r + 1] * inv);
            if (t4 == 0) lse[((size_t)b * Hq + h) * S + row] = mx + logf(l);
        }
    }
#endif
}

template <int D>
__device__ __forceinline__ void bwd_wg(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                       const float* __restrict__ lse, const float* __restrict__ delta,
                                       float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv, int B,
                                       int S, int Hq, int Hkv, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BM = BM_OF(D), BN = 128, QT = BM * D * 2, KT = BN * D * 2;
    extern __shared__ unsigned char smem_raw[];
    const unsigned sbase = (smem_u32(smem_raw) + 1023) & ~1023u;
    unsigned char* pbase = smem_raw + (sbase - smem_u32(smem_raw));
    const unsigned sK = sbase, sV = sK + KT, sQ0 = sV + KT, sdO0 = sQ0 + 2 * QT, sdS = sdO0 + 2 * QT;
    const unsigned sStat = sdS + BN * BM * 2;  // [2 buffers][lse BM | delta BM] floats
    const float* pStat = reinterpret_cast<const float*>(pbase + (sStat - sbase));

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g8 = lane >> 2, t4 = lane & 3;
    const int hk = blockIdx.x, b = blockIdx.y, n0 = blockIdx.z * BN, G = Hq / Hkv;
    const size_t qrs = (size_t)Hq * D, kvrs = (size_t)Hkv * D;
    const int m_begin = n0 / BM, per_head = (S + BM - 1) / BM - m_begin, iters = G * per_head;

    auto issue = [&](int it) {  // Q, dO, lse and delta of iteration it into buffer it % 2
        const int h = hk * G + it / per_head, m0 = (m_begin + it % per_head) * BM, buf = it & 1;
        const size_t off = (size_t)b * S * qrs + (size_t)h * D;
        load_tile<BM, D>(sQ0 + buf * QT, q + off, qrs, m0, S, tid);
        load_tile<BM, D>(sdO0 + buf * QT, dout + off, qrs, m0, S, tid);
        const size_t loff = ((size_t)b * Hq + h) * S;
        for (int i = tid; i < BM; i += 256) {
            const bool ok = m0 + i < S;
            const unsigned st = sStat + buf * 2 * BM * 4 + i * 4;
            cp_async4(st, lse + loff + (ok ? m0 + i : 0), ok);
            cp_async4(st + BM * 4, delta + loff + (ok ? m0 + i : 0), ok);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    load_tile<BN, D>(sK, k + (size_t)b * S * kvrs + (size_t)hk * D, kvrs, n0, S, tid);
    load_tile<BN, D>(sV, v + (size_t)b * S * kvrs + (size_t)hk * D, kvrs, n0, S, tid);
    issue(0);

    float dka[D / 2], dva[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dka[i] = dva[i] = 0.f;
    const float sl2 = scale * LOG2E;
    const int key0 = n0 + wg * 64 + warp * 16 + g8;  // key of accumulator rows (and +8)

    for (int it = 0; it < iters; ++it) {
        const int h = hk * G + it / per_head, m0 = (m_begin + it % per_head) * BM, buf = it & 1;
        const unsigned sQ = sQ0 + buf * QT, sdO = sdO0 + buf * QT;
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // tile it landed everywhere; every warpgroup is done with iteration it - 1
        if (it + 1 < iters) issue(it + 1);

        // S^T and dP^T: 64 keys of this warpgroup × BM queries, reduction over D.
        float s[BM / 2], dp[BM / 2];
#pragma unroll
        for (int i = 0; i < BM / 2; ++i) s[i] = dp[i] = 0.f;
        WG_FENCE();
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            const unsigned ka = (ks >> 2) * KT / (D / 64) + wg * 8192 + (ks & 3) * 32;
            const unsigned qb = (ks >> 2) * QT / (D / 64) + (ks & 3) * 32;
            mma_ss<BM, 0, 0>(s, desc(sK + ka, 16, 1024), desc(sQ + qb, 16, 1024));
            mma_ss<BM, 0, 0>(dp, desc(sV + ka, 16, 1024), desc(sdO + qb, 16, 1024));
        }
        WG_COMMIT();
        WG_WAIT0();

        // P^T and dS^T in place; dS^T also to shared memory (bf16) for dQ.
        const bool need_mask = n0 + BN - 1 > m0 || m0 + BM > S;
        const float* sL = pStat + buf * 2 * BM;
#pragma unroll
        for (int i = 0; i < BM / 8; ++i) {
            const int qc = i * 8 + 2 * t4;
            const float2 L = *reinterpret_cast<const float2*>(sL + qc);
            const float2 Dl = *reinterpret_cast<const float2*>(sL + BM + qc);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = m0 + qc + (e & 1), key = key0 + (e >> 1) * 8;
                float p = exp2f(fmaf(s[i * 4 + e], sl2, -((e & 1) ? L.y : L.x) * LOG2E));
                if (need_mask && (key > qi || qi >= S)) p = 0.f;
                s[i * 4 + e] = p;
                dp[i * 4 + e] = p * (dp[i * 4 + e] - ((e & 1) ? Dl.y : Dl.x));
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = wg * 64 + warp * 16 + g8 + r * 8, cc = qc & 63;
                const unsigned at = sdS - sbase + (qc >> 6) * (BN * 128) + row * 128 + ((((cc >> 3) ^ (row & 7))) << 4) +
                                    (cc & 7) * 2;
                *reinterpret_cast<unsigned*>(pbase + at) = pack_bf16(dp[i * 4 + 2 * r], dp[i * 4 + 2 * r + 1]);
            }
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // dS^T stores -> wgmma reads

        // dV += P^T dO, dK += dS^T Q: A from registers, B MN-major (rows = queries).
        WG_FENCE();
#pragma unroll
        for (int ks = 0; ks < BM / 16; ++ks) {
            const unsigned pa[4] = {pack_bf16(s[8 * ks], s[8 * ks + 1]), pack_bf16(s[8 * ks + 2], s[8 * ks + 3]),
                                    pack_bf16(s[8 * ks + 4], s[8 * ks + 5]), pack_bf16(s[8 * ks + 6], s[8 * ks + 7])};
            const unsigned da[4] = {pack_bf16(dp[8 * ks], dp[8 * ks + 1]), pack_bf16(dp[8 * ks + 2], dp[8 * ks + 3]),
                                    pack_bf16(dp[8 * ks + 4], dp[8 * ks + 5]), pack_bf16(dp[8 * ks + 6], dp[8 * ks + 7])};
            mma_rs<D>(dva, pa, desc(sdO + ks * 2048, BM * 128, 1024));
            mma_rs<D>(dka, da, desc(sQ + ks * 2048, BM * 128, 1024));
        }
        WG_COMMIT();
        __syncthreads();  // dS^T complete from both warpgroups

        // dQ: reduction over the block's 128 keys, both operands MN-major.
        float dq[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) dq[i] = 0.f;
        WG_FENCE();
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
            if (D == 64)  // dQ rows 64wg.. (queries) = dS · K
                mma_ss<64, 1, 1>(dq, desc(sdS + wg * (BN * 128) + ks * 2048, BN * 128, 1024),
                                 desc(sK + ks * 2048, BN * 128, 1024));
            else  // dQ^T rows 64wg.. (dims) = K^T · dS^T
                mma_ss<64, 1, 1>(dq, desc(sK + wg * (BN * 128) + ks * 2048, BN * 128, 1024),
                                 desc(sdS + ks * 2048, BN * 128, 1024));
        }
        WG_COMMIT();
        WG_WAIT0();
        float* dqh = dq_acc + ((size_t)b * S * Hq + h) * D;  // row i of head h at dqh + i·Hq·D
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = wg * 64 + warp * 16 + g8 + r * 8, col = i * 8 + 2 * t4;
                const float a = dq[i * 4 + 2 * r] * scale, c = dq[i * 4 + 2 * r + 1] * scale;
                if (D == 64) {
                    if (m0 + row < S) {
                        float* p = dqh + (size_t)(m0 + row) * Hq * D + col;
                        asm volatile("red.global.v2.f32.add [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(c) : "memory");
                    }
                } else {
                    if (m0 + col < S) atomicAdd(dqh + (size_t)(m0 + col) * Hq * D + row, a);
                    if (m0 + col + 1 < S) atomicAdd(dqh + (size_t)(m0 + col + 1) * Hq * D + row, c);
                }
            }
    }

    // dK (scaled) and dV, summed over the group's query heads, written once.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + r * 8;
        if (key < S) {
            const size_t off = ((size_t)b * S + key) * kvrs + (size_t)hk * D + 2 * t4;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                *reinterpret_cast<unsigned*>(dk + off + i * 8) =
                    pack_bf16(dka[i * 4 + 2 * r] * scale, dka[i * 4 + 2 * r + 1] * scale);
                *reinterpret_cast<unsigned*>(dv + off + i * 8) = pack_bf16(dva[i * 4 + 2 * r], dva[i * 4 + 2 * r + 1]);
            }
        }
    }
#endif
}

#define ATTN_FWD_WG(NAME, D, MIN_BLOCKS)                                                                               \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS)                                                     \
        NAME(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const bf16* sinks, int window, int B,  \
             int S, int Hq, int Hkv, float scale) {                                                                   \
        fwd_wg<D>(q, k, v, o, lse, sinks, B, S, Hq, Hkv, scale);                                                      \
    }
ATTN_FWD_WG(flash_attn_fwd_wg_d64, 64, 2)
ATTN_FWD_WG(flash_attn_fwd_wg_d128, 128, 1)

#define ATTN_BWD_WG(NAME, D)                                                                                           \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                              \
        NAME(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,       \
             float* dq_acc, bf16* dk, bf16* dv, int window, int B, int S, int Hq, int Hkv, float scale) {               \
        bwd_wg<D>(q, k, v, dout, lse, delta, dq_acc, dk, dv, B, S, Hq, Hkv, scale);                                    \
    }
ATTN_BWD_WG(flash_attn_bwd_wg_d64, 64)
ATTN_BWD_WG(flash_attn_bwd_wg_d128, 128)

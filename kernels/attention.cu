// Causal flash attention with grouped-query attention (GQA): forward and backward, bf16 in and
// out, fp32 math, tensor cores through inline PTX (mma.sync.m16n8k16 bf16 -> fp32, ldmatrix,
// cp.async). Compiled at run time by NVRTC for sm_90; static shared memory only (< 48 KiB).
// On Hopper, head sizes 64 and 128 without a window run kernels/attention_hopper.cu instead (the
// same arguments and host duties, on warpgroup MMA); these kernels serve every other case.
//
// Layouts (row-major, contiguous): q: [B, S, Hq, DK]; o, dout: [B, S, Hq, DV]; k: [B, S, Hkv, DK];
// v: [B, S, Hkv, DV]; lse, delta: float [B, Hq, S]; dq_acc: float [B, S, Hq, DK]; dk, dv: bf16 as k, v.
// Query head h reads kv head h / (Hq / Hkv). Query i attends keys j <= i. The q·k head size DK and
// the value head size DV are (32, 32), (64, 64), (128, 128) (kernels _d32, _d64, _d128) or
// (192, 128) (_d192_128: DeepSeek's multi-head latent attention, 128 + 64 rotated dims); D below
// is DK = DV. The host pads other sizes with zero columns to the next of these.
// `window` > 0: query i sees keys i - window < j <= i only (sliding-window layers); `sinks` (bf16
// [Hq], or null): a logit per query head that joins each row's softmax without a value (GPT-OSS),
// folded into lse, so the backward's P = exp(s·scale − lse) needs nothing more; the sinks' own
// gradient is flash_attn_sink_grad's (after flash_attn_bwd_prep).
//
// Launch configurations (cdiv(a, b) = (a + b - 1) / b; dynamic shared bytes are 0 for all):
//   flash_attn_fwd_d32   grid (Hq, B, cdiv(S, 128))    block (256, 1, 1)  shared 0
//   flash_attn_fwd_d64   grid (Hq, B, cdiv(S, 128))    block (256, 1, 1)  shared 0
//   flash_attn_fwd_d128  grid (Hq, B, cdiv(S, 64))     block (128, 1, 1)  shared 0
//   flash_attn_fwd_d192_128  as flash_attn_fwd_d128
//   flash_attn_bwd_prep  grid (cdiv(B*S*Hq, 8), 1, 1)  block (256, 1, 1)  shared 0
//   flash_attn_bwd_d32   grid (Hkv, B, cdiv(S, 64))    block (128, 1, 1)  shared 0
//   flash_attn_bwd_d64   grid (Hkv, B, cdiv(S, 64))    block (128, 1, 1)  shared 0
//   flash_attn_bwd_d128  grid (Hkv, B, cdiv(S, 64))    block (128, 1, 1)  shared 0
//   flash_attn_bwd_d192_128  as flash_attn_bwd_d128 (16-query tiles: 45 KiB of static shared memory)
//   flash_attn_dq_cast   grid (min(cdiv(n, 256), 65535), 1, 1)  block (256, 1, 1)  shared 0
//   flash_attn_sink_grad grid (Hq, 1, 1)               block (256, 1, 1)  shared 0
// Each fwd/bwd kernel has a `_w` twin (same arguments and launch) for window > 0; the plain one
// ignores `window`, so the window's tests cost the common case nothing.
// D = 32 uses the D = 64 tiling (fwd BM = 128 with 8 warps; bwd 64 keys x 64-query tiles, 4 warps).
// flash_attn_bwd_prep takes D as an argument and serves every D here (any even D; D = 32 leaves
// half of each warp idle).
// Host duties: zero dq_acc (float [B, S, Hq, D]) before flash_attn_bwd_*; run flash_attn_bwd_prep
// (delta, its D = DV) before flash_attn_bwd_*; cast dq_acc to bf16 with flash_attn_dq_cast
// afterwards (n = B*S*Hq*DK). Pointers must be 16-byte aligned (any cudaMalloc'd base is).
// dk and dv are fully written (no zeroing needed). No function attributes need raising.
// Measured on H200 (B=4, S=4096, Hq=16, Hkv=4, D=64; causal FLOPs): fwd 249 TFLOP/s, bwd kernel
// 203 TFLOP/s (190 with prep + zeroing + cast; torch SDPA on the same card: fwd 257-260, bwd 204-212).
// D=128, Hq=8: fwd 250, bwd 207 TFLOP/s.
//
// Forward (FlashAttention-2): a block owns BM query rows of one (batch, query head); each warp owns
// 16 rows, keeps its Q fragment in registers, and streams 64-key tiles of K and V through shared
// memory (V of tile j loads while S = Q K^T is computed; K of tile j+1 loads while O += P V is
// computed). The online softmax runs on the mma accumulators in registers (exp2 with the scale
// folded in); the 16x64 P tile is re-packed to bf16 A fragments in registers. Key tiles above the
// diagonal are never visited; only tiles that cross it are masked. Blocks run heaviest first.
//
// Backward (FlashAttention-2, key-stationary): a block owns 64 keys of one (batch, kv head) and
// loops over every query head of the group and every query tile at or below the diagonal. Each of
// the 4 warps owns 16 keys and works in the transposed frame (keys as mma rows):
//   S^T = K Q^T, P^T = exp2(S^T*scale*log2e - lse*log2e), dP^T = V dO^T, dS^T = P^T (dP^T - delta),
//   dV += P^T dO, dK += dS^T Q   (accumulated in registers over the whole loop, written once),
//   dQ += scale * dS K           (dS^T goes through shared memory; fp32 atomics into dq_acc).
// The next query tile's Q, dO, lse and delta are fetched with cp.async while dQ is computed.
// D = 64 runs a tuned copy of this loop (bwd64_impl, below bwd_impl): same tiling and launch shape.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_NEG_INF __int_as_float(0xff800000)

// ------------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16-byte async copy global -> shared; when !pred the 16 shared bytes are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(pred ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 bf16 matrices; lane l supplies the row address of matrix l/8.
__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}
__device__ __forceinline__ void ldsm4t(unsigned (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}

// c (16x8 fp32) += a (16x16 bf16, row) * b (16x8 bf16, col). Fragment of lane (g = l/4, t = l%4):
// a: {(g,2t..2t+1), (g+8,2t..), (g,2t+8..), (g+8,2t+8..)}; b: {(k=2t..2t+1, n=g), (k=2t+8.., n=g)};
// c: {(g,2t), (g,2t+1), (g+8,2t), (g+8,2t+1)}.
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 t = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&t);
}

// Two adjacent fp32 atomic adds (8-byte aligned address) as one vector reduction (sm_90).
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#ifdef ATTN_SCALAR_ATOMICS
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#else
    asm volatile("red.global.v2.f32.add [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#endif
}

// Copy rows [r0, r0+R) of a [*, rs]-strided bf16 matrix (D columns) into shared rows of stride
// D+8 (the 16-byte pad makes ldmatrix conflict-free). Rows >= S are zero-filled.
template <int R, int D, int NT>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, size_t rs, int r0, int S, int tid) {
    constexpr int CPR = D / 8, LD = D + 8;
    static_assert((R * CPR) % NT == 0, "tile chunks must divide evenly among threads");
#pragma unroll
    for (int i = 0; i < R * CPR / NT; ++i) {
        const int c = tid + i * NT, row = c / CPR, col = (c % CPR) * 8;
        const bool ok = r0 + row < S;
        cp_async16(s + row * LD + col, g + (size_t)(ok ? r0 + row : 0) * rs + col, ok);
    }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <int DK, int DV, int BM, bool W>
__device__ __forceinline__ void fwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, bf16* __restrict__ o, float* __restrict__ lse,
                                         const bf16* __restrict__ sinks, int window_arg, int B, int S, int Hq, int Hkv,
                                         float scale) {
    const int window = W ? window_arg : 0;  // the _w kernels only: no cost elsewhere
    constexpr int BN = 64, NW = BM / 16, NT = NW * 32, LDK = DK + 8, LDV = DV + 8, KT = BN * LDK;
    constexpr int SMEM = (KT + BN * LDV > BM * LDK) ? KT + BN * LDV : BM * LDK;
    __shared__ __align__(16) bf16 smem[SMEM];  // [K tile | V tile]; the Q tile aliases it at the start
    bf16* sK = smem;
    bf16* sV = smem + KT;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int h = blockIdx.x, b = blockIdx.y, hk = h / (Hq / Hkv);
    const int m0 = (gridDim.z - 1 - blockIdx.z) * BM;  // heaviest (last) query tiles first
    const size_t qrs = (size_t)Hq * DK, krs = (size_t)Hkv * DK, vrs = (size_t)Hkv * DV, ors = (size_t)Hq * DV;
    const bf16* qb = q + (size_t)b * S * qrs + (size_t)h * DK;
    const bf16* kb = k + (size_t)b * S * krs + (size_t)hk * DK;
    const bf16* vb = v + (size_t)b * S * vrs + (size_t)hk * DV;

    // Q tile -> shared -> per-warp A fragments in registers.
    load_tile<BM, DK, NT>(smem, qb, qrs, m0, S, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    unsigned qf[DK / 16][4];
#pragma unroll
    for (int kk = 0; kk < DK / 16; ++kk)
        ldsm4(qf[kk], smem + (warp * 16 + (lane & 15)) * LDK + kk * 16 + (lane >> 4) * 8);
    __syncthreads();

    const float sl2 = scale * ATTN_LOG2E;
    const int wr0 = m0 + warp * 16;          // first row of this warp
    const int row0 = wr0 + (lane >> 2);      // rows of accumulator elements 0,1 (and +8 for 2,3)
    float m_i[2] = {ATTN_NEG_INF, ATTN_NEG_INF}, l_i[2] = {0.f, 0.f};
    float acc[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DV / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    const int kend = min(S, m0 + BM);  // keys needed by this block: [kbegin, kend)
    const int kbegin = window > 0 ? max(0, m0 - window + 1) : 0;
    const int n_tiles = (kend + BN - 1) / BN, first = kbegin / BN;
    load_tile<BN, DK, NT>(sK, kb, krs, first * BN, S, tid);
    cp_async_commit();

    for (int nb = first; nb < n_tiles; ++nb) {
        const int n0 = nb * BN;
        cp_async_wait_all();  // K[nb] has landed
        __syncthreads();      // ... for every thread; everyone is done with V[nb-1]
        load_tile<BN, DV, NT>(sV, vb, vrs, n0, S, tid);
        cp_async_commit();

        // warp-uniform: some key of the tile is visible to some row of the warp
        const bool active = n0 <= wr0 + 15 && (window == 0 || n0 + BN - 1 > wr0 - window);
        float s[BN / 8][4];
        if (active) {
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DK / 16; ++kk) {
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    unsigned bk[4];
                    ldsm4(bk, sK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDK + kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(s[2 * np], qf[kk], bk[0], bk[1]);
                    mma16816(s[2 * np + 1], qf[kk], bk[2], bk[3]);
                }
            }
            // The tile crosses this warp's diagonal or its window's lower edge: mask keys j > i
            // and j <= i - window.
            if (n0 + BN - 1 > wr0 || (window > 0 && n0 <= wr0 + 15 - window)) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1), i = row0 + (e >> 1) * 8;
                        if (j > i || (window > 0 && j <= i - window)) s[nt][e] = ATTN_NEG_INF;
                    }
            }
            // Online softmax; each row lives in the 4 lanes of a quad.
            float mx[2] = {m_i[0], m_i[1]};
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
                mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
            }
            float msc[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                msc[r] = mx[r] == ATTN_NEG_INF ? 0.f : mx[r] * sl2;
                const float corr = exp2f(m_i[r] * sl2 - msc[r]);
                m_i[r] = mx[r];
                l_i[r] *= corr;
#pragma unroll
                for (int dt = 0; dt < DV / 8; ++dt) {
                    acc[dt][2 * r] *= corr;
                    acc[dt][2 * r + 1] *= corr;
                }
            }
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(fmaf(s[nt][e], sl2, -msc[e >> 1]));
                l_i[0] += s[nt][0] + s[nt][1];
                l_i[1] += s[nt][2] + s[nt][3];
            }
        }

        cp_async_wait_all();  // V[nb] has landed
        __syncthreads();      // ... for every thread; everyone is done with K[nb]
        if (nb + 1 < n_tiles) load_tile<BN, DK, NT>(sK, kb, krs, n0 + BN, S, tid);
        cp_async_commit();

        if (active) {  // O += P V, P re-packed from the accumulator layout into A fragments
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                        pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < DV / 16; ++dp) {
                    unsigned bv[4];
                    ldsm4t(bv, sV + (kk * 16 + (lane & 15)) * LDV + dp * 16 + (lane >> 4) * 8);
                    mma16816(acc[2 * dp], pa, bv[0], bv[1]);
                    mma16816(acc[2 * dp + 1], pa, bv[2], bv[3]);
                }
            }
        }
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
            bf16* orow = o + ((size_t)b * S + row) * ors + (size_t)h * DV + 2 * (lane & 3);
#pragma unroll
            for (int dt = 0; dt < DV / 8; ++dt)
                *reinterpret_cast<unsigned*>(orow + dt * 8) = pack_bf16(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
            if ((lane & 3) == 0) lse[((size_t)b * Hq + h) * S + row] = mx + logf(l);
        }
    }
}

// Each kernel twice: NAME (no window: the window code compiles away) and NAME_w (window > 0).
#define ATTN_FWD(NAME, DK, DV, BM, NT)                                                                          \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                                        \
        NAME(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const bf16* sinks, int window,   \
             int B, int S, int Hq, int Hkv, float scale) {                                                      \
        fwd_impl<DK, DV, BM, false>(q, k, v, o, lse, sinks, window, B, S, Hq, Hkv, scale);                     \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(NT, 2)                                                        \
        NAME##_w(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const bf16* sinks,           \
                 int window, int B, int S, int Hq, int Hkv, float scale) {                                      \
        fwd_impl<DK, DV, BM, true>(q, k, v, o, lse, sinks, window, B, S, Hq, Hkv, scale);                      \
    }
ATTN_FWD(flash_attn_fwd_d32, 32, 32, 128, 256)
ATTN_FWD(flash_attn_fwd_d64, 64, 64, 128, 256)
ATTN_FWD(flash_attn_fwd_d128, 128, 128, 64, 128)
ATTN_FWD(flash_attn_fwd_d192_128, 192, 128, 64, 128)

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
// delta[b, h, i] = sum_d o[b, i, h, d] * dout[b, i, h, d]; one warp per (b, i, h) row.
extern "C" __global__ void __launch_bounds__(256)
    flash_attn_bwd_prep(const bf16* o, const bf16* dout, float* delta, int B, int S, int Hq, int D) {
    const long row = (long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (long)B * S * Hq) return;
    const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(o + row * D);
    const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(dout + row * D);
    float sum = 0.f;
    for (int i = lane; i < D / 2; i += 32) {
        const float2 a = __bfloat1622float2(o2[i]), c = __bfloat1622float2(d2[i]);
        sum += a.x * c.x + a.y * c.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
        const long h = row % Hq, bs = row / Hq, s = bs % S, bb = bs / S;
        delta[(bb * Hq + h) * S + s] = sum;
    }
}

template <int DK, int DV, int BMQ, bool W>
__device__ __forceinline__ void bwd_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                         int window_arg, int B, int S, int Hq, int Hkv, float scale) {
    const int window = W ? window_arg : 0;
    constexpr int BN = 64, NT = 128, LDK = DK + 8, LDV = DV + 8, LDS = BMQ + 8;
    constexpr int RG = BMQ / 16, DC = 4 / RG, DW = DK / DC;  // dQ split: RG row groups x DC dim chunks
    constexpr int QT = BMQ * LDK, QO = (QT + BMQ * LDV > BN * LDV) ? QT + BMQ * LDV : BN * LDV;
    __shared__ __align__(16) bf16 sK[BN * LDK];
    __shared__ __align__(16) bf16 sQ[QO];         // [Q tile | dO tile]; V tile at the start
    __shared__ __align__(16) bf16 sdS[BN * LDS];  // dS^T [key][query]
    __shared__ float sLse[BMQ], sDelta[BMQ];
    bf16* sdO = sQ + QT;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int hk = blockIdx.x, b = blockIdx.y, n0 = blockIdx.z * BN;  // key tile 0 (most work) first
    const int G = Hq / Hkv;
    const size_t qrs = (size_t)Hq * DK, ors = (size_t)Hq * DV, krs = (size_t)Hkv * DK, vrs = (size_t)Hkv * DV;
    const bf16* kb = k + (size_t)b * S * krs + (size_t)hk * DK;
    const bf16* vb = v + (size_t)b * S * vrs + (size_t)hk * DV;

    // K stays in shared memory (A operand of S^T, B operand of dQ); V goes to registers.
    load_tile<BN, DK, NT>(sK, kb, krs, n0, S, tid);
    load_tile<BN, DV, NT>(sQ, vb, vrs, n0, S, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    unsigned vf[DV / 16][4];
#pragma unroll
    for (int kk = 0; kk < DV / 16; ++kk)
        ldsm4(vf[kk], sQ + (warp * 16 + (lane & 15)) * LDV + kk * 16 + (lane >> 4) * 8);
    __syncthreads();

    float dka[DK / 8][4], dva[DV / 8][4];
#pragma unroll
    for (int i = 0; i < DK / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = 0.f;
#pragma unroll
    for (int i = 0; i < DV / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dva[i][e] = 0.f;

    const float sl2 = scale * ATTN_LOG2E;
    const int kw0 = n0 + warp * 16;          // first key of this warp
    const int key0 = kw0 + (lane >> 2);      // keys of accumulator elements 0,1 (and +8 for 2,3)
    const int m_end = window > 0 ? min(S, n0 + BN - 1 + window) : S;  // queries that see these keys: < m_end
    const int m_begin = n0 / BMQ, m_count = (m_end + BMQ - 1) / BMQ, per_head = m_count - m_begin;
    const int iters = G * per_head;

    auto issue = [&](int it) {  // async loads of Q, dO, lse, delta for iteration it
        const int h = hk * G + it / per_head, m0 = (m_begin + it % per_head) * BMQ;
        load_tile<BMQ, DK, NT>(sQ, q + (size_t)b * S * qrs + (size_t)h * DK, qrs, m0, S, tid);
        load_tile<BMQ, DV, NT>(sdO, dout + (size_t)b * S * ors + (size_t)h * DV, ors, m0, S, tid);
        const size_t loff = ((size_t)b * Hq + h) * S;
        for (int i = tid; i < BMQ; i += NT) {
            const bool ok = m0 + i < S;
            cp_async4(sLse + i, lse + loff + (ok ? m0 + i : 0), ok);
            cp_async4(sDelta + i, delta + loff + (ok ? m0 + i : 0), ok);
        }
        cp_async_commit();
    };
    issue(0);

    for (int it = 0; it < iters; ++it) {
        const int h = hk * G + it / per_head, m0 = (m_begin + it % per_head) * BMQ;
        cp_async_wait_all();
        __syncthreads();

        // warp-uniform: some (key, query) pair is visible
        const bool active = kw0 <= m0 + BMQ - 1 && (window == 0 || m0 < kw0 + 15 + window);
        float st[BMQ / 8][4], dpt[BMQ / 8][4];    // S^T -> P^T, dP^T -> dS^T (16 keys x BMQ queries)
#pragma unroll
        for (int i = 0; i < BMQ / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
        if (active) {
#pragma unroll
            for (int kk = 0; kk < DK / 16; ++kk) {
                unsigned ka[4];
                ldsm4(ka, sK + (warp * 16 + (lane & 15)) * LDK + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int np = 0; np < BMQ / 16; ++np) {
                    unsigned bq[4];
                    ldsm4(bq, sQ + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDK + kk * 16 + ((lane >> 3) & 1) * 8);
                    mma16816(st[2 * np], ka, bq[0], bq[1]);
                    mma16816(st[2 * np + 1], ka, bq[2], bq[3]);
                    if (DK == DV) {  // one loop for both products (the square head sizes)
                        unsigned bd[4];
                        ldsm4(bd, sdO + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDV + kk * 16 + ((lane >> 3) & 1) * 8);
                        mma16816(dpt[2 * np], vf[kk % (DV / 16)], bd[0], bd[1]);
                        mma16816(dpt[2 * np + 1], vf[kk % (DV / 16)], bd[2], bd[3]);
                    }
                }
            }
            if (DK != DV) {
#pragma unroll
                for (int kk = 0; kk < DV / 16; ++kk)
#pragma unroll
                    for (int np = 0; np < BMQ / 16; ++np) {
                        unsigned bd[4];
                        ldsm4(bd, sdO + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDV + kk * 16 + ((lane >> 3) & 1) * 8);
                        mma16816(dpt[2 * np], vf[kk], bd[0], bd[1]);
                        mma16816(dpt[2 * np + 1], vf[kk], bd[2], bd[3]);
                    }
            }
            const bool need_mask = (kw0 + 15 > m0) || (m0 + BMQ > S) || (window > 0 && m0 + BMQ - 1 - kw0 >= window);
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ql = nt * 8 + 2 * (lane & 3) + (e & 1);
                    float p = exp2f(fmaf(st[nt][e], sl2, -sLse[ql] * ATTN_LOG2E));
                    const int key = key0 + (e >> 1) * 8, q = m0 + ql;
                    if (need_mask && (key > q || q >= S || (window > 0 && q - key >= window))) p = 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - sDelta[ql]);
                }
            }
            // dV += P^T dO and dK += dS^T Q (B operands: [query][dim] tiles via ldmatrix.trans).
#pragma unroll
            for (int kk = 0; kk < BMQ / 16; ++kk) {
                const unsigned pa[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                        pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                        pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                const unsigned da[4] = {pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]),
                                        pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                                        pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                        pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < DV / 16; ++dp) {
                    unsigned bd[4];
                    ldsm4t(bd, sdO + (kk * 16 + (lane & 15)) * LDV + dp * 16 + (lane >> 4) * 8);
                    mma16816(dva[2 * dp], pa, bd[0], bd[1]);
                    mma16816(dva[2 * dp + 1], pa, bd[2], bd[3]);
                }
#pragma unroll
                for (int dp = 0; dp < DK / 16; ++dp) {
                    unsigned bq[4];
                    ldsm4t(bq, sQ + (kk * 16 + (lane & 15)) * LDK + dp * 16 + (lane >> 4) * 8);
                    mma16816(dka[2 * dp], da, bq[0], bq[1]);
                    mma16816(dka[2 * dp + 1], da, bq[2], bq[3]);
                }
            }
        }
        // dS^T (bf16) to shared memory for the dQ product (zeros from inactive warps).
        {
            const int r = warp * 16 + (lane >> 2);
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt) {
                const int c = nt * 8 + 2 * (lane & 3);
                *reinterpret_cast<unsigned*>(sdS + r * LDS + c) = pack_bf16(dpt[nt][0], dpt[nt][1]);
                *reinterpret_cast<unsigned*>(sdS + (r + 8) * LDS + c) = pack_bf16(dpt[nt][2], dpt[nt][3]);
            }
        }
        __syncthreads();  // dS^T complete; Q and dO tiles no longer read
        if (it + 1 < iters) issue(it + 1);

        // dQ[BMQ x D] += dS K: warp takes query rows qr..qr+15 and dims dc0..dc0+DW-1.
        const int qr = (warp % RG) * 16, dc0 = (warp / RG) * DW;
        float dqa[DW / 8][4];
#pragma unroll
        for (int i = 0; i < DW / 8; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[4];
            ldsm4t(a, sdS + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + qr + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int dp = 0; dp < DW / 16; ++dp) {
                unsigned bk[4];
                ldsm4t(bk, sK + (kk * 16 + (lane & 15)) * LDK + dc0 + dp * 16 + (lane >> 4) * 8);
                mma16816(dqa[2 * dp], a, bk[0], bk[1]);
                mma16816(dqa[2 * dp + 1], a, bk[2], bk[3]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + qr + (lane >> 2) + r * 8;
            if (row < S) {
                float* dst = dq_acc + (((size_t)b * S + row) * Hq + h) * DK + dc0 + 2 * (lane & 3);
#pragma unroll
                for (int dt = 0; dt < DW / 8; ++dt)
                    red_add_f32x2(dst + dt * 8, dqa[dt][2 * r] * scale, dqa[dt][2 * r + 1] * scale);
            }
        }
    }

    // dK (scaled) and dV, summed over the group's query heads, written once.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + r * 8;
        if (key < S) {
            const size_t ko = ((size_t)b * S + key) * krs + (size_t)hk * DK + 2 * (lane & 3);
            const size_t vo = ((size_t)b * S + key) * vrs + (size_t)hk * DV + 2 * (lane & 3);
#pragma unroll
            for (int dt = 0; dt < DK / 8; ++dt)
                *reinterpret_cast<unsigned*>(dk + ko + dt * 8) =
                    pack_bf16(dka[dt][2 * r] * scale, dka[dt][2 * r + 1] * scale);
#pragma unroll
            for (int dt = 0; dt < DV / 8; ++dt)
                *reinterpret_cast<unsigned*>(dv + vo + dt * 8) = pack_bf16(dva[dt][2 * r], dva[dt][2 * r + 1]);
        }
    }
}

// D = 64 backward (flash_attn_bwd_d64): the algorithm, tiling (64 keys x 64 queries, 4 warps) and
// launch configuration of bwd_impl<64, 64>, with less shared-memory traffic (ldmatrix bandwidth is
// the limiter at 2 blocks/SM): K's A fragments (S^T = K Q^T) stay in registers next to V's; lse and
// delta are read as float2 pairs; dQ = dS K is split 2 x 2 over the warps (32 queries x 32 dims
// each: 16 ldmatrix per warp and tile instead of 20). Measured: 195 -> 203 TFLOP/s. (Tried and
// dropped: double-buffering Q/dO with dS^T aliasing the spent Q slot -- the extra barrier ate the gain.)
template <bool W>
__device__ __forceinline__ void bwd64_impl(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                           const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                           const float* __restrict__ lse, const float* __restrict__ delta,
                                           float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                           int window_arg, int B, int S, int Hq, int Hkv, float scale) {
    const int window = W ? window_arg : 0;
    constexpr int D = 64, BMQ = 64, BN = 64, NT = 128, LD = D + 8, LDS = BMQ + 8;
    __shared__ __align__(16) bf16 sK[BN * LD];
    __shared__ __align__(16) bf16 sQ[2 * BMQ * LD];  // [Q tile | dO tile]; V tile at the start
    __shared__ __align__(16) bf16 sdS[BN * LDS];     // dS^T [key][query]
    __shared__ __align__(16) float sLse[BMQ];
    __shared__ __align__(16) float sDelta[BMQ];
    bf16* sdO = sQ + BMQ * LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int hk = blockIdx.x, b = blockIdx.y, n0 = blockIdx.z * BN;
    const int G = Hq / Hkv;
    const size_t qrs = (size_t)Hq * D, kvrs = (size_t)Hkv * D;
    const bf16* kb = k + (size_t)b * S * kvrs + (size_t)hk * D;
    const bf16* vb = v + (size_t)b * S * kvrs + (size_t)hk * D;

    const int m_end = window > 0 ? min(S, n0 + BN - 1 + window) : S;  // queries that see these keys: < m_end
    const int m_begin = n0 / BMQ, m_count = (m_end + BMQ - 1) / BMQ, per_head = m_count - m_begin;
    const int iters = G * per_head;
    auto issue = [&](int it) {  // async loads of Q, dO, lse, delta for iteration it
        const int h = hk * G + it / per_head, m0 = (m_begin + it % per_head) * BMQ;
        const size_t off = (size_t)b * S * qrs + (size_t)h * D;
        load_tile<BMQ, D, NT>(sQ, q + off, qrs, m0, S, tid);
        load_tile<BMQ, D, NT>(sdO, dout + off, qrs, m0, S, tid);
        const size_t loff = ((size_t)b * Hq + h) * S;
        for (int i = tid; i < BMQ; i += NT) {
            const bool ok = m0 + i < S;
            cp_async4(sLse + i, lse + loff + (ok ? m0 + i : 0), ok);
            cp_async4(sDelta + i, delta + loff + (ok ? m0 + i : 0), ok);
        }
        cp_async_commit();
    };

    // K stays in shared memory (B operand of dQ); V and K's A fragments go to registers.
    load_tile<BN, D, NT>(sK, kb, kvrs, n0, S, tid);
    load_tile<BN, D, NT>(sQ, vb, kvrs, n0, S, tid);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    unsigned vf[D / 16][4];
    unsigned kf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        ldsm4(vf[kk], sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        ldsm4(kf[kk], sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
    }
    __syncthreads();
    issue(0);

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.f;

    const float sl2 = scale * ATTN_LOG2E;
    const int kw0 = n0 + warp * 16;      // first key of this warp
    const int key0 = kw0 + (lane >> 2);  // keys of accumulator elements 0,1 (and +8 for 2,3)

    for (int it = 0; it < iters; ++it) {
        const int h = hk * G + it / per_head, m0 = (m_begin + it % per_head) * BMQ;
        cp_async_wait_all();
        __syncthreads();  // tile it has landed for every thread; everyone is done with sdS

        // warp-uniform: some (key, query) pair is visible
        const bool active = kw0 <= m0 + BMQ - 1 && (window == 0 || m0 < kw0 + 15 + window);
        float st[BMQ / 8][4], dpt[BMQ / 8][4];    // S^T -> P^T, dP^T -> dS^T (16 keys x BMQ queries)
#pragma unroll
        for (int i = 0; i < BMQ / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
        if (active) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                const unsigned(&ka)[4] = kf[kk];
#pragma unroll
                for (int np = 0; np < BMQ / 16; ++np) {
                    const int off = (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
                    unsigned bq[4], bd[4];
                    ldsm4(bq, sQ + off);
                    ldsm4(bd, sdO + off);
                    mma16816(st[2 * np], ka, bq[0], bq[1]);
                    mma16816(st[2 * np + 1], ka, bq[2], bq[3]);
                    mma16816(dpt[2 * np], vf[kk], bd[0], bd[1]);
                    mma16816(dpt[2 * np + 1], vf[kk], bd[2], bd[3]);
                }
            }
            const bool need_mask = (kw0 + 15 > m0) || (m0 + BMQ > S) || (window > 0 && m0 + BMQ - 1 - kw0 >= window);
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt) {
                const int qc = nt * 8 + 2 * (lane & 3);
                const float2 L = *reinterpret_cast<const float2*>(sLse + qc);
                const float2 Dl = *reinterpret_cast<const float2*>(sDelta + qc);
                const float nl[2] = {-L.x * ATTN_LOG2E, -L.y * ATTN_LOG2E}, dl[2] = {Dl.x, Dl.y};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ql = qc + (e & 1);
                    float p = exp2f(fmaf(st[nt][e], sl2, nl[e & 1]));
                    const int key = key0 + (e >> 1) * 8, q = m0 + ql;
                    if (need_mask && (key > q || q >= S || (window > 0 && q - key >= window))) p = 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - dl[e & 1]);
                }
            }
            // dV += P^T dO and dK += dS^T Q (B operands: [query][dim] tiles via ldmatrix.trans).
#pragma unroll
            for (int kk = 0; kk < BMQ / 16; ++kk) {
                const unsigned pa[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                        pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                        pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                const unsigned da[4] = {pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]),
                                        pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                                        pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                        pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    const int off = (kk * 16 + (lane & 15)) * LD + dp * 16 + (lane >> 4) * 8;
                    unsigned bd[4], bq[4];
                    ldsm4t(bd, sdO + off);
                    ldsm4t(bq, sQ + off);
                    mma16816(dva[2 * dp], pa, bd[0], bd[1]);
                    mma16816(dva[2 * dp + 1], pa, bd[2], bd[3]);
                    mma16816(dka[2 * dp], da, bq[0], bq[1]);
                    mma16816(dka[2 * dp + 1], da, bq[2], bq[3]);
                }
            }
        }
        // dS^T (bf16) to shared memory for the dQ product (zeros from inactive warps).
        {
            const int r = warp * 16 + (lane >> 2);
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt) {
                const int c = nt * 8 + 2 * (lane & 3);
                *reinterpret_cast<unsigned*>(sdS + r * LDS + c) = pack_bf16(dpt[nt][0], dpt[nt][1]);
                *reinterpret_cast<unsigned*>(sdS + (r + 8) * LDS + c) = pack_bf16(dpt[nt][2], dpt[nt][3]);
            }
        }
        __syncthreads();  // dS^T complete; Q and dO tiles no longer read
        if (it + 1 < iters) issue(it + 1);

        // dQ[BMQ x D] += dS K: warp takes query rows qr..qr+31 and dims dc0..dc0+31.
        const int qr = (warp & 1) * 32, dc0 = (warp >> 1) * 32;
        float dqa[2][4][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) dqa[mt][i][0] = dqa[mt][i][1] = dqa[mt][i][2] = dqa[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[2][4], bk[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                ldsm4t(a[mt], sdS + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + qr + mt * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int dp = 0; dp < 2; ++dp)
                ldsm4t(bk[dp], sK + (kk * 16 + (lane & 15)) * LD + dc0 + dp * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int dp = 0; dp < 2; ++dp) {
                    mma16816(dqa[mt][2 * dp], a[mt], bk[dp][0], bk[dp][1]);
                    mma16816(dqa[mt][2 * dp + 1], a[mt], bk[dp][2], bk[dp][3]);
                }
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = m0 + qr + mt * 16 + (lane >> 2) + r * 8;
                if (row < S) {
                    float* dst = dq_acc + (((size_t)b * S + row) * Hq + h) * D + dc0 + 2 * (lane & 3);
#pragma unroll
                    for (int dt = 0; dt < 4; ++dt)
                        red_add_f32x2(dst + dt * 8, dqa[mt][dt][2 * r] * scale, dqa[mt][dt][2 * r + 1] * scale);
                }
            }
    }

    // dK (scaled) and dV, summed over the group's query heads, written once.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + r * 8;
        if (key < S) {
            const size_t off = ((size_t)b * S + key) * kvrs + (size_t)hk * D + 2 * (lane & 3);
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<unsigned*>(dk + off + dt * 8) =
                    pack_bf16(dka[dt][2 * r] * scale, dka[dt][2 * r + 1] * scale);
                *reinterpret_cast<unsigned*>(dv + off + dt * 8) = pack_bf16(dva[dt][2 * r], dva[dt][2 * r + 1]);
            }
        }
    }
}

#define ATTN_BWD(NAME, IMPL, IMPL_W)                                                                            \
    extern "C" __global__ void __launch_bounds__(128, 2)                                                       \
        NAME(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta, \
             float* dq_acc, bf16* dk, bf16* dv, int window, int B, int S, int Hq, int Hkv, float scale) {        \
        IMPL(q, k, v, dout, lse, delta, dq_acc, dk, dv, window, B, S, Hq, Hkv, scale);                          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(128, 2)                                                       \
        NAME##_w(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,               \
                 const float* delta, float* dq_acc, bf16* dk, bf16* dv, int window, int B, int S, int Hq,       \
                 int Hkv, float scale) {                                                                        \
        IMPL_W(q, k, v, dout, lse, delta, dq_acc, dk, dv, window, B, S, Hq, Hkv, scale);                        \
    }
ATTN_BWD(flash_attn_bwd_d32, (bwd_impl<32, 32, 64, false>), (bwd_impl<32, 32, 64, true>))
ATTN_BWD(flash_attn_bwd_d64, bwd64_impl<false>, bwd64_impl<true>)
ATTN_BWD(flash_attn_bwd_d128, (bwd_impl<128, 128, 32, false>), (bwd_impl<128, 128, 32, true>))
ATTN_BWD(flash_attn_bwd_d192_128, (bwd_impl<192, 128, 16, false>), (bwd_impl<192, 128, 16, true>))

// dsinks[h] += −Σ_{b,i} exp(sink_h − lse[b,h,i])·delta[b,h,i] (a sink's share of row i times
// −δ_i: it takes probability mass and gives no value); one block per head, a fixed order.
extern "C" __global__ void __launch_bounds__(256)
    flash_attn_sink_grad(const float* lse, const float* delta, const bf16* sinks, float* dsinks, int B, int S, int Hq) {
    __shared__ float part[256];
    const int h = blockIdx.x;
    const float sk = __bfloat162float(sinks[h]);
    float acc = 0.f;
    for (int bi = threadIdx.x; bi < B * S; bi += blockDim.x) {
        const size_t at = ((size_t)(bi / S) * Hq + h) * S + bi % S;
        acc -= expf(sk - lse[at]) * delta[at];
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) dsinks[h] += part[0];
}

// dq[i] = bf16(dq_acc[i]), grid-stride.
extern "C" __global__ void __launch_bounds__(256) flash_attn_dq_cast(const float* dq_acc, bf16* dq, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dq[i] = __float2bfloat16(dq_acc[i]);
}

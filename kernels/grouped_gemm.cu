// Grouped GEMMs for MoE experts on Hopper (sm_90a): bf16 in, fp32 accumulation with warpgroup
// MMA (wgmma.mma_async m64n128k16, operands in shared memory) fed by a 3-stage cp.async
// pipeline, one wgmma group kept in flight. For each group g, rows offsets[g] .. offsets[g+1]:
//   grouped_gemm_nn:  y_g (+)= x_g · w_g     x [rows, K], w_g [K, N] row-major (w = [G, K, N])
//   grouped_gemm_nt:  y_g (+)= x_g · w_gᵀ    x [rows, K], w_g [N, K] row-major (w = [G, N, K])
//   grouped_wgrad:    dw_g += x_gᵀ · dy_g    x [rows, K], dy [rows, N] (passed as w), dw f32 [G, K, N]
// y [rows, N] bf16 row-major; `acc` != 0 adds to it (wgrad always adds). K % 64 == 0 (wgrad:
// K % 128 == 0) and N % 128 == 0: the host checks, and uses cuBLAS otherwise or on other GPUs.
//
// Launch: grid (tiles, 1, 1), block (256, 1, 1), dynamic shared 3 · 32 KiB + 1 KiB (the host
// raises the kernel's limit; two blocks fit an SM), where tiles = tile_start[G] and group g owns
// tiles tile_start[g] .. tile_start[g+1]: ceil(rows_g / 128) row tiles × N / 128 column tiles
// (column fastest, so neighbouring blocks share rows of x); for wgrad K / 128 × N / 128 tiles of
// dw_g when the group has rows, none otherwise. offsets and tile_start are int [G+1] in device
// memory: group sizes are read on the device.
//
// A block computes a 128×128 output tile: warpgroup 0 its rows 0-63, warpgroup 1 rows 64-127, one
// m64n128k16 wgmma per 16 of the reduction. Shared tiles use the 128-byte swizzle wgmma reads
// (16-byte chunk c of a 128-byte row r sits at chunk c ^ (r % 8); 8 rows = one 1024-byte atom):
//   K-major (x in nn/nt, w in nt): [128 rows][64 k], atoms of 8 rows 1024 bytes apart (SBO);
//   MN-major (w in nn, x and dy in wgrad): [2 halves of 64][64 k][64 m or n], atoms of 8 k-rows
//   1024 bytes apart (SBO), halves 8 KiB apart (LBO), read transposed (imm-trans = 1).
// cp.async writes go through the generic proxy; each thread fences them to the async proxy
// (fence.proxy.async) before the barrier that precedes the wgmma reading them.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#define BM 128
#define BN 128
#define BK 64
#define STAGES 3
#define TILE_BYTES (BM * BK * 2)  // 16 KiB: one operand's tile (x's, or w's: BN * BK * 2)

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// A shared-memory matrix descriptor: start address, leading and stride byte offsets (16-byte
// units), 128-byte swizzle (mode 1 in bits 62-63).
__device__ __forceinline__ unsigned long long desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WG_ACC                                                                                                        \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),       \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),        \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),       \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),       \
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),       \
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),       \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),       \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define WG_D                                                                                                          \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29," \
    "%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,"    \
    "%57,%58,%59,%60,%61,%62,%63}"

// d (64 f32 per thread: the warpgroup's 64×128 tile) += A (64×16) · B (16×128); TA / TB: the
// operand is MN-major (read transposed) rather than K-major.
template <int TA, int TB>
__device__ __forceinline__ void wgmma(float (&d)[64], unsigned long long a, unsigned long long b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_D ", %64, %65, 1, 1, 1, %66, %67;\n"
                 : WG_ACC
                 : "l"(a), "l"(b), "n"(TA), "n"(TB));
}
#endif

enum Mode { NN, NT, WGRAD };

// One 128×128 tile of the output per block; see the top of the file.
template <Mode M>
__device__ void grouped(const bf16* __restrict__ x, const bf16* __restrict__ w, void* __restrict__ out,
                        const int* __restrict__ offsets, const int* __restrict__ tile_start, int groups, int K, int N,
                        int acc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char smem_raw[];
    // Stage s: A's tile at base + s * 2 * TILE_BYTES, B's right after; 1024-byte aligned atoms.
    const unsigned base = (smem_u32(smem_raw) + 1023) & ~1023u;
    // Which group and tile: the last g with tile_start[g] <= blockIdx.x.
    const int tile = blockIdx.x;
    int lo = 0, hi = groups - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (tile_start[mid] <= tile) lo = mid;
        else hi = mid - 1;
    }
    const int g = lo, ntn = N / BN, local = tile - tile_start[g], rows_end = offsets[g + 1];
    // NN, NT: tile rows row0.. of x / y, reduction over K. WGRAD: tile rows m0.. of dw_g (columns
    // of x), reduction over the group's rows of x and dy (w is dy [rows, N] there).
    const int m0 = (local / ntn) * BM, col0 = (local % ntn) * BN;
    const int row0 = M == WGRAD ? offsets[g] : offsets[g] + m0;
    const bf16* wg = M == WGRAD ? w : w + (size_t)g * K * N;
    const int t = threadIdx.x, wgi = t >> 7;

    auto load = [&](int stage, int kt) {
        const unsigned sa = base + stage * 2 * TILE_BYTES, sb = sa + TILE_BYTES;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int c = t + i * 256;
            if (M == WGRAD) {  // A = x_gᵀ, MN-major: 64 rows of x (k) × 128 of its columns (m), two halves
                int r = c >> 4, ch = c & 15, half = ch >> 3, cc = ch & 7, row = row0 + kt * BK + r;
                bool ok = row < rows_end;
                cp_async16(sa + half * 8192 + r * 128 + ((cc ^ (r & 7)) << 4),
                           x + (size_t)(ok ? row : 0) * K + m0 + ch * 8, ok);
            } else {  // A = x_g, K-major: 128 rows × 8 chunks of K
                int r = c >> 3, ch = c & 7;
                bool ok = row0 + r < rows_end;
                cp_async16(sa + r * 128 + ((ch ^ (r & 7)) << 4), x + (size_t)(ok ? row0 + r : 0) * K + kt * BK + ch * 8,
                           ok);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int c = t + i * 256;
            if (M == NT) {  // w_g [N, K], K-major: 128 rows (n) × 8 chunks (k)
                int r = c >> 3, ch = c & 7;
                cp_async16(sb + r * 128 + ((ch ^ (r & 7)) << 4), wg + (size_t)(col0 + r) * K + kt * BK + ch * 8, true);
            } else {  // w_g [K, N] (or dy [rows, N]), N-major: 64 rows (k) × 16 chunks (n), two halves
                int r = c >> 4, ch = c & 15, half = ch >> 3, cc = ch & 7;
                int row = M == WGRAD ? row0 + kt * BK + r : kt * BK + r;
                bool ok = M != WGRAD || row < rows_end;
                cp_async16(sb + half * 8192 + r * 128 + ((cc ^ (r & 7)) << 4),
                           wg + (size_t)(ok ? row : 0) * N + col0 + ch * 8, ok);
            }
        }
    };

    float d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0.f;

    const int kts = M == WGRAD ? (rows_end - row0 + BK - 1) / BK : K / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < kts) load(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < kts; kt++) {
        cp_async_wait<STAGES - 2>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // stage kt has landed for every thread
        const unsigned sa = base + (kt % STAGES) * 2 * TILE_BYTES, sb = sa + TILE_BYTES;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int s = 0; s < BK / 16; s++) {
            if (M == NT) wgmma<0, 0>(d, desc(sa + wgi * 8192 + s * 32, 16, 1024), desc(sb + s * 32, 16, 1024));
            if (M == NN) wgmma<0, 1>(d, desc(sa + wgi * 8192 + s * 32, 16, 1024), desc(sb + s * 2048, 8192, 1024));
            if (M == WGRAD)
                wgmma<1, 1>(d, desc(sa + wgi * 8192 + s * 2048, 8192, 1024), desc(sb + s * 2048, 8192, 1024));
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        // Keep this group in flight; once the previous one is done in both warpgroups its stage
        // takes the tile STAGES - 1 ahead.
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        __syncthreads();
        if (kt + STAGES - 1 < kts) load((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    cp_async_wait<0>();

    // Epilogue: thread (warp w, lane l) of a warpgroup holds rows 16w + l/4 and 16w + l/4 + 8 of
    // its 64, columns 8i + 2(l%4), +1 for i < 16.
    const int lane = t & 31, wr = (t >> 5) & 3;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = m0 + wgi * 64 + wr * 16 + (lane >> 2) + h * 8;
        if (M != WGRAD && offsets[g] + r >= rows_end) continue;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            int c = col0 + i * 8 + (lane & 3) * 2;
            float v0 = d[i * 4 + h * 2], v1 = d[i * 4 + h * 2 + 1];
            if (M == WGRAD) {  // dw_g [K, N] f32, always accumulated
                float2* p = reinterpret_cast<float2*>((float*)out + (size_t)g * K * N + (size_t)r * N + c);
                float2 old = *p;
                *p = make_float2(old.x + v0, old.y + v1);
            } else {
                __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>((bf16*)out + (size_t)(offsets[g] + r) * N + c);
                if (acc) {
                    float2 old = __bfloat1622float2(*p);
                    v0 += old.x;
                    v1 += old.y;
                }
                *p = __floats2bfloat162_rn(v0, v1);
            }
        }
    }
#endif
}

#define ENTRY(name, mode)                                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 2) name(const bf16* x, const bf16* w, void* out,               \
                                                              const int* offsets, const int* tile_start, int groups,  \
                                                              int K, int N, int acc) {                                \
        grouped<mode>(x, w, out, offsets, tile_start, groups, K, N, acc);                                             \
    }
ENTRY(grouped_gemm_nn, NN)
ENTRY(grouped_gemm_nt, NT)
ENTRY(grouped_wgrad, WGRAD)

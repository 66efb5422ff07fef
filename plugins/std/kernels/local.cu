// local comm schedule (see src/local.rs). rows[i] = the sorted row of pair i = t·k + slot;
// within an expert, rows keep (token, slot) order. bf16 rows, fp32 math, no float atomics.
#include <cuda_bf16.h>

#define FULL 0xffffffffu

// One block of 1024 threads per expert e (grid-stride over experts) walks ids [n] in chunks;
// a ballot and a block prefix sum rank the pairs routed to e: rank[i] = the position of pair i
// within its expert, counts[e] = the pairs routed to e. Ids outside 0..E are in no count.
extern "C" __global__ void local_rank(const int* ids, int* rank, int* counts, int n, int E) {
    __shared__ int warp_prefix[32];
    __shared__ int chunk_total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
        int base = 0;
        for (int start = 0; start < n; start += blockDim.x) {
            int i = start + threadIdx.x;
            bool mine = i < n && ids[i] == e;
            unsigned ballot = __ballot_sync(FULL, mine);
            if (lane == 0) warp_prefix[warp] = __popc(ballot);
            __syncthreads();
            if (warp == 0) {  // inclusive scan of the per-warp counts
                int v = lane < warps ? warp_prefix[lane] : 0;
                for (int o = 1; o < 32; o <<= 1) {
                    int u = __shfl_up_sync(FULL, v, o);
                    if (lane >= o) v += u;
                }
                if (lane < warps) warp_prefix[lane] = v;
                if (lane == 31) chunk_total = v;
            }
            __syncthreads();
            if (mine) rank[i] = base + (warp ? warp_prefix[warp - 1] : 0) + __popc(ballot & ((1u << lane) - 1));
            base += chunk_total;
            __syncthreads();  // warp_prefix and chunk_total are rewritten by the next chunk
        }
        if (threadIdx.x == 0) counts[e] = base;
    }
}

// The row kernels below give each row to one warp (8 warps per 256-thread block, grid-stride)
// and move 8 bf16 (16 bytes) per lane per load when H is a multiple of 8, else one element.
#define WARPS 8

// Row i of the warp's walk, or -1 past the end.
__device__ __forceinline__ int warp_row(int step, int n) {
    int i = (step * gridDim.x + blockIdx.x) * WARPS + (threadIdx.x >> 5);
    return i < n ? i : -1;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
    uint4 u = *(const uint4*)p;
    const __nv_bfloat162* h = (const __nv_bfloat162*)&u;
    for (int j = 0; j < 4; j++) {
        float2 t = __bfloat1622float2(h[j]);
        f[2 * j] = t.x;
        f[2 * j + 1] = t.y;
    }
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* f) {
    uint4 u;
    __nv_bfloat162* h = (__nv_bfloat162*)&u;
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    *(uint4*)p = u;
}

// Columns a lane handles: [c, c + width) for c = lane·8, lane·8 + 256, ... (width 8), or
// c = lane, lane + 32, ... (width 1) when rows are not 16-byte aligned.
#define FOR_COLUMNS(H, c, width)                                   \
    for (int width = (H) % 8 == 0 ? 8 : 1, c = (threadIdx.x & 31) * width; c < (H); c += 32 * width)

__device__ __forceinline__ void load_n(const __nv_bfloat16* p, float* f, int width) {
    if (width == 8) load8(p, f);
    else f[0] = __bfloat162float(p[0]);
}
__device__ __forceinline__ void store_n(__nv_bfloat16* p, const float* f, int width) {
    if (width == 8) store8(p, f);
    else p[0] = __float2bfloat16(f[0]);
}

// Warp per pair i: rows[i] = offsets[ids[i]] + rank[i];  xs[rows[i]] = x[i / k].
extern "C" __global__ void local_gather(const __nv_bfloat16* x, const int* ids, const int* rank, const int* offsets,
                                        int* rows, __nv_bfloat16* xs, int n, int k, int H) {
    for (int step = 0, i; (i = warp_row(step, n)) >= 0; step++) {
        int r = offsets[ids[i]] + rank[i];
        if ((threadIdx.x & 31) == 0) rows[i] = r;
        const __nv_bfloat16* src = x + (long long)(i / k) * H;
        __nv_bfloat16* dst = xs + (long long)r * H;
        float f[8];
        FOR_COLUMNS(H, c, width) {
            load_n(src + c, f, width);
            store_n(dst + c, f, width);
        }
    }
}

// Warp per token t: out[t] = Σ_slot w[t,slot] · y[rows[t·k + slot]].
extern "C" __global__ void local_combine(const __nv_bfloat16* y, const float* w, const int* rows,
                                         __nv_bfloat16* out, int T, int k, int H) {
    for (int step = 0, t; (t = warp_row(step, T)) >= 0; step++) {
        FOR_COLUMNS(H, c, width) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, f[8];
            for (int s = 0; s < k; s++) {
                int i = t * k + s;
                load_n(y + (long long)rows[i] * H + c, f, width);
                for (int j = 0; j < width; j++) acc[j] += w[i] * f[j];
            }
            store_n(out + (long long)t * H + c, acc, width);
        }
    }
}

// Warp per pair i = t·k + slot: dy[rows[i]] = w[i] · dout[t];  dw[i] = ⟨dout[t], y[rows[i]]⟩
// (a fixed-order warp sum, so the result is reproducible).
extern "C" __global__ void local_combine_bwd(const __nv_bfloat16* dout, const __nv_bfloat16* y, const float* w,
                                             const int* rows, __nv_bfloat16* dy, float* dw, int n, int k, int H) {
    for (int step = 0, i; (i = warp_row(step, n)) >= 0; step++) {
        const __nv_bfloat16* g = dout + (long long)(i / k) * H;
        long long r = (long long)rows[i] * H;
        float dot = 0.f, gf[8], yf[8];
        FOR_COLUMNS(H, c, width) {
            load_n(g + c, gf, width);
            load_n(y + r + c, yf, width);
            for (int j = 0; j < width; j++) {
                dot += gf[j] * yf[j];
                gf[j] *= w[i];
            }
            store_n(dy + r + c, gf, width);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL, dot, o);
        if ((threadIdx.x & 31) == 0) dw[i] = dot;
    }
}

// Warp per token t: dx[t] = Σ_slot dx_sorted[rows[t·k + slot]].
extern "C" __global__ void local_dispatch_bwd(const __nv_bfloat16* dxs, const int* rows, __nv_bfloat16* dx, int T,
                                              int k, int H) {
    for (int step = 0, t; (t = warp_row(step, T)) >= 0; step++) {
        FOR_COLUMNS(H, c, width) {
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, f[8];
            for (int s = 0; s < k; s++) {
                load_n(dxs + (long long)rows[t * k + s] * H + c, f, width);
                for (int j = 0; j < width; j++) acc[j] += f[j];
            }
            store_n(dx + (long long)t * H + c, acc, width);
        }
    }
}

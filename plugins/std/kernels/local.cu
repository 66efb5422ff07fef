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

// One block per pair i (grid-stride): rows[i] = offsets[ids[i]] + rank[i];  xs[rows[i]] = x[i / k].
extern "C" __global__ void local_gather(const __nv_bfloat16* x, const int* ids, const int* rank, const int* offsets,
                                        int* rows, __nv_bfloat16* xs, int n, int k, int H) {
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        int r = offsets[ids[i]] + rank[i];
        if (threadIdx.x == 0) rows[i] = r;
        const __nv_bfloat16* src = x + (long long)(i / k) * H;
        __nv_bfloat16* dst = xs + (long long)r * H;
        for (int c = threadIdx.x; c < H; c += blockDim.x) dst[c] = src[c];
    }
}

// One block per token t: out[t] = Σ_slot w[t,slot] · y[rows[t·k + slot]].
extern "C" __global__ void local_combine(const __nv_bfloat16* y, const float* w, const int* rows,
                                         __nv_bfloat16* out, int T, int k, int H) {
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float acc = 0.f;
            for (int s = 0; s < k; s++) {
                int i = t * k + s;
                acc += w[i] * __bfloat162float(y[(long long)rows[i] * H + c]);
            }
            out[(long long)t * H + c] = __float2bfloat16(acc);
        }
    }
}

// One block of 256 threads per pair i = t·k + slot: dy[rows[i]] = w[i] · dout[t];
// dw[i] = ⟨dout[t], y[rows[i]]⟩ (a fixed-order block sum).
extern "C" __global__ void local_combine_bwd(const __nv_bfloat16* dout, const __nv_bfloat16* y, const float* w,
                                             const int* rows, __nv_bfloat16* dy, float* dw, int n, int k, int H) {
    __shared__ float part[256];
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const __nv_bfloat16* g = dout + (long long)(i / k) * H;
        long long r = (long long)rows[i] * H;
        float dot = 0.f;
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float gc = __bfloat162float(g[c]);
            dy[r + c] = __float2bfloat16(w[i] * gc);
            dot += gc * __bfloat162float(y[r + c]);
        }
        part[threadIdx.x] = dot;
        __syncthreads();
        for (int o = blockDim.x / 2; o > 0; o >>= 1) {
            if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
            __syncthreads();
        }
        if (threadIdx.x == 0) dw[i] = part[0];
        __syncthreads();  // part is reused by the next pair
    }
}

// One block per token t: dx[t] = Σ_slot dx_sorted[rows[t·k + slot]].
extern "C" __global__ void local_dispatch_bwd(const __nv_bfloat16* dxs, const int* rows, __nv_bfloat16* dx, int T,
                                              int k, int H) {
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        for (int c = threadIdx.x; c < H; c += blockDim.x) {
            float acc = 0.f;
            for (int s = 0; s < k; s++) acc += __bfloat162float(dxs[(long long)rows[t * k + s] * H + c]);
            dx[(long long)t * H + c] = __float2bfloat16(acc);
        }
    }
}

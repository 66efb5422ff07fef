// Cross-entropy per row of logits bf16 [T, V] against targets i32 [T], fp32 math
// (layers.rs cross_entropy):
//   losses[r] = lse − logit[target],  lse = m + log Σ_j exp(logit_j − m)
// With grad != 0, the row is then overwritten in place by the gradient, as bf16:
//   logits[j] = scale·(exp(logit_j − lse) − [j == target])
// A target outside [0, V) gives a NaN loss (and no one-hot term).
//
// Launch: one block per row (grid T), block 1024 threads for large V (256 for small), no
// dynamic shared memory. Pass 1 keeps a running (max, Σexp) per thread over 16-byte loads of
// 8 logits (when V % 8 == 0 and the logits are 16-byte aligned, else one logit at a time),
// merged across the block with warp shuffles; pass 2 (the gradient) reads the row once more.
#include <cuda_bf16.h>

#define FULL 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)
#define NAN_F __int_as_float(0x7fc00000)
typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

// (m, s) ⊕ (m2, s2): the running max and the sum of exp(· − max) of both.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;  // both empty (or all −inf)
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

__device__ __forceinline__ void unpack8(uint4 u, float* v) {
    const bf162* h = reinterpret_cast<const bf162*>(&u);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 f = __bfloat1622float2(h[k]);
        v[2 * k] = f.x, v[2 * k + 1] = f.y;
    }
}

extern "C" __global__ void cross_entropy(bf16* logits, const int* targets, float* losses, int V, int grad,
                                         float scale) {
    __shared__ float sm[32], ss[32];
    const long long row = blockIdx.x;
    bf16* l = logits + row * V;
    const int tgt = targets[row];
    const bool valid = tgt >= 0 && tgt < V;
    // Read before pass 2 overwrites the row (the block reduction below syncs in between).
    const float xt = threadIdx.x == 0 && valid ? __bfloat162float(l[tgt]) : NAN_F;
    const bool vec = V % 8 == 0 && ((unsigned long long)logits & 15ull) == 0;

    float m = NEG_INF, s = 0.f;
    if (vec) {
        for (int p = threadIdx.x; p < V / 8; p += blockDim.x) {
            float v[8];
            unpack8(reinterpret_cast<const uint4*>(l)[p], v);
            float pm = v[0];
#pragma unroll
            for (int k = 1; k < 8; k++) pm = fmaxf(pm, v[k]);
            if (pm == NEG_INF) continue;
            float ps = 0.f;
#pragma unroll
            for (int k = 0; k < 8; k++) ps += expf(v[k] - pm);
            merge(m, s, pm, ps);
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) merge(m, s, __bfloat162float(l[j]), 1.f);
    }
    for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(FULL, m, o), __shfl_xor_sync(FULL, s, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) sm[warp] = m, ss[warp] = s;
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? sm[lane] : NEG_INF;
        s = lane < warps ? ss[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) merge(m, s, __shfl_xor_sync(FULL, m, o), __shfl_xor_sync(FULL, s, o));
        if (lane == 0) sm[0] = m, ss[0] = s;
    }
    __syncthreads();
    const float lse = sm[0] + logf(ss[0]);
    if (threadIdx.x == 0) losses[row] = valid ? lse - xt : NAN_F;
    if (!grad) return;

    if (vec) {
        for (int p = threadIdx.x; p < V / 8; p += blockDim.x) {
            uint4* q = reinterpret_cast<uint4*>(l) + p;
            float v[8];
            unpack8(*q, v);
            uint4 u;
            bf162* h = reinterpret_cast<bf162*>(&u);
#pragma unroll
            for (int k = 0; k < 8; k += 2) {
                float g0 = scale * expf(v[k] - lse), g1 = scale * expf(v[k + 1] - lse);
                if (8 * p + k == tgt) g0 -= scale;
                if (8 * p + k + 1 == tgt) g1 -= scale;
                h[k / 2] = __floats2bfloat162_rn(g0, g1);
            }
            *q = u;
        }
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            float g = scale * expf(__bfloat162float(l[j]) - lse);
            if (j == tgt) g -= scale;
            l[j] = __float2bfloat16(g);
        }
    }
}

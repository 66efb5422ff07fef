// noisy-topk router (Shazeer et al. 2017 noisy top-k gating); src/lib.rs has the math and the CPU
// reference these kernels mirror. Compiled after the kit's helpers (plugin-api/kernels/common.cuh:
// warp_sum, softmax_stats, block_sum, FULL, NEG_INF, cuda_bf16.h). The row kernels run one warp per
// token row, 8 warps (256 threads) a block, grid-stride over rows. E <= 1024: a lane holds experts
// j = lane + 32·b (b < 32), one bit each in `taken`; top_k <= 32: lane q holds slot q. No float
// atomics: every sum has a fixed order.
//
// The noise of element i = (first_row + row)·E + e is a function of (key, i): 64 bits from
// splitmix64 of key + (i + 1)·φ, then a Box–Muller normal or a uniform jitter, exactly as
// `Draw::bits`, `normal` and `jitter_factor` in src/lib.rs. Products are kept apart from the adds
// (__fmul_rn: no fused multiply-add) where the CPU rounds them separately.

#define NT_NO_ID 0x7fffffff

__device__ __forceinline__ unsigned long long nt_bits(unsigned long long key, unsigned long long i) {
    unsigned long long z = key + (i + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// A standard normal: Box–Muller on u1 in (0, 1] and u2 in [0, 1), 24 bits each.
__device__ __forceinline__ float nt_normal(unsigned long long b) {
    float u1 = 1.f - (float)(unsigned)(b >> 40) * (1.f / 16777216.f);
    float u2 = (float)(unsigned)((b >> 16) & 0xFFFFFFull) * (1.f / 16777216.f);
    return __fmul_rn(sqrtf(-2.f * logf(u1)), cosf(__fmul_rn(6.28318530717958647692f, u2)));
}

// 1 + u, u uniform in [−j, j).
__device__ __forceinline__ float nt_jitter(unsigned long long b, float j) {
    float u = (float)(unsigned)(b >> 40) * (1.f / 16777216.f);
    return 1.f + __fmul_rn(j, 2.f * u - 1.f);
}

__device__ __forceinline__ float nt_softplus(float n) { return n > 20.f ? n : log1pf(expf(n)); }

__device__ __forceinline__ float nt_sigmoid(float n) { return 1.f / (1.f + expf(-n)); }

// Keep the better of (bv, bi) and the partner lane's: the larger value, the lower id on ties.
__device__ __forceinline__ void nt_warp_best(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL, bv, o);
        int oi = __shfl_xor_sync(FULL, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
}

// logits [T,E] (the clean x·Wᵀ) += the noise, in place, grid-stride over T·E:
//   mode 1 (learned): + ε·softplus(nlog), nlog [T,E] = x·W_nᵀ;   mode 2 (jitter): × (1 + u).
extern "C" __global__ void noisy_topk_noise(float* logits, const float* nlog, int T, int E, long long key,
                                            long long first_row, int mode, float jitter) {
    long long n = (long long)T * E, base = first_row * (long long)E;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned long long b = nt_bits((unsigned long long)key, (unsigned long long)(base + i));
        if (mode == 1)
            logits[i] = logits[i] + __fmul_rn(nt_normal(b), nt_softplus(nlog[i]));
        else
            logits[i] = __fmul_rn(logits[i], nt_jitter(b, jitter));
    }
}

// logits [T,E] (noisy in training) -> probs [T,E] = softmax, ent [T] (each row's entropy), ids [T,k]
// = the k largest logits (ties: the lower id; NaN below everything), weights [T,k] = their probs,
// over their sum when `normalize` (1 if that sum is 0).
extern "C" __global__ void noisy_topk_fwd(const float* logits, float* probs, int* ids, float* weights, float* ent,
                                          int T, int E, int k, int normalize) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E;
        const float* l = logits + row;
        float* p = probs + row;
        float mx, q, h = 0.f;
        softmax_stats(l, E, mx, q);
        for (int j = lane; j < E; j += 32) {
            float v = expf(l[j] - mx) / q;
            p[j] = v;
            if (v > 0.f) h -= v * logf(v);
        }
        h = warp_sum(h);
        if (lane == 0) ent[r] = h;
        __syncwarp();  // the gates read other lanes' probs
        unsigned taken = 0;
        int my_id = 0;
        for (int slot = 0; slot < k; slot++) {
            float bv = NEG_INF;
            int bi = NT_NO_ID;
            for (int j = lane, b = 0; j < E; j += 32, b++) {
                if (taken >> b & 1u) continue;
                float v = l[j] == l[j] ? l[j] : NEG_INF;
                if (bi == NT_NO_ID || v > bv) bv = v, bi = j;
            }
            nt_warp_best(bv, bi);
            if (lane == slot) my_id = bi;
            if (bi != NT_NO_ID && (bi & 31) == lane) taken |= 1u << (bi >> 5);
        }
        float my_p = lane < k ? p[my_id] : 0.f;
        float sel = warp_sum(my_p);
        float denom = normalize && sel > 0.f ? sel : 1.f;
        if (lane < k) {
            long long i = (long long)r * k + lane;
            ids[i] = my_id;
            weights[i] = my_p / denom;
        }
    }
}

// out[0] = Σ x[0..n), in a fixed order: one block of 256 threads.
extern "C" __global__ void noisy_topk_sum(const float* x, float* out, int n) {
    float s = block_sum<float>(x, n);
    if (threadIdx.x == 0) out[0] = s;
}

// Per row: g = d_logits + p ⊙ (dp − ⟨dp, p⟩) (∂L/∂l) with dp = d_probs plus, on the chosen ids,
// (dw − Σ dw·w) / Σ_chosen p when `normalize` (1 if that sum is 0), else dw; EMPTY slots (id < 0)
// add nothing. Then, with the noise redrawn from (key, first_row):
//   mode 0 (no noise): dc = g;   mode 1 (learned): dc = g, dn = g·ε·σ(nlog);   mode 2 (jitter):
//   dc = g·(1 + u). dc and dn [T,E] are bf16, for the GEMMs; nlog and dn are only read / written
//   in mode 1. Same launch as the forward (8 warps a block: dp_rows).
extern "C" __global__ void noisy_topk_bwd(const float* probs, const int* ids, const float* weights,
                                          const float* d_weights, const float* d_probs, const float* d_logits,
                                          __nv_bfloat16* dc, const float* nlog, __nv_bfloat16* dn, int T, int E,
                                          int k, int normalize, long long key, long long first_row, int mode,
                                          float jitter) {
    __shared__ float dp_rows[8][1024];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float* dp = dp_rows[threadIdx.x >> 5];
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* p = probs + (long long)r * E;
        long long i = (long long)r * k + lane, row = (long long)r * E;
        int id = lane < k ? ids[i] : -1;
        bool on = id >= 0;
        float pj = on ? p[id] : 0.f, w = on ? weights[i] : 0.f, dw = on ? d_weights[i] : 0.f;
        float d = dw;
        if (normalize) {
            float s = warp_sum(pj), dot = warp_sum(dw * w);
            d = (dw - dot) / (s > 0.f ? s : 1.f);
        }
        for (int j = lane; j < E; j += 32) dp[j] = d_probs[row + j];
        __syncwarp();
        if (on) dp[id] += d;  // the ids of a row are distinct
        __syncwarp();
        float pd = 0.f;
        for (int j = lane; j < E; j += 32) pd += p[j] * dp[j];
        pd = warp_sum(pd);
        unsigned long long base = (unsigned long long)((first_row + r) * (long long)E);
        for (int j = lane; j < E; j += 32) {
            float g = d_logits[row + j] + __fmul_rn(p[j], dp[j] - pd);
            float c = g;
            if (mode != 0) {
                unsigned long long b = nt_bits((unsigned long long)key, base + j);
                if (mode == 2) {
                    c = __fmul_rn(g, nt_jitter(b, jitter));
                } else {
                    dn[row + j] = __float2bfloat16(__fmul_rn(__fmul_rn(g, nt_normal(b)), nt_sigmoid(nlog[row + j])));
                }
            }
            dc[row + j] = __float2bfloat16(c);
        }
        __syncwarp();  // dp is rewritten for the next row
    }
}

// topk-softmax router (see src/router.rs for the math). One warp per token row, 8 warps (256
// threads) a block, grid-stride over rows. E <= 1024: a lane holds the probabilities
// j = lane + 32·b, b < 32, one bit each in `taken`; top_k <= 32: lane s holds slot s.

// logits [T,E] -> probs [T,E] (saved), ids [T,k], weights [T,k] and ent [T], the entropy of each
// row's probabilities. Ties go to the lower id; NaN ranks below every probability. Gates × scale.
extern "C" __global__ void topk_softmax_fwd(const float* logits, float* probs, int* ids, float* weights, float* ent,
                                            int T, int E, int k, int normalize, float scale) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* l = logits + (long long)r * E;
        float* p = probs + (long long)r * E;
        float m = NEG_INF, s = 0.f, h = 0.f;
        for (int j = lane; j < E; j += 32) m = fmaxf(m, l[j]);
        m = warp_max(m);
        for (int j = lane; j < E; j += 32) s += expf(l[j] - m);
        s = warp_sum(s);
        for (int j = lane; j < E; j += 32) {
            float v = expf(l[j] - m) / s;
            p[j] = v;
            if (v > 0.f) h -= v * logf(v);
        }
        h = warp_sum(h);
        if (lane == 0) ent[r] = h;
        // k rounds of a warp argmax over the probabilities not taken yet.
        unsigned taken = 0;
        int my_id = 0;
        float my_p = 0.f;
        for (int slot = 0; slot < k; slot++) {
            float bv = -1.f;
            int bi = 0x7fffffff;
            for (int j = lane, b = 0; j < E; j += 32, b++) {
                float v = p[j] == p[j] ? p[j] : -0.5f;
                if (!(taken >> b & 1u) && v > bv) bv = v, bi = j;
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(FULL, bv, o);
                int oi = __shfl_xor_sync(FULL, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
            }
            if (lane == slot) my_id = bi, my_p = bv;
            if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        }
        float sum = normalize ? warp_sum(lane < k ? my_p : 0.f) : 1.f;
        if (lane < k) {
            ids[(long long)r * k + lane] = my_id;
            weights[(long long)r * k + lane] = scale * my_p / sum;
        }
    }
}

// dl [T,E] (bf16, for the GEMMs) = d_logits + p ⊙ (dp − ⟨dp, p⟩) with dp = d_probs plus, on the
// chosen ids, d_weights (through the renormalisation when `normalize`); EMPTY slots (id < 0)
// add nothing; weights are the scaled gates. Same launch as the forward.
extern "C" __global__ void topk_softmax_bwd(const float* probs, const int* ids, const float* weights,
                                            const float* d_weights, const float* d_probs, const float* d_logits,
                                            __nv_bfloat16* dl, int T, int E, int k, int normalize, float scale) {
    __shared__ float dp_rows[8][1024];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float* dp = dp_rows[threadIdx.x >> 5];
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* p = probs + (long long)r * E;
        long long i = (long long)r * k + lane, row = (long long)r * E;
        int id = lane < k ? ids[i] : -1;
        bool on = id >= 0;
        float pj = on ? p[id] : 0.f, w = on ? weights[i] : 0.f, dw = on ? d_weights[i] : 0.f;
        float d = scale * dw;
        if (normalize) {
            float s = warp_sum(pj), dot = warp_sum(dw * w);
            d = s > 0.f ? (scale * dw - dot) / s : 0.f;
        }
        for (int j = lane; j < E; j += 32) dp[j] = d_probs[row + j];
        __syncwarp();
        if (on) dp[id] += d;  // ids of a row are distinct
        __syncwarp();
        float pd = 0.f;
        for (int j = lane; j < E; j += 32) pd += p[j] * dp[j];
        pd = warp_sum(pd);
        for (int j = lane; j < E; j += 32) dl[row + j] = __float2bfloat16(d_logits[row + j] + p[j] * (dp[j] - pd));
        __syncwarp();
    }
}

// With `bias`: logits [T,E] += b [E] (bf16, the parameter's working copy) on every row (grid-stride).
extern "C" __global__ void router_bias_add(float* logits, const __nv_bfloat16* b, long long n, int E) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        logits[i] += __bfloat162float(b[i % E]);
}

// g [E] += the column sums of dl [T,E] (bf16), in a fixed order: block e sums column e.
extern "C" __global__ void router_bias_grad(const __nv_bfloat16* dl, float* g, int T, int E) {
    __shared__ float part[256];
    const int e = blockIdx.x;
    float s = 0.f;
    for (int r = threadIdx.x; r < T; r += blockDim.x) s += __bfloat162float(dl[(long long)r * E + e]);
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) g[e] += part[0];
}

// out[0] = Σ x[0..n), in a fixed order: one block of 256 threads.
extern "C" __global__ void router_sum(const float* x, float* out, int n) {
    float s = block_sum<float>(x, n);
    if (threadIdx.x == 0) out[0] = s;
}

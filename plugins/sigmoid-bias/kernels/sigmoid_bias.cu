// sigmoid-bias router (see src/lib.rs and README.md for the math), compiled after the kit's
// common.cuh. Row kernels: one warp per token row, 8 warps (256 threads) a block, grid-stride
// over rows. E <= 1024: a lane holds the experts j = lane + 32·b, b < 32, one bit each in
// `taken`; top_k <= 32: lane s holds slot s.

// σ(l), the same expression in every kernel (and on the CPU: 1 / (1 + e^−l)).
__device__ __forceinline__ float sigmoid_of(float l) { return 1.f / (1.f + expf(-l)); }

// logits [T,E] and bias [E] -> probs [T,E] = s / Σ_e s with s = σ(logits), ids [T,k] = the top k
// of s + bias (ties: the lower id; NaN ranks below everything), weights [T,k] = the chosen s
// (not s + bias), divided by their sum when `normalize`, times `scale`. When `counts` is not null
// (training), counts[id] += 1 for every chosen id: integer atomics, exact in any order. With
// n_group > 1 (≤ 32, groups of E/n_group consecutive experts) only the experts of the topk_group
// groups whose two best s + bias sum highest (ties: the lower group) are candidates.
extern "C" __global__ void sigmoid_bias_fwd(const float* logits, const float* bias, float* probs, int* ids,
                                            float* weights, int* counts, int T, int E, int k, int normalize,
                                            float scale, int n_group, int topk_group) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* l = logits + (long long)r * E;
        float* p = probs + (long long)r * E;
        // s first (this lane's own entries of p, re-read only by this lane), then the sum.
        float q = 0.f;
        for (int j = lane; j < E; j += 32) {
            float s = sigmoid_of(l[j]);
            p[j] = s;
            q += s;
        }
        q = warp_sum(q);
        unsigned taken = 0;
        if (n_group > 1) {  // mark the experts outside the kept groups as taken
            const int m = E / n_group;
            float gscore = NEG_INF;  // lane g: group g's two best s + bias
            for (int g = 0; g < n_group; g++) {
                float a = NEG_INF, b = NEG_INF;
                for (int j = lane; j < E; j += 32) {
                    if (j / m != g) continue;
                    float v = p[j] + bias[j];
                    if (v != v) v = NEG_INF;
                    if (v > a) b = a, a = v;
                    else b = fmaxf(b, v);
                }
                for (int o = 16; o > 0; o >>= 1) {
                    float oa = __shfl_xor_sync(FULL, a, o), ob = __shfl_xor_sync(FULL, b, o);
                    float hi = fmaxf(a, oa), lo = fmaxf(fminf(a, oa), fmaxf(b, ob));
                    a = hi, b = lo;
                }
                if (lane == g) gscore = a + b;
            }
            unsigned keep = 0;
            for (int round = 0; round < topk_group; round++) {
                float bv = (lane < n_group && !(keep >> lane & 1u)) ? gscore : NEG_INF;
                int bi = lane < n_group && !(keep >> lane & 1u) ? lane : 0x7fffffff;
                if (bv != bv) bv = NEG_INF;
                for (int o = 16; o > 0; o >>= 1) {
                    float ov = __shfl_xor_sync(FULL, bv, o);
                    int oi = __shfl_xor_sync(FULL, bi, o);
                    if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
                }
                keep |= 1u << bi;
            }
            for (int j = lane, b = 0; j < E; j += 32, b++)
                if (!(keep >> (j / m) & 1u)) taken |= 1u << b;
        }
        // k rounds of a warp argmax of s + bias over the experts not taken yet, carrying s.
        int my_id = 0;
        float my_s = 0.f;
        for (int slot = 0; slot < k; slot++) {
            float bv = NEG_INF, bs = 0.f;
            int bi = 0x7fffffff;
            for (int j = lane, b = 0; j < E; j += 32, b++) {
                if (taken >> b & 1u) continue;
                float s = p[j], v = s + bias[j];
                if (v != v) v = NEG_INF;
                if (v > bv || (v == bv && j < bi)) bv = v, bi = j, bs = s;
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(FULL, bv, o), os = __shfl_xor_sync(FULL, bs, o);
                int oi = __shfl_xor_sync(FULL, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi, bs = os;
            }
            if (lane == slot) my_id = bi, my_s = bs;
            if (bi < E && (bi & 31) == lane) taken |= 1u << (bi >> 5);
        }
        float sel = warp_sum(lane < k ? my_s : 0.f);
        float denom = sel > 0.f ? sel : 1.f;
        if (lane < k) {
            long long i = (long long)r * k + lane;
            ids[i] = my_id;
            weights[i] = normalize ? my_s / denom * scale : my_s * scale;
            if (counts) atomicAdd(&counts[my_id], 1);
        }
        float qs = q > 0.f ? q : 1.f;
        for (int j = lane; j < E; j += 32) p[j] = p[j] / qs;
    }
}

// load[e] += counts[e] (the accumulator is f32; a count below 2^24 converts and adds exactly).
extern "C" __global__ void sigmoid_bias_load_add(const int* counts, float* load, int E) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) load[e] += (float)counts[e];
}

// dl [T,E] (bf16, for the two GEMMs) = d_logits + ds ⊙ s(1 − s), s = σ(logits), with
//   ds = (d_probs − ⟨d_probs, p⟩) / Σ_e s                      (through p = s / Σ s)
//      + on each chosen id: (scale·dw − Σ_slots dw·w) / Σ_chosen s  when `normalize`
//                           scale·dw                             otherwise
// EMPTY slots (id < 0) add nothing. Same launch as the forward.
extern "C" __global__ void sigmoid_bias_bwd(const float* logits, const float* probs, const int* ids,
                                            const float* weights, const float* d_weights, const float* d_probs,
                                            const float* d_logits, __nv_bfloat16* dl, int T, int E, int k,
                                            int normalize, float scale) {
    __shared__ float gate_rows[8][1024];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float* gs = gate_rows[threadIdx.x >> 5];
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E, i = (long long)r * k + lane;
        const float* l = logits + row;
        const float* p = probs + row;
        int id = lane < k ? ids[i] : -1;
        bool on = id >= 0;
        float sj = on ? sigmoid_of(l[id]) : 0.f, w = on ? weights[i] : 0.f, dw = on ? d_weights[i] : 0.f;
        float g = scale * dw;
        if (normalize) {
            float sel = warp_sum(sj), dot = warp_sum(dw * w);
            g = (scale * dw - dot) / (sel > 0.f ? sel : 1.f);
        }
        float q = 0.f, pd = 0.f;
        for (int j = lane; j < E; j += 32) {
            q += sigmoid_of(l[j]);
            pd += d_probs[row + j] * p[j];
            gs[j] = 0.f;
        }
        q = warp_sum(q);
        pd = warp_sum(pd);
        float qs = q > 0.f ? q : 1.f;
        __syncwarp();
        if (on) gs[id] = g;  // the ids of a row are distinct
        __syncwarp();
        for (int j = lane; j < E; j += 32) {
            float s = sigmoid_of(l[j]);
            float ds = (d_probs[row + j] - pd) / qs + gs[j];
            dl[row + j] = __float2bfloat16(d_logits[row + j] + ds * s * (1.f - s));
        }
        __syncwarp();
    }
}

// One block of 256 threads, once per optimizer step: with mean = Σ load / E (in double: the
// loads are integer counts, so the sum is exact in any order),
//   bias[e] += rate · sign(mean − load[e])   (sign 0 at 0; nothing when rate = 0),
// then out[0] = max_e |bias[e]| (the `bias_absmax` metric).
extern "C" __global__ void sigmoid_bias_end_step(float* bias, const float* load, float* out, int E, float rate) {
    __shared__ double mean;
    __shared__ float part[256];
    double total = block_sum<double>(load, E);
    if (threadIdx.x == 0) mean = total / (double)E;
    __syncthreads();
    float m = 0.f;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float b = bias[e];
        if (rate != 0.f) {
            double d = mean - (double)load[e];
            float sg = d > 0.0 ? 1.f : (d < 0.0 ? -1.f : 0.f);
            b = b + rate * sg;
            bias[e] = b;
        }
        m = fmaxf(m, fabsf(b));
    }
    part[threadIdx.x] = m;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] = fmaxf(part[threadIdx.x], part[threadIdx.x + o]);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = part[0];
}

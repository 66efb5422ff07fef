// top-any router (DynMoE); src/lib.rs has the math and the CPU reference these kernels mirror.
// Compiled after the kit's helpers (plugin-api/kernels/common.cuh: warp_sum, block_sum, FULL,
// NEG_INF, cuda_bf16.h). The row kernels run one warp per token row, 8 warps (256 threads) a
// block, grid-stride over rows. E <= 1024: a lane holds experts j = lane + 32·b (b < 32), one bit
// each in `taken`; max_k <= 32: lane q holds slot q. No float atomics: every sum has a fixed order.

#define NO_ID 0x7fffffff

__device__ __forceinline__ float top_any_sigmoid(float l) { return 1.f / (1.f + expf(-l)); }

// Keep the better of (bv, bi) and the partner lane's: the larger value, the lower id on ties. After
// the five steps every lane of the warp holds the same pair.
__device__ __forceinline__ void top_any_warp_best(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL, bv, o);
        int oi = __shfl_xor_sync(FULL, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
}

// logits [T,E], thr [E] (bf16 working copy of the thresholds) -> scores [T,E] = σ(logits) (saved
// for backward), probs [T,E] = scores / Σ scores, ids [T,k] and weights [T,k]: the experts whose
// logit beats their threshold (σ is monotone: l > τ is σ(l) > σ(τ)), by descending logit (ties: the
// lower id), at most k of them; none passing: the best logit alone (NaN ranks lowest). Slots past
// the count are EMPTY (-1) with weight 0. stats [2,T]: per row the experts used, then 1 where none
// passed.
extern "C" __global__ void top_any_fwd(const float* logits, const __nv_bfloat16* thr, float* scores, float* probs,
                                       int* ids, float* weights, float* stats, int T, int E, int k, int normalize) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E;
        const float* l = logits + row;
        float* s = scores + row;
        float sum = 0.f;
        for (int j = lane; j < E; j += 32) {
            float v = top_any_sigmoid(l[j]);
            s[j] = v;
            sum += v;
        }
        sum = warp_sum(sum);
        for (int j = lane; j < E; j += 32) probs[row + j] = sum > 0.f ? s[j] / sum : 1.f / E;
        __syncwarp();  // every lane reads the scores of the experts it holds a slot of, below
        // Up to k rounds of a warp argmax over the logits that pass and are not taken yet.
        unsigned taken = 0;
        int n = 0, my_id = -1;
        for (int slot = 0; slot < k; slot++) {
            float bv = NEG_INF;
            int bi = NO_ID;
            for (int j = lane, b = 0; j < E; j += 32, b++) {
                float v = l[j];
                if (!(taken >> b & 1u) && v > __bfloat162float(thr[j]) && (bi == NO_ID || v > bv)) bv = v, bi = j;
            }
            top_any_warp_best(bv, bi);
            if (bi == NO_ID) break;  // the same in every lane: nothing left passes
            if (lane == slot) my_id = bi;
            if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
            n++;
        }
        int fallback = n == 0;
        if (fallback) {  // at least one expert: the best logit
            float bv = NEG_INF;
            int bi = NO_ID;
            for (int j = lane; j < E; j += 32) {
                float v = l[j] == l[j] ? l[j] : NEG_INF;
                if (bi == NO_ID || v > bv) bv = v, bi = j;
            }
            top_any_warp_best(bv, bi);
            if (lane == 0) my_id = bi;
            n = 1;
        }
        bool on = lane < n;
        float my_s = on ? s[my_id] : 0.f;
        float sel = warp_sum(my_s);
        if (lane < k) {
            long long i = (long long)r * k + lane;
            ids[i] = on ? my_id : -1;
            weights[i] = !on ? 0.f : !normalize ? my_s : sel > 0.f ? my_s / sel : 1.f / n;
        }
        if (lane == 0) {
            stats[r] = (float)n;
            stats[(long long)T + r] = (float)fallback;
        }
    }
}

// out[b] = Σ x[b·n .. (b+1)·n) for block b of 256 threads, in a fixed order (the stats are
// integer-valued: exact).
extern "C" __global__ void top_any_sum(const float* x, float* out, int n) {
    double s = block_sum<double>(x + (long long)blockIdx.x * n, n);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)s;
}

// Backward of one row. g = ∂L/∂s through the gates on a chosen slot: (dw − Σ dw·w) / Σ_chosen s
// with `normalize` (0 when that sum is 0), else dw; 0 on EMPTY slots. ds = (d_probs − ⟨d_probs, p⟩)
// / Σ s (0 when that sum is 0) plus g on the chosen ids. dl [T,E] (bf16, for the GEMMs) = d_logits
// + ds ⊙ s(1 − s). part [T,k] = s·g (= ∂L/∂m, the mask's straight-through gradient) on slots whose
// expert passed its threshold, 0 elsewhere (EMPTY slots and the fallback expert).
extern "C" __global__ void top_any_bwd(const float* logits, const float* scores, const float* probs, const int* ids,
                                       const float* weights, const float* d_weights, const float* d_probs,
                                       const float* d_logits, const __nv_bfloat16* thr, __nv_bfloat16* dl, float* part,
                                       int T, int E, int k, int normalize) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E, i = (long long)r * k + lane;
        const float* s = scores + row;
        int id = lane < k ? ids[i] : -1;
        bool on = id >= 0;
        float sj = on ? s[id] : 0.f, w = on ? weights[i] : 0.f, dw = on ? d_weights[i] : 0.f;
        float g = dw;
        if (normalize) {
            float sel = warp_sum(sj), dot = warp_sum(dw * w);
            g = on && sel > 0.f ? (dw - dot) / sel : 0.f;
        }
        if (lane < k) part[i] = on && logits[row + id] > __bfloat162float(thr[id]) ? sj * g : 0.f;
        float sum = 0.f, pd = 0.f;
        for (int j = lane; j < E; j += 32) {
            sum += s[j];
            pd += probs[row + j] * d_probs[row + j];
        }
        sum = warp_sum(sum);
        pd = warp_sum(pd);
        // Every lane runs the same number of rounds (the shuffles need the whole warp).
        for (int base = 0; base < E; base += 32) {
            int j = base + lane;
            float add = 0.f;
            for (int q = 0; q < k; q++) {  // slot q's gate gradient, from the lane that holds it
                int qi = __shfl_sync(FULL, id, q);
                float qg = __shfl_sync(FULL, g, q);
                if (qi == j) add = qg;  // the ids of a row are distinct
            }
            if (j < E) {
                float d = (sum > 0.f ? (d_probs[row + j] - pd) / sum : 0.f) + add, sv = s[j];
                dl[row + j] = __float2bfloat16(d_logits[row + j] + d * sv * (1.f - sv));
            }
        }
    }
}

// g_thr[e] += −σ'(τ_e) · Σ part[i] over the n = T·k slots i with ids[i] = e (the surrogate): one
// block of 256 threads per expert (grid-stride over experts), a fixed-order sum.
extern "C" __global__ void top_any_thr_grad(const int* ids, const float* part, const __nv_bfloat16* thr, float* g_thr,
                                            int n, int E) {
    __shared__ float acc[256];
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
        float a = 0.f;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            if (ids[i] == e) a += part[i];
        acc[threadIdx.x] = a;
        __syncthreads();
        for (int o = blockDim.x / 2; o > 0; o >>= 1) {
            if (threadIdx.x < o) acc[threadIdx.x] += acc[threadIdx.x + o];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            float st = top_any_sigmoid(__bfloat162float(thr[e]));
            g_thr[e] -= st * (1.f - st) * acc[0];
        }
        __syncthreads();  // acc is reused for the next expert
    }
}

// group-topk router (DeepSeek-V2/V3 group-limited routing); src/lib.rs has the math and the CPU
// reference these kernels mirror. Compiled after the kit's helpers (plugin-api/kernels/common.cuh:
// warp_sum, warp_max, softmax_stats, block_sum, FULL, NEG_INF, cuda_bf16.h). The row kernels run
// one warp per token row, 8 warps (256 threads) a block, grid-stride over rows. E <= 1024: a lane
// holds experts j = lane + 32·b (b < 32), one bit each in `taken`; n_group <= 32: lane g holds
// group g's score; top_k <= 32: lane q holds slot q. No float atomics: every sum has a fixed order.

#define GT_NO_ID 0x7fffffff

__device__ __forceinline__ float gt_sigmoid(float l) { return 1.f / (1.f + expf(-l)); }

// A ranking key: NaN below everything.
__device__ __forceinline__ float gt_key(float v) { return v == v ? v : NEG_INF; }

// Keep the better of (bv, bi) and the partner lane's: the larger value, the lower index on ties.
// After the five steps every lane of the warp holds the same pair.
__device__ __forceinline__ void gt_warp_best(float& bv, int& bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL, bv, o);
        int oi = __shfl_xor_sync(FULL, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
}

// The two largest of the warp's (a1 >= a2) pairs, in every lane.
__device__ __forceinline__ void gt_warp_top2(float& a1, float& a2) {
    for (int o = 16; o > 0; o >>= 1) {
        float b1 = __shfl_xor_sync(FULL, a1, o), b2 = __shfl_xor_sync(FULL, a2, o);
        float n2 = a1 >= b1 ? fmaxf(a2, b1) : fmaxf(a1, b2);
        a1 = fmaxf(a1, b1);
        a2 = n2;
    }
}

// logits [T,E] -> scores [T,E] (softmax or σ, saved for backward), probs [T,E] (the scores for
// softmax, the scores over their row sum for σ), ent [T] (the entropy of each row's probs),
// ids [T,k] and weights [T,k]:
//   group g = experts g·m .. (g+1)·m, m = E / G; its score is its best logit (top2 = 0: orders as
//   the best score) or the sum of its two best scores (top2 = 1); the kg best groups are kept
//   (ties: the lower group), then the k best logits among their experts (ties: the lower id);
//   weights = the chosen scores, over their sum when `normalize` (1 if that sum is 0), times scale.
extern "C" __global__ void group_topk_fwd(const float* logits, float* scores, float* probs, int* ids, float* weights,
                                          float* ent, int T, int E, int G, int kg, int k, int sigmoid, int top2,
                                          int normalize, float scale) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5, m = E / G;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E;
        const float* l = logits + row;
        float* s = scores + row;
        float* p = probs + row;
        // Scores and probs (each lane writes and re-reads its own entries here).
        float q;
        if (sigmoid) {
            q = 0.f;
            for (int j = lane; j < E; j += 32) {
                float v = gt_sigmoid(l[j]);
                s[j] = v;
                q += v;
            }
            q = warp_sum(q);
        } else {
            float mx;
            softmax_stats(l, E, mx, q);
            for (int j = lane; j < E; j += 32) s[j] = expf(l[j] - mx) / q;
        }
        float qs = q > 0.f ? q : 1.f, h = 0.f;
        for (int j = lane; j < E; j += 32) {
            float v = sigmoid ? s[j] / qs : s[j];
            p[j] = v;
            if (v > 0.f) h -= v * logf(v);
        }
        h = warp_sum(h);
        if (lane == 0) ent[r] = h;
        __syncwarp();  // the group scores read every lane's scores
        // Group scores: lane g ends up holding group g's.
        float my_gs = NEG_INF;
        for (int g = 0; g < G; g++) {
            float a1 = NEG_INF, a2 = NEG_INF;
            for (int j = g * m + lane; j < (g + 1) * m; j += 32) {
                float v = gt_key(top2 ? s[j] : l[j]);
                if (v > a1) {
                    a2 = a1;
                    a1 = v;
                } else if (v > a2) {
                    a2 = v;
                }
            }
            gt_warp_top2(a1, a2);
            if (lane == g) my_gs = top2 ? a1 + a2 : a1;
        }
        // kg rounds of a warp argmax over the groups not kept yet.
        bool kept_me = false;
        for (int q2 = 0; q2 < kg; q2++) {
            bool open = lane < G && !kept_me;
            float bv = open ? my_gs : NEG_INF;
            int bi = open ? lane : GT_NO_ID;
            gt_warp_best(bv, bi);
            if (lane == bi) kept_me = true;
        }
        unsigned kept = __ballot_sync(FULL, kept_me);
        // k rounds of a warp argmax over the logits of the kept groups' experts not taken yet.
        unsigned taken = 0;
        int my_id = 0;
        for (int slot = 0; slot < k; slot++) {
            float bv = NEG_INF;
            int bi = GT_NO_ID;
            for (int j = lane, b = 0; j < E; j += 32, b++) {
                if ((taken >> b & 1u) || !(kept >> (j / m) & 1u)) continue;
                float v = gt_key(l[j]);
                if (bi == GT_NO_ID || v > bv) bv = v, bi = j;
            }
            gt_warp_best(bv, bi);
            if (lane == slot) my_id = bi;
            if (bi != GT_NO_ID && (bi & 31) == lane) taken |= 1u << (bi >> 5);
        }
        // top_k <= kg·m: every slot found an expert.
        float my_s = lane < k ? s[my_id] : 0.f;
        float sel = warp_sum(my_s);
        float denom = normalize && sel > 0.f ? sel : 1.f;
        if (lane < k) {
            long long i = (long long)r * k + lane;
            ids[i] = my_id;
            weights[i] = my_s / denom * scale;
        }
    }
}

// out[0] = Σ x[0..n), in a fixed order: one block of 256 threads.
extern "C" __global__ void group_topk_sum(const float* x, float* out, int n) {
    float s = block_sum<float>(x, n);
    if (threadIdx.x == 0) out[0] = s;
}

// dl [T,E] (bf16, for the two GEMMs), per row with the saved scores s and the probs p:
//   ds = d_probs (softmax) or (d_probs − ⟨d_probs, p⟩) / Σ s (σ; a sum of 0 divides by 1),
//        plus on each chosen id: (scale·dw − Σ_slots dw·w) / Σ_chosen s  when `normalize`
//                                scale·dw                             otherwise;
//   dl = d_logits + s ⊙ (ds − ⟨ds, s⟩) (softmax) or d_logits + ds ⊙ s(1 − s) (σ).
// EMPTY slots (id < 0) add nothing. Same launch as the forward (8 warps a block: ds_rows).
extern "C" __global__ void group_topk_bwd(const float* scores, const float* probs, const int* ids,
                                          const float* weights, const float* d_weights, const float* d_probs,
                                          const float* d_logits, __nv_bfloat16* dl, int T, int E, int k, int sigmoid,
                                          int normalize, float scale) {
    __shared__ float ds_rows[8][1024];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float* ds = ds_rows[threadIdx.x >> 5];
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E, i = (long long)r * k + lane;
        const float* s = scores + row;
        const float* p = probs + row;
        const float* dp = d_probs + row;
        int id = lane < k ? ids[i] : -1;
        bool on = id >= 0;
        float sj = on ? s[id] : 0.f, w = on ? weights[i] : 0.f, dw = on ? d_weights[i] : 0.f;
        float g = scale * dw;
        if (normalize) {
            float sel = warp_sum(sj), dot = warp_sum(dw * w);
            g = (scale * dw - dot) / (sel > 0.f ? sel : 1.f);
        }
        if (sigmoid) {
            float q = 0.f, pd = 0.f;
            for (int j = lane; j < E; j += 32) {
                q += s[j];
                pd += dp[j] * p[j];
            }
            q = warp_sum(q);
            pd = warp_sum(pd);
            float qs = q > 0.f ? q : 1.f;
            for (int j = lane; j < E; j += 32) ds[j] = (dp[j] - pd) / qs;
        } else {
            for (int j = lane; j < E; j += 32) ds[j] = dp[j];
        }
        __syncwarp();
        if (on) ds[id] += g;  // the ids of a row are distinct
        __syncwarp();
        if (sigmoid) {
            for (int j = lane; j < E; j += 32) {
                float sv = s[j];
                dl[row + j] = __float2bfloat16(d_logits[row + j] + ds[j] * sv * (1.f - sv));
            }
        } else {
            float sd = 0.f;
            for (int j = lane; j < E; j += 32) sd += s[j] * ds[j];
            sd = warp_sum(sd);
            for (int j = lane; j < E; j += 32) dl[row + j] = __float2bfloat16(d_logits[row + j] + s[j] * (ds[j] - sd));
        }
        __syncwarp();  // ds is rewritten for the next row
    }
}

// switch-aux load-balancing loss (see src/switch_aux.rs). Row kernels: one warp per token row,
// 8 warps (256 threads) a block, grid-stride over rows. c_e = counts[e] · cscale.

// ⟨c, p⟩ for the row's probabilities p (m, s from softmax_stats), on every lane.
__device__ float c_dot_p(const float* l, const int* counts, int E, float cscale, float m, float s) {
    float dot = 0.f;
    for (int j = threadIdx.x & 31; j < E; j += 32) dot += counts[j] * cscale * (expf(l[j] - m) / s);
    return warp_sum(dot);
}

// counts[e] = ids equal to e; counts[E] = ids outside 0..E. Integer atomics: exact in any order.
extern "C" __global__ void switch_aux_count(const int* ids, int* counts, int n, int E) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int e = ids[i];
        atomicAdd(&counts[e >= 0 && e < E ? e : E], 1);
    }
}

// row_loss[t] = ⟨c, p_t⟩ (the loss is their sum).
extern "C" __global__ void switch_aux_fwd(const float* logits, const int* counts, float* row_loss, int T, int E,
                                          float cscale) {
    int warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* l = logits + (long long)r * E;
        float m, s;
        softmax_stats(l, E, m, s);
        float dot = c_dot_p(l, counts, E, cscale, m, s);
        if ((threadIdx.x & 31) == 0) row_loss[r] = dot;
    }
}

// d_logits_t += scale · p_t ⊙ (c − ⟨c, p_t⟩).
extern "C" __global__ void switch_aux_bwd(const float* logits, const int* counts, float* d_logits, int T, int E,
                                          float cscale, float scale) {
    int warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* l = logits + (long long)r * E;
        float* d = d_logits + (long long)r * E;
        float m, s;
        softmax_stats(l, E, m, s);
        float dot = c_dot_p(l, counts, E, cscale, m, s);
        for (int j = threadIdx.x & 31; j < E; j += 32) d[j] += scale * (expf(l[j] - m) / s) * (counts[j] * cscale - dot);
    }
}

// out[0] = Σ row_loss[0..T) (double, fixed order: one block of 256 threads); out[1] = counts[E].
extern "C" __global__ void switch_aux_sum(const float* row_loss, const int* counts, float* out, int T, int E) {
    double s = block_sum<double>(row_loss, T);
    if (threadIdx.x == 0) out[0] = (float)s, out[1] = (float)counts[E];
}

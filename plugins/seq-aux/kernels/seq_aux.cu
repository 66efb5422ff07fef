// seq-aux: DeepSeek's sequence-wise balance loss; src/lib.rs has the math and the CPU reference
// these kernels mirror. Compiled after the kit's helpers (plugin-api/kernels/common.cuh: warp_sum,
// block_sum). The row kernels run one warp per token row, 8 warps (256 threads) a block,
// grid-stride over rows. No float atomics: every float sum has a fixed order.

// counts[q, e] += 1 for every slot i of sequence q = i / per_seq (per_seq = s·k slots) routed to
// e; EMPTY (-1) and ids outside 0..E are skipped. counts [B,E] starts zeroed. Integer atomics:
// exact in any order. Grid-stride over the n = T·k ids.
extern "C" __global__ void seq_aux_count(const int* ids, int* counts, int n, int per_seq, int E) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int e = ids[i];
        if (e >= 0 && e < E) atomicAdd(&counts[(long long)(i / per_seq) * E + e], 1);
    }
}

// row[t] = ⟨f_q, p_t⟩ / r_t for the row's sequence q = t / s, f_q = counts[q] · fscale
// (fscale = E/(k·s)), r_t = Σ_j p_tj (1 when not positive): the row's share of Σ_e f_e·P_e times s.
extern "C" __global__ void seq_aux_rows(const float* probs, const int* counts, float* row, int T, int E, int s,
                                        float fscale) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
        const float* p = probs + (long long)t * E;
        const int* c = counts + (long long)(t / s) * E;
        float dot = 0.f, r = 0.f;
        for (int j = lane; j < E; j += 32) {
            dot += (c[j] * fscale) * p[j];
            r += p[j];
        }
        dot = warp_sum(dot);
        r = warp_sum(r);
        if (lane == 0) row[t] = dot / (r > 0.f ? r : 1.f);
    }
}

// loss[0] += scale · Σ row[0..T) with scale = coef/(B·s) (double, fixed order: one block of 256).
extern "C" __global__ void seq_aux_sum(const float* row, float* loss, int T, float scale) {
    double s = block_sum<double>(row, T);
    if (threadIdx.x == 0) loss[0] += (float)(s * (double)scale);
}

// d_probs[t, j] += c0 · (f_j − φ_t) / r_t, φ_t = ⟨f_q, p_t⟩ / r_t, c0 = scale · coef/(B·s).
extern "C" __global__ void seq_aux_bwd(const float* probs, const int* counts, float* d_probs, int T, int E, int s,
                                       float fscale, float c0) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
        long long row = (long long)t * E;
        const float* p = probs + row;
        const int* c = counts + (long long)(t / s) * E;
        float dot = 0.f, r = 0.f;
        for (int j = lane; j < E; j += 32) {
            dot += (c[j] * fscale) * p[j];
            r += p[j];
        }
        dot = warp_sum(dot);
        r = warp_sum(r);
        r = r > 0.f ? r : 1.f;
        float phi = dot / r, k = c0 / r;
        for (int j = lane; j < E; j += 32) d_probs[row + j] += k * (c[j] * fscale - phi);
    }
}

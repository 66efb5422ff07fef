// global-batch-aux: Qwen's global-batch balance loss; src/lib.rs has the math and the CPU
// reference these kernels mirror. Compiled after the kit's helpers (plugin-api/kernels/common.cuh:
// warp_sum, block_sum). No float atomics: every float sum has a fixed order.

// own[e] = this micro-batch's slots routed to e (own [E] starts zeroed); EMPTY (-1) and ids
// outside 0..E are skipped. Integer atomics: exact in any order. Grid-stride over the n ids.
extern "C" __global__ void gba_count(const int* ids, int* own, int n, int E) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int e = ids[i];
        if (e >= 0 && e < E) atomicAdd(&own[e], 1);
    }
}

// One block. Training: add = counted[0] != m1 (this micro-batch, m1 = micro_batch + 1, is not in
// the accumulator yet); g[e] = counts[e] + (add ? own[e] : 0); with `commit` (forward) and add,
// counts[e] = g[e] and counted[0] = m1. Eval: g[e] = own[e], the accumulators untouched. g is the
// copy that gets all-reduced.
extern "C" __global__ void gba_global(float* counts, float* counted, const int* own, float* g, int E, float m1,
                                      int training, int commit) {
    __shared__ int add;
    if (threadIdx.x == 0) add = training && counted[0] != m1;
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        float v = training ? (add ? counts[e] + (float)own[e] : counts[e]) : (float)own[e];
        g[e] = v;
        if (commit && add) counts[e] = v;
    }
    __syncthreads();  // every thread has read counted[0] (through `add`) before it changes
    if (threadIdx.x == 0 && commit && add) counted[0] = m1;
}

// One block of 256: n = max(Σ g (double, fixed order), 1); a[e] = g[e] · (cscale / n), cscale =
// coef·E/T: ∂loss/∂p_te.
extern "C" __global__ void gba_coef(const float* g, float* a, int E, float cscale) {
    __shared__ float per;
    double n = block_sum<double>(g, E);
    if (threadIdx.x == 0) per = cscale / fmaxf((float)n, 1.f);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) a[e] = g[e] * per;
}

// row[t] = ⟨a, p_t⟩ (the loss is their sum): one warp per token row, 8 warps (256 threads) a
// block, grid-stride over rows.
extern "C" __global__ void gba_rows(const float* probs, const float* a, float* row, int T, int E) {
    int warps = blockDim.x >> 5;
    for (int t = blockIdx.x * warps + (threadIdx.x >> 5); t < T; t += gridDim.x * warps) {
        const float* p = probs + (long long)t * E;
        float dot = 0.f;
        for (int j = threadIdx.x & 31; j < E; j += 32) dot += a[j] * p[j];
        dot = warp_sum(dot);
        if ((threadIdx.x & 31) == 0) row[t] = dot;
    }
}

// loss[0] += Σ row[0..T) (double, fixed order: one block of 256 threads).
extern "C" __global__ void gba_sum(const float* row, float* loss, int T) {
    double s = block_sum<double>(row, T);
    if (threadIdx.x == 0) loss[0] += (float)s;
}

// d_probs[t, e] += scale · a[e], grid-stride over the n = T·E elements.
extern "C" __global__ void gba_bwd(const float* a, float* d_probs, long long n, int E, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        d_probs[i] += scale * a[i % E];
}

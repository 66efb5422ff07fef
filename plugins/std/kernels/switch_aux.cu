// switch-aux load-balancing loss (see src/switch_aux.rs). c_e = ∂loss/∂p_te [E] f32.

// counts[e] = ids equal to e; counts[E] = ids neither in 0..E nor EMPTY (-1), which are skipped.
// Integer atomics: exact in any order.
extern "C" __global__ void switch_aux_count(const int* ids, int* counts, int n, int E) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int e = ids[i];
        if (e != -1) atomicAdd(&counts[e >= 0 && e < E ? e : E], 1);
    }
}

// One block of 256 threads: N = Σ counts[0..E) (the assignments), c[e] = counts[e] · cscale / N
// with cscale = coef · E / T.
extern "C" __global__ void switch_aux_coef(const int* counts, float* c, int E, float cscale) {
    __shared__ int n;
    if (threadIdx.x == 0) n = 0;
    __syncthreads();
    int s = 0;
    for (int e = threadIdx.x; e < E; e += blockDim.x) s += counts[e];
    atomicAdd(&n, s);
    __syncthreads();
    float per = cscale / (float)max(n, 1);
    for (int e = threadIdx.x; e < E; e += blockDim.x) c[e] = counts[e] * per;
}

// row_loss[t] = ⟨c, p_t⟩ (the loss is their sum): one warp per token row, 8 warps (256 threads)
// a block, grid-stride over rows.
extern "C" __global__ void switch_aux_fwd(const float* probs, const float* c, float* row_loss, int T, int E) {
    int warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        const float* p = probs + (long long)r * E;
        float dot = 0.f;
        for (int j = threadIdx.x & 31; j < E; j += 32) dot += c[j] * p[j];
        dot = warp_sum(dot);
        if ((threadIdx.x & 31) == 0) row_loss[r] = dot;
    }
}

// loss[0] += Σ row_loss[0..T) (double, fixed order: one block of 256 threads).
extern "C" __global__ void switch_aux_sum(const float* row_loss, float* loss, int T) {
    double s = block_sum<double>(row_loss, T);
    if (threadIdx.x == 0) loss[0] += (float)s;
}

// d_probs[t, e] += scale · c[e], grid-stride over the n = T·E elements.
extern "C" __global__ void switch_aux_bwd(const float* c, float* d_probs, long long n, int E, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        d_probs[i] += scale * c[i % E];
}

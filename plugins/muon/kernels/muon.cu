// muon: the elementwise and per-matrix kernels of src/lib.rs's CUDA path; the Newton–Schulz GEMMs are
// the host's (h.gemm_batched on f32 operands, fp32 accumulation). Every product and sum here is
// rounded on its own (__fmul_rn, __fadd_rn, ...: no fused multiply-add), in the CPU path's order, so
// these kernels compute the CPU's bits from the same inputs; only the GEMMs' and the norms' summation
// orders differ. No float atomics: the norm is a fixed-order block sum.
#define CHUNK 4096

// ---- the AdamW group (embeddings, lm_head, 1-D tensors, routers, `adamw_params`) ----

// One slot of the table src/lib.rs builds (8 words): chunk `first` is its first CHUNK elements.
struct AdamSlot {
    float *w, *g, *m, *v;
    __nv_bfloat16* lowp;
    long long n;
    float keep;
    int pad;
    long long first;
};

// AdamW over every slot of the group in one launch: a block per chunk of CHUNK elements
// (grid-stride over `chunks`), 256 threads a block; a chunk's slot is the last whose `first` is <= it.
// step_size = lr / (1 − β1ᵗ), bc2_sqrt = √(1 − β2ᵗ), keep = 1 − lr·wd (1 without decay), from the
// host. Writes bf16(w) to lowp (when not null) and zeroes g.
extern "C" __global__ void muon_adamw(const AdamSlot* slots, int nslots, long long chunks, float beta1, float beta2,
                                      float eps, float step_size, float bc2_sqrt, float grad_scale) {
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        int lo = 0, hi = nslots - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (slots[mid].first <= c) lo = mid;
            else hi = mid - 1;
        }
        const AdamSlot s = slots[lo];
        long long end = min((c - s.first + 1) * CHUNK, s.n);
        for (long long i = (c - s.first) * CHUNK + threadIdx.x; i < end; i += blockDim.x) {
            float gi = __fmul_rn(s.g[i], grad_scale);
            float mi = __fadd_rn(__fmul_rn(beta1, s.m[i]), __fmul_rn(1.f - beta1, gi));
            float vi = __fadd_rn(__fmul_rn(beta2, s.v[i]), __fmul_rn(__fmul_rn(1.f - beta2, gi), gi));
            float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
            float wi = __fsub_rn(__fmul_rn(s.w[i], s.keep), __fdiv_rn(__fmul_rn(step_size, mi), den));
            s.m[i] = mi;
            s.v[i] = vi;
            s.w[i] = wi;
            s.g[i] = 0.f;
            if (s.lowp) s.lowp[i] = __float2bfloat16(wi);
        }
    }
}

// ---- the Muon group (2-D matrices and stacks of them, e.g. experts [E, a, b]) ----

// Momentum over n elements, grid-stride: g' = grad_scale·g; m = μ·m + g'; u = g' + μ·m (Nesterov)
// or m; zeroes g (the host then skips it).
extern "C" __global__ void muon_momentum(float* g, float* m, float* u, long long n, float mu, float grad_scale,
                                         int nesterov) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = __fmul_rn(g[i], grad_scale);
        float mi = __fadd_rn(__fmul_rn(mu, m[i]), gi);
        m[i] = mi;
        u[i] = nesterov ? __fadd_rn(gi, __fmul_rn(mu, mi)) : mi;
        g[i] = 0.f;
    }
}

// x [count, per]: each matrix divided by (its Frobenius norm + 1e-7). One block of 256 threads per
// matrix (grid-stride over `count`); the squares are summed in double, in a fixed order.
extern "C" __global__ void muon_normalize(float* x, long long per, int count) {
    __shared__ double part[256];
    for (int q = blockIdx.x; q < count; q += gridDim.x) {
        float* xq = x + (long long)q * per;
        double s = 0.0;
        for (long long i = threadIdx.x; i < per; i += blockDim.x) {
            double v = xq[i];
            s += v * v;
        }
        part[threadIdx.x] = s;
        __syncthreads();
        for (int o = blockDim.x / 2; o > 0; o >>= 1) {
            if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
            __syncthreads();
        }
        float inv = __fdiv_rn(1.f, __fadd_rn((float)sqrt(part[0]), 1e-7f));
        __syncthreads();  // every thread has read part[0] before the next matrix overwrites it
        for (long long i = threadIdx.x; i < per; i += blockDim.x) xq[i] = __fmul_rn(xq[i], inv);
    }
}

// y += a·x over n elements, grid-stride (the Newton–Schulz steps' scaled additions).
extern "C" __global__ void muon_axpy(float* y, const float* x, float a, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __fadd_rn(y[i], __fmul_rn(a, x[i]));
}

// w = w·keep − scale·o over n elements, grid-stride, with scale = lr·0.2·√max(rows, cols) and
// keep = 1 − lr·wd (1 without decay); writes bf16(w) to lowp when not null.
extern "C" __global__ void muon_update(float* w, const float* o, __nv_bfloat16* lowp, long long n, float keep,
                                       float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float wi = __fsub_rn(__fmul_rn(w[i], keep), __fmul_rn(scale, o[i]));
        w[i] = wi;
        if (lowp) lowp[i] = __float2bfloat16(wi);
    }
}

// adamw: one fused launch over every slot's f32 weight, grad and state (see src/adamw.rs).
// step_size = lr / (1 − β1ᵗ), bc2_sqrt = √(1 − β2ᵗ), keep = 1 − lr·wd (1 without decay), all
// computed on the host; g is multiplied by grad_scale. Writes bf16(w) to lowp (when not null)
// and zeroes g. Elementwise: no reductions, so any launch shape gives the same bits.
#define CHUNK 4096

// One slot of the table src/adamw.rs builds (8 words): chunk `first` is its first CHUNK elements.
struct AdamSlot {
    float *w, *g, *m, *v;
    __nv_bfloat16* lowp;
    long long n;
    float keep;
    int pad;
    long long first;
};

// A block per chunk of CHUNK elements (grid-stride over `chunks`), 256 threads a block; a chunk's
// slot is the last whose `first` is <= it.
extern "C" __global__ void adamw_step(const AdamSlot* slots, int nslots, long long chunks, float beta1, float beta2,
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
            float gi = s.g[i] * grad_scale;
            float mi = beta1 * s.m[i] + (1.f - beta1) * gi;
            float vi = beta2 * s.v[i] + (1.f - beta2) * gi * gi;
            float wi = s.w[i] * s.keep - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
            s.m[i] = mi;
            s.v[i] = vi;
            s.w[i] = wi;
            if (s.lowp) s.lowp[i] = __float2bfloat16(wi);
        }
    }
}

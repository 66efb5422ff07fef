// lion: one fused launch over every slot's f32 weight, gradient and momentum (see src/lib.rs).
// keep = 1 − lr·wd (1 without decay) comes from the host; g is multiplied by grad_scale. Every
// product and sum is rounded on its own (__fmul_rn, __fadd_rn, __fsub_rn: no fused multiply-add),
// in the CPU's order, so the results are the CPU path's bits. Writes bf16(w) to lowp (when not
// null) and zeroes g. Elementwise: no reductions, so any launch shape gives the same bits.
#define CHUNK 4096

// One slot of the table src/lib.rs builds (7 words): chunk `first` is its first CHUNK elements.
struct LionSlot {
    float *w, *g, *m;
    __nv_bfloat16* lowp;
    long long n;
    float keep;
    int pad;
    long long first;
};

// -1, 0 or 1: a zero interpolated momentum does not move the weight.
__device__ __forceinline__ float sign_of(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }

// A block per chunk of CHUNK elements (grid-stride over `chunks`), 256 threads a block; a chunk's
// slot is the last whose `first` is <= it.
extern "C" __global__ void lion_step(const LionSlot* slots, int nslots, long long chunks, float beta1, float beta2,
                                     float lr, float grad_scale) {
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        int lo = 0, hi = nslots - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (slots[mid].first <= c) lo = mid;
            else hi = mid - 1;
        }
        const LionSlot s = slots[lo];
        long long end = min((c - s.first + 1) * CHUNK, s.n);
        for (long long i = (c - s.first) * CHUNK + threadIdx.x; i < end; i += blockDim.x) {
            float gi = __fmul_rn(s.g[i], grad_scale);
            float mi = s.m[i];
            float ci = __fadd_rn(__fmul_rn(beta1, mi), __fmul_rn(1.f - beta1, gi));
            float wi = __fsub_rn(__fmul_rn(s.w[i], s.keep), __fmul_rn(lr, sign_of(ci)));
            s.m[i] = __fadd_rn(__fmul_rn(beta2, mi), __fmul_rn(1.f - beta2, gi));
            s.w[i] = wi;
            s.g[i] = 0.f;
            if (s.lowp) s.lowp[i] = __float2bfloat16(wi);
        }
    }
}

// act-experts: the activations of the `relu2` and `gelu` experts (src/lib.rs has the CPU reference
// these mirror). Compiled after the kit's helpers (plugin-api/kernels/common.cuh: load8, store8,
// cuda_bf16.h). bf16 in and out, f32 math. Grid-stride over the n = N·F elements in packs of 8
// (16-byte loads, when n % 8 == 0 and every pointer is 16-byte aligned), else one at a time;
// 256 threads a block. Purely elementwise: no reductions, no atomics.
typedef __nv_bfloat16 bf16;

// f(i, w) for each pack of w elements at i: w = 8 when every pointer and n allow it, else 1.
template <typename F>
__device__ __forceinline__ void act_packs(long long n, bool vec, F f) {
    const long long stride = (long long)gridDim.x * blockDim.x, gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec && n % 8 == 0) {
        for (long long p = gid; p < n / 8; p += stride) f(8 * p, 8);
    } else {
        for (long long i = gid; i < n; i += stride) f(i, 1);
    }
}

__device__ __forceinline__ bool act_al16(const void* p) { return ((unsigned long long)p & 15) == 0; }

__device__ __forceinline__ void act_load(const bf16* p, float* f, int w) {
    if (w == 8) load8(p, f);
    else f[0] = __bfloat162float(p[0]);
}

__device__ __forceinline__ void act_store(bf16* p, const float* f, int w) {
    if (w == 8) store8(p, f);
    else p[0] = __float2bfloat16(f[0]);
}

// Squared ReLU (Primer): f(a) = max(a, 0)², f'(a) = 2·max(a, 0).
struct Relu2 {
    static __device__ __forceinline__ float f(float a) {
        float r = fmaxf(a, 0.f);
        return r * r;
    }
    static __device__ __forceinline__ float df(float a) { return 2.f * fmaxf(a, 0.f); }
};

// GELU, tanh approximation (GPT-2): f(a) = ½·a·(1 + t), t = tanh(c·(a + k·a³)), c = √(2/π), k = 0.044715;
// f'(a) = ½·(1 + t) + ½·a·(1 − t²)·c·(1 + 3k·a²).
#define ACT_GELU_C 0.7978845608028654f
#define ACT_GELU_K 0.044715f
struct Gelu {
    static __device__ __forceinline__ float t(float a) { return tanhf(ACT_GELU_C * (a + ACT_GELU_K * a * a * a)); }
    static __device__ __forceinline__ float f(float a) { return 0.5f * a * (1.f + t(a)); }
    static __device__ __forceinline__ float df(float a) {
        float tv = t(a);
        return 0.5f * (1.f + tv) + 0.5f * a * (1.f - tv * tv) * ACT_GELU_C * (1.f + 3.f * ACT_GELU_K * a * a);
    }
};

// u = f(a)
template <typename A>
__device__ __forceinline__ void act_fwd(const bf16* a, bf16* u, long long n) {
    act_packs(n, act_al16(a) && act_al16(u), [&](long long i, int w) {
        float av[8], uv[8];
        act_load(a + i, av, w);
#pragma unroll
        for (int j = 0; j < 8; j++) uv[j] = A::f(av[j]);
        act_store(u + i, uv, w);
    });
}

// da = du ⊙ f'(a)
template <typename A>
__device__ __forceinline__ void act_bwd(const bf16* a, const bf16* du, bf16* da, long long n) {
    act_packs(n, act_al16(a) && act_al16(du) && act_al16(da), [&](long long i, int w) {
        float av[8], g[8], d[8];
        act_load(a + i, av, w);
        act_load(du + i, g, w);
#pragma unroll
        for (int j = 0; j < 8; j++) d[j] = g[j] * A::df(av[j]);
        act_store(da + i, d, w);
    });
}

extern "C" __global__ void relu2_fwd(const bf16* a, bf16* u, long long n) { act_fwd<Relu2>(a, u, n); }
extern "C" __global__ void relu2_bwd(const bf16* a, const bf16* du, bf16* da, long long n) {
    act_bwd<Relu2>(a, du, da, n);
}
extern "C" __global__ void gelu_fwd(const bf16* a, bf16* u, long long n) { act_fwd<Gelu>(a, u, n); }
extern "C" __global__ void gelu_bwd(const bf16* a, const bf16* du, bf16* da, long long n) {
    act_bwd<Gelu>(a, du, da, n);
}

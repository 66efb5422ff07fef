// moepp experts (MoE++), the elementwise and per-row parts; src/lib.rs has the CPU reference these
// mirror and the GEMMs around them. Compiled after the kit's helpers (plugin-api/kernels/common.cuh:
// warp_sum, load8, store8, cuda_bf16.h). bf16 activations and weights, f32 math and logits; 256
// threads a block. No atomics: every sum has a fixed order.
typedef __nv_bfloat16 bf16;

// ---- FFN experts: std swiglu's elementwise steps ------------------------------------------------
// Grid-stride over the n = N·F elements in packs of 8 (16-byte loads; n % 8 == 0 and aligned
// pointers), else one at a time.
template <typename F>
__device__ __forceinline__ void moepp_packs(long long n, bool vec, F f) {
    const long long stride = (long long)gridDim.x * blockDim.x, gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec && n % 8 == 0) {
        for (long long p = gid; p < n / 8; p += stride) f(8 * p, 8);
    } else {
        for (long long i = gid; i < n; i += stride) f(i, 1);
    }
}

__device__ __forceinline__ bool moepp_al16(const void* p) { return ((unsigned long long)p & 15) == 0; }

__device__ __forceinline__ void moepp_load(const bf16* p, float* f, int w) {
    if (w == 8) load8(p, f);
    else f[0] = __bfloat162float(p[0]);
}

__device__ __forceinline__ void moepp_store(bf16* p, const float* f, int w) {
    if (w == 8) store8(p, f);
    else p[0] = __float2bfloat16(f[0]);
}

// u = silu(a) ⊙ b
extern "C" __global__ void moepp_swiglu_fwd(const bf16* a, const bf16* b, bf16* u, long long n) {
    moepp_packs(n, moepp_al16(a) && moepp_al16(b) && moepp_al16(u), [&](long long i, int w) {
        float av[8], bv[8], uv[8];
        moepp_load(a + i, av, w);
        moepp_load(b + i, bv, w);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float s = 1.f / (1.f + expf(-av[j]));
            uv[j] = av[j] * s * bv[j];
        }
        moepp_store(u + i, uv, w);
    });
}

// da = du ⊙ b ⊙ silu'(a),  db = du ⊙ silu(a),  with silu'(a) = σ·(1 + a·(1 − σ)).
extern "C" __global__ void moepp_swiglu_bwd(const bf16* a, const bf16* b, const bf16* du, bf16* da, bf16* db,
                                            long long n) {
    moepp_packs(n, moepp_al16(a) && moepp_al16(b) && moepp_al16(du) && moepp_al16(da) && moepp_al16(db),
                [&](long long i, int w) {
                    float av[8], bv[8], g[8], dav[8], dbv[8];
                    moepp_load(a + i, av, w);
                    moepp_load(b + i, bv, w);
                    moepp_load(du + i, g, w);
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        float s = 1.f / (1.f + expf(-av[j]));
                        dav[j] = g[j] * bv[j] * s * (1.f + av[j] * (1.f - s));
                        dbv[j] = g[j] * av[j] * s;
                    }
                    moepp_store(da + i, dav, w);
                    moepp_store(db + i, dbv, w);
                });
}

// ---- copy and zero experts ------------------------------------------------------------------------
// dst[i] = src[i] for i < ncopy (copy rows), 0 for ncopy <= i < n (zero rows); forward: x → y,
// backward: dy → dx.
extern "C" __global__ void moepp_fill(const bf16* src, bf16* dst, long long ncopy, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = i < ncopy ? src[i] : __float2bfloat16(0.f);
}

// ---- constant experts -----------------------------------------------------------------------------
// [α0, α1] = softmax([s0, s1]), as src/lib.rs's `alpha`.
__device__ __forceinline__ void moepp_alpha(float s0, float s1, float& a0, float& a1) {
    float m = fmaxf(s0, s1), e0 = expf(s0 - m), e1 = expf(s1 - m);
    a0 = e0 / (e0 + e1);
    a1 = e1 / (e0 + e1);
}

// One constant expert's m rows: y = α0·x + α1·v, α from the logits s [m,2] (f32, a host GEMM's);
// x, y [m,H], v [H]. Grid-stride over the m·H elements.
extern "C" __global__ void moepp_const_fwd(const bf16* x, const float* s, const bf16* v, bf16* y, int m, int H) {
    const long long n = (long long)m * H, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        long long r = i / H;
        int j = (int)(i - r * H);
        float a0, a1;
        moepp_alpha(s[2 * r], s[2 * r + 1], a0, a1);
        y[i] = __float2bfloat16(a0 * __bfloat162float(x[i]) + a1 * __bfloat162float(v[j]));
    }
}

// Backward of one constant expert's m rows, one warp per row (8 a block, grid-stride): with g = dy,
// dα0 = ⟨g, x⟩, dα1 = ⟨g, v⟩ (fixed-order warp sums), ds0 = α0·α1·(dα0 − dα1) = −ds1;
// dx = α0·g + ds0·(W_c[0] − W_c[1]) (w [2,H]); ds [m,2] and a1 [m,1] = α1 (bf16) for the host
// GEMMs dW_c += dsᵀ·x and dv += α1ᵀ·dy.
extern "C" __global__ void moepp_const_bwd(const bf16* dy, const bf16* x, const bf16* v, const bf16* w,
                                           const float* s, bf16* dx, bf16* ds, bf16* a1, int m, int H) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < m; r += gridDim.x * warps) {
        long long row = (long long)r * H;
        float d0 = 0.f, d1 = 0.f;
        for (int j = lane; j < H; j += 32) {
            float g = __bfloat162float(dy[row + j]);
            d0 += g * __bfloat162float(x[row + j]);
            d1 += g * __bfloat162float(v[j]);
        }
        d0 = warp_sum(d0);
        d1 = warp_sum(d1);
        float a0, a1v;
        moepp_alpha(s[2 * r], s[2 * r + 1], a0, a1v);
        float s0 = a0 * a1v * (d0 - d1);
        for (int j = lane; j < H; j += 32) {
            float dw = __bfloat162float(w[j]) - __bfloat162float(w[H + j]);
            dx[row + j] = __float2bfloat16(a0 * __bfloat162float(dy[row + j]) + s0 * dw);
        }
        if (lane == 0) {
            ds[2 * r] = __float2bfloat16(s0);
            ds[2 * r + 1] = __float2bfloat16(-s0);
            a1[r] = __float2bfloat16(a1v);
        }
    }
}

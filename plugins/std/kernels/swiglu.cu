// swiglu experts, the elementwise parts (see src/experts.rs); bf16 in and out, fp32 math.
// Grid-stride over the n = N·F elements in packs of 8 (16-byte loads; n % 8 == 0 and the host's
// allocations are aligned), else one at a time; 256 threads a block.
typedef __nv_bfloat16 bf16;

// f(i, w) for each pack of w elements at i: w = 8 when every pointer and n allow it, else 1.
template <typename F>
__device__ __forceinline__ void packs(long long n, bool vec, F f) {
    const long long stride = (long long)gridDim.x * blockDim.x, gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (vec && n % 8 == 0) {
        for (long long p = gid; p < n / 8; p += stride) f(8 * p, 8);
    } else {
        for (long long i = gid; i < n; i += stride) f(i, 1);
    }
}

__device__ __forceinline__ bool al16(const void* p) { return ((unsigned long long)p & 15) == 0; }

__device__ __forceinline__ void load(const bf16* p, float* f, int w) {
    if (w == 8) load8(p, f);
    else f[0] = __bfloat162float(p[0]);
}

__device__ __forceinline__ void store(bf16* p, const float* f, int w) {
    if (w == 8) store8(p, f);
    else p[0] = __float2bfloat16(f[0]);
}

// u = silu(a) ⊙ b
extern "C" __global__ void swiglu_fwd(const bf16* a, const bf16* b, bf16* u, long long n) {
    packs(n, al16(a) && al16(b) && al16(u), [&](long long i, int w) {
        float av[8], bv[8], uv[8];
        load(a + i, av, w);
        load(b + i, bv, w);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float s = 1.f / (1.f + __expf(-av[j]));
            uv[j] = av[j] * s * bv[j];
        }
        store(u + i, uv, w);
    });
}

// da = du ⊙ b ⊙ silu'(a),  db = du ⊙ silu(a),  with silu'(a) = σ·(1 + a·(1 − σ)).
extern "C" __global__ void swiglu_bwd(const bf16* a, const bf16* b, const bf16* du, bf16* da, bf16* db, long long n) {
    packs(n, al16(a) && al16(b) && al16(du) && al16(da) && al16(db), [&](long long i, int w) {
        float av[8], bv[8], g[8], dav[8], dbv[8];
        load(a + i, av, w);
        load(b + i, bv, w);
        load(du + i, g, w);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float s = 1.f / (1.f + __expf(-av[j]));
            dav[j] = g[j] * bv[j] * s * (1.f + av[j] * (1.f - s));
            dbv[j] = g[j] * av[j] * s;
        }
        store(da + i, dav, w);
        store(db + i, dbv, w);
    });
}

// The gated shared expert (shared-swiglu with gate = true): y = σ(z_t)·y_in over the n = T·H
// elements, z [T] f32 the gate logits.
extern "C" __global__ void gate_fwd(const bf16* yin, const float* z, bf16* y, long long n, int H) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float s = 1.f / (1.f + __expf(-z[i / H]));
        y[i] = __float2bfloat16(s * __bfloat162float(yin[i]));
    }
}

// Its backward, one warp per token row t: dyin = σ(z_t)·dy; dz_t = σ'(z_t)·Σ_h dy·y_in (bf16,
// for the gate's GEMMs).
extern "C" __global__ void gate_bwd(const bf16* yin, const float* z, const bf16* dy, bf16* dyin, bf16* dz, int T, int H) {
    const int lane = threadIdx.x % 32, warps = gridDim.x * (blockDim.x / 32);
    for (int t = (blockIdx.x * blockDim.x + threadIdx.x) / 32; t < T; t += warps) {
        const float s = 1.f / (1.f + __expf(-z[t]));
        float acc = 0.f;
        for (int h = lane; h < H; h += 32) {
            const long long i = (long long)t * H + h;
            const float d = __bfloat162float(dy[i]);
            acc += d * __bfloat162float(yin[i]);
            dyin[i] = __float2bfloat16(s * d);
        }
        acc = warp_sum(acc);
        if (lane == 0) dz[t] = __float2bfloat16(acc * s * (1.f - s));
    }
}

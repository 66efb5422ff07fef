// swiglu experts, the elementwise parts (see src/experts.rs); bf16 in and out, fp32 math.
// Grid-stride over the n = N·F elements, 256 threads a block.
#include <cuda_bf16.h>

#define STRIDE_LOOP(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)

// u = silu(a) ⊙ b
extern "C" __global__ void swiglu_fwd(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* u, long long n) {
    STRIDE_LOOP(i, n) {
        float av = __bfloat162float(a[i]), s = 1.f / (1.f + expf(-av));
        u[i] = __float2bfloat16(av * s * __bfloat162float(b[i]));
    }
}

// da = du ⊙ b ⊙ silu'(a),  db = du ⊙ silu(a),  with silu'(a) = σ·(1 + a·(1 − σ)).
extern "C" __global__ void swiglu_bwd(const __nv_bfloat16* a, const __nv_bfloat16* b, const __nv_bfloat16* du,
                                      __nv_bfloat16* da, __nv_bfloat16* db, long long n) {
    STRIDE_LOOP(i, n) {
        float av = __bfloat162float(a[i]), s = 1.f / (1.f + expf(-av)), g = __bfloat162float(du[i]);
        da[i] = __float2bfloat16(g * __bfloat162float(b[i]) * s * (1.f + av * (1.f - s)));
        db[i] = __float2bfloat16(g * av * s);
    }
}

// Device helpers for plugin kernels (`pith_plugin_api::kit::COMMON_CUH`): a component's CUDA
// source is compiled as this header followed by its own kernels (`pith_plugin_api::kernel_source!`).
#include <cuda_bf16.h>

#define FULL 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

// Max and Σ exp(l − max) of row l [E], every lane of the warp gets both.
__device__ void softmax_stats(const float* l, int E, float& m, float& s) {
    int lane = threadIdx.x & 31;
    m = NEG_INF;
    for (int j = lane; j < E; j += 32) m = fmaxf(m, l[j]);
    m = warp_max(m);
    s = 0.f;
    for (int j = lane; j < E; j += 32) s += expf(l[j] - m);
    s = warp_sum(s);
}

// Σ x[0..n) in a fixed order (reproducible), accumulated in Acc, by one block of 256 threads;
// the result is valid in thread 0.
template <typename Acc>
__device__ Acc block_sum(const float* x, int n) {
    __shared__ Acc part[256];
    Acc s = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    return part[0];
}

// 8 bf16 (16 bytes, aligned) to and from f32.
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
    uint4 u = *(const uint4*)p;
    const __nv_bfloat162* h = (const __nv_bfloat162*)&u;
    for (int j = 0; j < 4; j++) {
        float2 t = __bfloat1622float2(h[j]);
        f[2 * j] = t.x;
        f[2 * j + 1] = t.y;
    }
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* f) {
    uint4 u;
    __nv_bfloat162* h = (__nv_bfloat162*)&u;
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    *(uint4*)p = u;
}


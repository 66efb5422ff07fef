// RMSNorm forward, bf16 in and out, fp32 math: one block per row.
//   rstd[r] = 1 / sqrt(mean(x[r]^2) + eps);  y[r] = x[r] * rstd[r] * w
// Launch: grid = rows, block = 256 threads (a power of two), shared = 256 floats.
#include <cuda_bf16.h>

extern "C" __global__ void rmsnorm_fwd(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y,
                                       float* rstd, int h, float eps) {
    extern __shared__ float partial[];
    const __nv_bfloat16* xr = x + (size_t)blockIdx.x * h;
    __nv_bfloat16* yr = y + (size_t)blockIdx.x * h;
    float sum = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = __bfloat162float(xr[i]);
        sum += v * v;
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    float r = rsqrtf(partial[0] / h + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        yr[i] = __float2bfloat16(__bfloat162float(xr[i]) * r * __bfloat162float(w[i]));
    }
}

// adamw: one fused step over a parameter's f32 weight, grad and state (see src/adamw.rs).
// Grid-stride over the n elements, 256 threads a block. step_size = lr / (1 − β1ᵗ),
// bc2_sqrt = √(1 − β2ᵗ), keep = 1 − lr·wd (1 without decay), all computed on the host.
extern "C" __global__ void adamw_step(float* w, const float* g, float* m, float* v, long long n, float beta1,
                                      float beta2, float eps, float keep, float step_size, float bc2_sqrt) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float mi = beta1 * m[i] + (1.f - beta1) * gi;
        float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * keep - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

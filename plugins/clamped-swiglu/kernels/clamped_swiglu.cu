// clamped-swiglu (src/lib.rs has the math and the CPU reference these mirror). Compiled after the
// kit's helpers (plugin-api/kernels/common.cuh). bf16 activations, f32 math; biases bf16 (the
// parameters' working copies), their gradients f32. 256 threads a block, grid-stride.

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float cs_sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// The expert of row `row`: the group g with offsets[g] <= row < offsets[g + 1] (binary search).
__device__ __forceinline__ int cs_group(const int* offsets, int E, long long row) {
    int lo = 0, hi = E;  // offsets[lo] <= row < offsets[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (offsets[mid] <= row) lo = mid;
        else hi = mid;
    }
    return lo;
}

// y [rows, cols] += b[g] [cols] for each row of group g (offsets [E + 1] on the device): a block
// per row (grid-stride), its group found once, the columns coalesced.
extern "C" __global__ void cs_bias_add(bf16* y, const bf16* b, const int* offsets, int E, long long rows, int cols) {
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const bf16* bg = b + (long long)cs_group(offsets, E, row) * cols;
        bf16* yr = y + row * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            yr[c] = __float2bfloat16(__bfloat162float(yr[c]) + __bfloat162float(bg[c]));
    }
}

// g [E, cols] += the column sums of d over each group's rows. Block (column chunk of 32, expert
// e = blockIdx.y): warp w sums rows w, w + 8, … of the group (lane = column: coalesced), then the
// 8 partial sums add in warp order (deterministic, no atomics).
extern "C" __global__ void cs_bias_grad(const bf16* d, float* g, const int* offsets, int cols) {
    __shared__ float part[8][32];
    const int e = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = blockIdx.x * 32 + lane;
    float s = 0.f;
    if (c < cols)
        for (int r = offsets[e] + warp; r < offsets[e + 1]; r += 8) s += __bfloat162float(d[(long long)r * cols + c]);
    part[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && c < cols) {
        float t = 0.f;
        for (int w = 0; w < 8; w++) t += part[w][lane];
        g[(long long)e * cols + c] += t;
    }
}

// u = (clamp(b, -limit, limit) + shift) · ac · σ(alpha · ac),  ac = min(a, limit).
extern "C" __global__ void cs_fwd(const bf16* a, const bf16* b, bf16* u, long long n, float alpha, float limit,
                                  float shift) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float ac = fminf(__bfloat162float(a[i]), limit);
        const float bc = fminf(fmaxf(__bfloat162float(b[i]), -limit), limit);
        u[i] = __float2bfloat16((bc + shift) * ac * cs_sigmoid(alpha * ac));
    }
}

// da = du · (bc + shift) · glu'(ac) · [a <= limit],  db = du · glu(ac) · [-limit <= b <= limit],
// glu(z) = z·σ(αz), glu'(z) = σ(αz)·(1 + αz·(1 − σ(αz))).
extern "C" __global__ void cs_bwd(const bf16* a, const bf16* b, const bf16* du, bf16* da, bf16* db, long long n,
                                  float alpha, float limit, float shift) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float av = __bfloat162float(a[i]), bv = __bfloat162float(b[i]), d = __bfloat162float(du[i]);
        const float ac = fminf(av, limit), bc = fminf(fmaxf(bv, -limit), limit);
        const float s = cs_sigmoid(alpha * ac), glu = ac * s;
        const float dglu = s * (1.f + alpha * ac * (1.f - s));
        da[i] = __float2bfloat16(av <= limit ? d * (bc + shift) * dglu : 0.f);
        db[i] = __float2bfloat16(bv >= -limit && bv <= limit ? d * glu : 0.f);
    }
}

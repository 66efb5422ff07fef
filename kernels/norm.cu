// RMSNorm over rows of `dim`, fp32 math (layers.rs rmsnorm_fwd / rmsnorm_bwd):
//   forward:  rstd[r] = 1/sqrt(mean(x[r]²) + eps);  y[r] = x[r]·rstd[r]·w
//   backward: dot = Σ_j dy·w·x · rstd²/dim;  dx = rstd·(w·dy − x·dot);  dw += Σ_r dy·x·rstd
// x, dy, dx are f32 (dx accumulated: dx += ...) or bf16 (dx written); w bf16 [dim]; y bf16;
// rstd f32 [rows]; dw f32 [dim].
//
// One warp per row, the block's warps on consecutive rows, grid-stride over rows. A lane loads V
// consecutive elements at a time: V = 8 (16 B of bf16) when dim % 256 == 0, V = 2 when dim is
// even, else 1; V > 1 also needs every pointer 16-byte aligned.
// Backward: each warp adds its rows' dy·x·rstd into its own slice of shared memory (dynamic,
// warps·dim floats; a lane only touches its own columns, so no atomics there), then the block
// sums the slices and adds each column to dw with one atomicAdd per block.
#include <cuda_bf16.h>

#define FULL 0xffffffffu
typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

// V consecutive elements at p (aligned to V elements) to / from fp32 registers.
template <int V>
__device__ __forceinline__ void load(const float* p, float* v) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int k = 0; k < V / 4; k++) {
            float4 a = reinterpret_cast<const float4*>(p)[k];
            v[4 * k] = a.x, v[4 * k + 1] = a.y, v[4 * k + 2] = a.z, v[4 * k + 3] = a.w;
        }
    } else if constexpr (V == 2) {
        float2 a = *reinterpret_cast<const float2*>(p);
        v[0] = a.x, v[1] = a.y;
    } else {
        v[0] = *p;
    }
}

template <int V>
__device__ __forceinline__ void load(const bf16* p, float* v) {
    if constexpr (V == 8) {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        const bf162* h = reinterpret_cast<const bf162*>(&u);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            v[2 * k] = f.x, v[2 * k + 1] = f.y;
        }
    } else if constexpr (V == 2) {
        float2 f = __bfloat1622float2(*reinterpret_cast<const bf162*>(p));
        v[0] = f.x, v[1] = f.y;
    } else {
        v[0] = __bfloat162float(*p);
    }
}

template <int V>
__device__ __forceinline__ void store(float* p, const float* v) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int k = 0; k < V / 4; k++)
            reinterpret_cast<float4*>(p)[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    } else if constexpr (V == 2) {
        *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
    } else {
        *p = v[0];
    }
}

template <int V>
__device__ __forceinline__ void store(bf16* p, const float* v) {
    if constexpr (V == 8) {
        uint4 u;
        bf162* h = reinterpret_cast<bf162*>(&u);
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4*>(p) = u;
    } else if constexpr (V == 2) {
        *reinterpret_cast<bf162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
    } else {
        *p = __float2bfloat16(v[0]);
    }
}

// The load width for rows of `dim` whose pointers are (all) 16-byte aligned or not.
__device__ __forceinline__ int width(int dim, bool aligned) {
    if (aligned && dim % 256 == 0) return 8;
    if (aligned && dim % 2 == 0) return 2;
    return 1;
}

template <typename T, int V>
__device__ void fwd_rows(const T* x, const bf16* w, bf16* y, float* rstd, int rows, int dim, float eps) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (long long r = (long long)blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += (long long)gridDim.x * warps) {
        const T* xr = x + r * dim;
        bf16* yr = y + r * dim;
        float v[V], wv[V], ss = 0.f;
        for (int j = lane * V; j < dim; j += 32 * V) {
            load<V>(xr + j, v);
#pragma unroll
            for (int k = 0; k < V; k++) ss += v[k] * v[k];
        }
        ss = warp_sum(ss);
        const float rs = rsqrtf(ss / dim + eps);
        if (lane == 0) rstd[r] = rs;
        for (int j = lane * V; j < dim; j += 32 * V) {
            load<V>(xr + j, v);
            load<V>(w + j, wv);
#pragma unroll
            for (int k = 0; k < V; k++) v[k] = v[k] * rs * wv[k];
            store<V>(yr + j, v);
        }
    }
}

template <typename T>
__device__ void fwd(const T* x, const bf16* w, bf16* y, float* rstd, int rows, int dim, float eps) {
    switch (width(dim, aligned16(x) && aligned16(w) && aligned16(y))) {
        case 8: fwd_rows<T, 8>(x, w, y, rstd, rows, dim, eps); break;
        case 2: fwd_rows<T, 2>(x, w, y, rstd, rows, dim, eps); break;
        default: fwd_rows<T, 1>(x, w, y, rstd, rows, dim, eps);
    }
}

// Launch: block 256 (8 warps = 8 rows), grid ceil(rows / 8) (grid-stride beyond), no shared memory.
extern "C" __global__ void rmsnorm_fwd_f32(const float* x, const bf16* w, bf16* y, float* rstd, int rows, int dim,
                                           float eps) {
    fwd<float>(x, w, y, rstd, rows, dim, eps);
}

extern "C" __global__ void rmsnorm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, float* rstd, int rows, int dim,
                                            float eps) {
    fwd<bf16>(x, w, y, rstd, rows, dim, eps);
}

// dy and dx may be the same tensor: each element of dy is read by the lane that writes dx there,
// before it does. ACC: dx += (f32); else dx = (bf16).
template <typename T, int V, bool ACC>
__device__ void bwd_rows(const T* x, const bf16* w, const float* rstd, const T* dy, T* dx, float* dw, int rows,
                         int dim) {
    extern __shared__ __align__(16) float part[];  // [warps][dim]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* mine = part + warp * dim;
    for (int j = threadIdx.x; j < warps * dim; j += blockDim.x) part[j] = 0.f;
    __syncthreads();
    for (long long r = (long long)blockIdx.x * warps + warp; r < rows; r += (long long)gridDim.x * warps) {
        const T *xr = x + r * dim, *dyr = dy + r * dim;
        T* dxr = dx + r * dim;
        const float rs = rstd[r];
        float xv[V], gv[V], wv[V], ov[V], acc[V], dot = 0.f;
        for (int j = lane * V; j < dim; j += 32 * V) {
            load<V>(xr + j, xv);
            load<V>(dyr + j, gv);
            load<V>(w + j, wv);
#pragma unroll
            for (int k = 0; k < V; k++) dot += gv[k] * wv[k] * xv[k];
        }
        dot = warp_sum(dot) * rs * rs / dim;
        for (int j = lane * V; j < dim; j += 32 * V) {
            load<V>(xr + j, xv);
            load<V>(dyr + j, gv);
            load<V>(w + j, wv);
            load<V>(mine + j, acc);
            if constexpr (ACC) {
                load<V>(dxr + j, ov);
            } else {
#pragma unroll
                for (int k = 0; k < V; k++) ov[k] = 0.f;
            }
#pragma unroll
            for (int k = 0; k < V; k++) {
                ov[k] += rs * (wv[k] * gv[k] - xv[k] * dot);
                acc[k] += gv[k] * xv[k] * rs;
            }
            store<V>(dxr + j, ov);
            store<V>(mine + j, acc);
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < warps; k++) s += part[k * dim + j];
        atomicAdd(dw + j, s);
    }
}

template <typename T, bool ACC>
__device__ void bwd(const T* x, const bf16* w, const float* rstd, const T* dy, T* dx, float* dw, int rows, int dim) {
    switch (width(dim, aligned16(x) && aligned16(w) && aligned16(dy) && aligned16(dx))) {
        case 8: bwd_rows<T, 8, ACC>(x, w, rstd, dy, dx, dw, rows, dim); break;
        case 2: bwd_rows<T, 2, ACC>(x, w, rstd, dy, dx, dw, rows, dim); break;
        default: bwd_rows<T, 1, ACC>(x, w, rstd, dy, dx, dw, rows, dim);
    }
}

// Launch: block 32·warps threads (warps = min(8, 12288 / dim), so the slices fit in 48 KiB),
// grid min(ceil(rows / warps), 512), shared memory warps·dim·4 bytes.
extern "C" __global__ void rmsnorm_bwd_f32(const float* x, const bf16* w, const float* rstd, const float* dy,
                                           float* dx, float* dw, int rows, int dim) {
    bwd<float, true>(x, w, rstd, dy, dx, dw, rows, dim);
}

extern "C" __global__ void rmsnorm_bwd_bf16(const bf16* x, const bf16* w, const float* rstd, const bf16* dy, bf16* dx,
                                            float* dw, int rows, int dim) {
    bwd<bf16, false>(x, w, rstd, dy, dx, dw, rows, dim);
}

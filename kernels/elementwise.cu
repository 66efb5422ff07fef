// Embedding gather / scatter-add, casts, accumulation, scaling and sums.
//
// Elementwise kernels (cast_*, add_*, scale_f32) and the sums: block 256, grid-stride over packs
// of 4 elements (16-byte f32 / 8-byte bf16 loads when every pointer is aligned for them, else one
// element at a time), then the remaining n % 4 elements one each.
// Embedding: one block (256 threads) per token row, grid-stride over rows, float4 when H % 4 == 0.
#include <cuda_bf16.h>

#define FULL 0xffffffffu
#define NAN_F __int_as_float(0x7fc00000)
typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

template <typename T>
__device__ __forceinline__ bool al4(const T* p) {
    return ((unsigned long long)p % (4 * sizeof(T))) == 0;
}

__device__ __forceinline__ float ld1(const float* p) { return *p; }
__device__ __forceinline__ float ld1(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st1(float* p, float v) { *p = v; }
__device__ __forceinline__ void st1(bf16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 ld4(const bf16* p) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    float2 a = __bfloat1622float2(*reinterpret_cast<bf162*>(&u.x));
    float2 b = __bfloat1622float2(*reinterpret_cast<bf162*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void st4(bf16* p, float4 v) {
    uint2 u;
    *reinterpret_cast<bf162*>(&u.x) = __floats2bfloat162_rn(v.x, v.y);
    *reinterpret_cast<bf162*>(&u.y) = __floats2bfloat162_rn(v.z, v.w);
    *reinterpret_cast<uint2*>(p) = u;
}

// f(i, true) for each pack of 4 elements starting at i (when vec), then f(i, false) for each
// element not in a pack; grid-stride.
template <typename F>
__device__ __forceinline__ void packs(long long n, bool vec, F f) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long n4 = vec ? n / 4 : 0;
    for (long long p = gid; p < n4; p += stride) f(4 * p, true);
    for (long long i = 4 * n4 + gid; i < n; i += stride) f(i, false);
}

template <typename S, typename D>
__device__ void cast(const S* src, D* dst, long long n) {
    packs(n, al4(src) && al4(dst), [&](long long i, bool v) {
        if (v) st4(dst + i, ld4(src + i));
        else st1(dst + i, ld1(src + i));
    });
}

extern "C" __global__ void cast_f32_bf16(const float* src, bf16* dst, long long n) { cast(src, dst, n); }
extern "C" __global__ void cast_bf16_f32(const bf16* src, float* dst, long long n) { cast(src, dst, n); }

// acc (f32) += x.
template <typename T>
__device__ void add(float* acc, const T* x, long long n) {
    packs(n, al4(acc) && al4(x), [&](long long i, bool v) {
        if (v) {
            float4 a = ld4(acc + i), b = ld4(x + i);
            st4(acc + i, make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w));
        } else {
            acc[i] += ld1(x + i);
        }
    });
}

extern "C" __global__ void add_f32(float* acc, const float* x, long long n) { add(acc, x, n); }
extern "C" __global__ void add_bf16(float* acc, const bf16* x, long long n) { add(acc, x, n); }

// out (f32) = a + b: the residual add (x f32 + a bf16 branch) and summed input grads (bf16 + bf16)
// in one pass instead of a copy and an add.
template <typename A, typename B>
__device__ void sum2(float* out, const A* a, const B* b, long long n) {
    packs(n, al4(out) && al4(a) && al4(b), [&](long long i, bool v) {
        if (v) {
            float4 x = ld4(a + i), y = ld4(b + i);
            st4(out + i, make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w));
        } else {
            out[i] = ld1(a + i) + ld1(b + i);
        }
    });
}

extern "C" __global__ void sum2_f32_bf16(float* out, const float* a, const bf16* b, long long n) { sum2(out, a, b, n); }
extern "C" __global__ void sum2_bf16_bf16(float* out, const bf16* a, const bf16* b, long long n) { sum2(out, a, b, n); }

// y [rows, cols] (bf16) += b [cols] (bf16): a projection's bias, in place.
extern "C" __global__ void bias_add_bf16(bf16* y, const bf16* b, long long rows, int cols) {
    const long long n = rows * cols, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = __float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(b[i % cols]));
}

// g [cols] (f32) += the column sums of dy [rows, cols] (bf16): a bias's gradient. Thread x of block
// (bx, by) sums column bx·256 + x over rows by·256 .. by·256 + 255, then one atomic add.
extern "C" __global__ void bias_grad_bf16(const bf16* dy, float* g, long long rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long long r0 = (long long)blockIdx.y * 256, r1 = min(rows, r0 + 256);
    float s = 0.f;
    for (long long r = r0; r < r1; r++) s += __bfloat162float(dy[r * cols + c]);
    atomicAdd(g + c, s);
}

// Column slices (multi-head latent attention's splits and joins), bf16, grid-stride over outputs:
// out [rows, w] row o = the sum over s < sum of x [rows·sum, width] row o·sum + s, columns
// start .. start + w (fp32 sum, rounded once).
extern "C" __global__ void cols_bf16(const bf16* x, bf16* out, long long rows, int width, int start, int w, int sum) {
    const long long n = rows * w, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long o = i / w;
        const bf16* p = x + o * sum * width + start + i % w;
        float s = 0.f;
        for (int r = 0; r < sum; r++) s += __bfloat162float(p[(long long)r * width]);
        out[i] = __float2bfloat16(s);
    }
}
// dst [rows·repeat, width] row o·repeat + r, columns at .. at + w = src [rows, w] row o, for r < repeat.
extern "C" __global__ void set_cols_bf16(bf16* dst, const bf16* src, long long rows, int width, int at, int w,
                                         int repeat) {
    const long long n = rows * repeat * w, stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long row = i / w;  // dst row
        dst[row * width + at + i % w] = src[(row / repeat) * w + i % w];
    }
}

// x *= s.
extern "C" __global__ void scale_f32(float* x, long long n, float s) {
    packs(n, al4(x), [&](long long i, bool v) {
        if (v) {
            float4 a = ld4(x + i);
            st4(x + i, make_float4(a.x * s, a.y * s, a.z * s, a.w * s));
        } else {
            x[i] *= s;
        }
    });
}

// *out += Σ x (or Σ x² when square): per-thread sums, a warp-shuffle and shared-memory block
// sum, one atomicAdd per block. Launch: block 256, grid ≤ 1024.
extern "C" __global__ void sum_f32(const float* x, float* out, long long n, int square) {
    __shared__ float part[32];
    float acc = 0.f;
    packs(n, al4(x), [&](long long i, bool v) {
        if (v) {
            float4 a = ld4(x + i);
            acc += square ? a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w : a.x + a.y + a.z + a.w;
        } else {
            acc += square ? x[i] * x[i] : x[i];
        }
    });
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < warps ? part[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL, acc, o);
        if (lane == 0) atomicAdd(out, acc);
    }
}

// out [T, H] = rows tokens[t] of table [V, H]; a token outside [0, V) gives a row of NaN.
extern "C" __global__ void embed_fwd(const int* tokens, const float* table, float* out, int T, int H, int V) {
    const bool vec = H % 4 == 0 && al4(table) && al4(out);
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const int tok = tokens[t];
        float* o = out + (long long)t * H;
        if (tok < 0 || tok >= V) {
            for (int j = threadIdx.x; j < H; j += blockDim.x) o[j] = NAN_F;
            continue;
        }
        const float* src = table + (long long)tok * H;
        if (vec) {
            for (int j = threadIdx.x; j < H / 4; j += blockDim.x) st4(o + 4 * j, ld4(src + 4 * j));
        } else {
            for (int j = threadIdx.x; j < H; j += blockDim.x) o[j] = src[j];
        }
    }
}

// dtable [V, H] += dout [T, H] scattered to rows tokens[t] (atomicAdd: tokens repeat); tokens
// outside [0, V) are skipped.
extern "C" __global__ void embed_bwd(const int* tokens, const float* dout, float* dtable, int T, int H, int V) {
    const bool vec = H % 4 == 0 && al4(dout);
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const int tok = tokens[t];
        if (tok < 0 || tok >= V) continue;
        const float* d = dout + (long long)t * H;
        float* dst = dtable + (long long)tok * H;
        if (vec) {
            for (int j = threadIdx.x; j < H / 4; j += blockDim.x) {
                float4 a = ld4(d + 4 * j);
                atomicAdd(dst + 4 * j, a.x);
                atomicAdd(dst + 4 * j + 1, a.y);
                atomicAdd(dst + 4 * j + 2, a.z);
                atomicAdd(dst + 4 * j + 3, a.w);
            }
        } else {
            for (int j = threadIdx.x; j < H; j += blockDim.x) atomicAdd(dst + j, d[j]);
        }
    }
}

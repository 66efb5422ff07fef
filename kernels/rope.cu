// Rotary position embedding in place, rotate-half convention (layers.rs Rope::rotate):
// x bf16 [rows, heads, D], the position of row r being r % seq; cos, sin f32 [≥ seq, D/2].
// For i < half = D/2, the pair (a, b) = (x[i], x[i + half]) becomes
//   (a·cos − b·s, b·cos + a·s),  s = sign·sin   (sign +1 forward, −1 the inverse),
// in fp32, rounded once to bf16.
//
// Launch: block 256, grid over rows·heads·half/2 threads (grid-stride beyond). A thread rotates
// two adjacent pairs (i, i+1) with bf16x2 / float2 loads when half is even and x, cos, sin are
// aligned for them, else one pair.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

extern "C" __global__ void rope(bf16* x, const float* cos_t, const float* sin_t, long long rows, int seq, int heads,
                                int half, float sign) {
    const bool vec = half % 2 == 0 && ((unsigned long long)x & 3ull) == 0 && ((unsigned long long)cos_t & 7ull) == 0 &&
                     ((unsigned long long)sin_t & 7ull) == 0;
    const int per = vec ? 2 : 1, groups = half / per;  // pair groups per head
    const long long n = rows * heads * groups, stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += stride) {
        const int i = (int)(t % groups) * per;
        const long long rh = t / groups;  // row · heads + head
        const long long pos = (rh / heads) % seq;
        bf16* a = x + rh * 2 * half + i;
        bf16* b = a + half;
        const float* c = cos_t + pos * half + i;
        const float* s = sin_t + pos * half + i;
        if (vec) {
            float2 av = __bfloat1622float2(*reinterpret_cast<bf162*>(a));
            float2 bv = __bfloat1622float2(*reinterpret_cast<bf162*>(b));
            float2 cv = *reinterpret_cast<const float2*>(c);
            float2 sv = *reinterpret_cast<const float2*>(s);
            sv.x *= sign, sv.y *= sign;
            *reinterpret_cast<bf162*>(a) = __floats2bfloat162_rn(av.x * cv.x - bv.x * sv.x, av.y * cv.y - bv.y * sv.y);
            *reinterpret_cast<bf162*>(b) = __floats2bfloat162_rn(bv.x * cv.x + av.x * sv.x, bv.y * cv.y + av.y * sv.y);
        } else {
            const float av = __bfloat162float(*a), bv = __bfloat162float(*b), cv = *c, sv = sign * *s;
            *a = __float2bfloat16(av * cv - bv * sv);
            *b = __float2bfloat16(bv * cv + av * sv);
        }
    }
}

// Rotary position embedding in place (layers.rs Rope::rotate): x bf16 [rows, heads, W], the
// position of row r being r % seq; the rotated dims are the last D = 2·half of each head of width
// W ≥ D (all of it but under multi-head latent attention); cos, sin f32 [≥ seq, half]. For i < half
// the pair (a, b) = (x[i], x[i + half]) (rotate-half, Llama's layout) or (x[2i], x[2i + 1])
// (`interleaved`, DeepSeek's) becomes
//   (a·cos − b·s, b·cos + a·s),  s = sign·sin   (sign +1 forward, −1 the inverse),
// in fp32, rounded once to bf16.
//
// Launch: block 256, grid over rows·heads·half/2 threads (grid-stride beyond). A rotate-half
// thread rotates two adjacent pairs (i, i+1) with bf16x2 / float2 loads when half is even and x,
// cos, sin are aligned for them, else one pair; an interleaved thread loads its pair as one bf16x2.
// W is even.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef __nv_bfloat162 bf162;

extern "C" __global__ void rope(bf16* x, const float* cos_t, const float* sin_t, long long rows, int seq, int heads,
                                int width, int half, float sign, int interleaved) {
    const bool vec = !interleaved && half % 2 == 0 && ((unsigned long long)x & 3ull) == 0 &&
                     ((unsigned long long)cos_t & 7ull) == 0 && ((unsigned long long)sin_t & 7ull) == 0;
    const int per = vec ? 2 : 1, groups = half / per;  // pair groups per head
    const long long n = rows * heads * groups, stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n; t += stride) {
        const int i = (int)(t % groups) * per;
        const long long rh = t / groups;  // row · heads + head
        const long long pos = (rh / heads) % seq;
        bf16* head = x + rh * width + (width - 2 * half);
        const float* c = cos_t + pos * half + i;
        const float* s = sin_t + pos * half + i;
        if (interleaved) {
            bf162* p = reinterpret_cast<bf162*>(head + 2 * i);
            const float2 v = __bfloat1622float2(*p);
            const float cv = *c, sv = sign * *s;
            *p = __floats2bfloat162_rn(v.x * cv - v.y * sv, v.y * cv + v.x * sv);
        } else if (vec) {
            bf16* a = head + i;
            bf16* b = a + half;
            float2 av = __bfloat1622float2(*reinterpret_cast<bf162*>(a));
            float2 bv = __bfloat1622float2(*reinterpret_cast<bf162*>(b));
            float2 cv = *reinterpret_cast<const float2*>(c);
            float2 sv = *reinterpret_cast<const float2*>(s);
            sv.x *= sign, sv.y *= sign;
            *reinterpret_cast<bf162*>(a) = __floats2bfloat162_rn(av.x * cv.x - bv.x * sv.x, av.y * cv.y - bv.y * sv.y);
            *reinterpret_cast<bf162*>(b) = __floats2bfloat162_rn(bv.x * cv.x + av.x * sv.x, bv.y * cv.y + av.y * sv.y);
        } else {
            bf16* a = head + i;
            bf16* b = a + half;
            const float av = __bfloat162float(*a), bv = __bfloat162float(*b), cv = *c, sv = sign * *s;
            *a = __float2bfloat16(av * cv - bv * sv);
            *b = __float2bfloat16(bv * cv + av * sv);
        }
    }
}

// expert-choice router (Zhou et al. 2022); src/lib.rs has the math and the CPU reference these
// kernels mirror. Compiled after the kit's helpers (plugin-api/kernels/common.cuh: warp_sum,
// warp_max, FULL, NEG_INF, cuda_bf16.h). Every launch has 256 threads a block (8 warps). The row
// kernels run one warp per token row, grid-stride over rows; E <= 1024: a lane holds experts
// j = lane + 32·b (b < 32), one bit each in `taken`. No float atomics: every float sum has a fixed
// order; the only atomics are integer histogram counts (exact in any order).

#define NO_ID 0x7fffffff

// The order of scores as an integer, as `key` in src/lib.rs: s > 0 → its f32 bits + 1 (the bits of
// non-negative floats are monotone), s <= 0 → 1, NaN → 0 (below every score).
__device__ __forceinline__ unsigned ec_key(float s) {
    return s != s ? 0u : s > 0.f ? __float_as_uint(s) + 1u : 1u;
}

// logits [T,E] -> probs [T,E] = the softmax of each row (max, exp(l − max), sum, divide: the CPU's
// steps) and keys [E,T] = ec_key(probs), transposed so that an expert's column is contiguous for
// ec_select.
extern "C" __global__ void ec_softmax(const float* logits, float* probs, unsigned* keys, int T, int E) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E;
        const float* l = logits + row;
        float m = NEG_INF, s = 0.f;
        for (int j = lane; j < E; j += 32) m = fmaxf(m, l[j]);
        m = warp_max(m);
        for (int j = lane; j < E; j += 32) s += expf(l[j] - m);
        s = warp_sum(s);
        for (int j = lane; j < E; j += 32) {
            float p = expf(l[j] - m) / s;
            probs[row + j] = p;
            keys[(long long)j * T + r] = ec_key(p);
        }
    }
}

// chosen [T,E] (0 or 1, every element written) from keys [E,T]: expert e takes the `cap` tokens
// (1 <= cap <= T) of largest key in its column, ties to the lower token index. One block of 256
// threads per expert (grid-stride over experts):
//   1. radix select, 8 bits a pass from the top: a histogram of the digit among the keys that
//      match the prefix found so far; thread 0 walks it from digit 255 down to the digit holding
//      the `left`-th largest (left counts down what the higher digits held). After 4 passes
//      `prefix` is the key K of the cap-th largest and `left` how many of the tokens with key K
//      are taken (the cap − left others have keys > K).
//   2. a block-ordered scan over the tokens in index order: a token is chosen when its key is
//      > K, or = K and fewer than `left` tokens with key K come before it.
// The histogram counts are integer atomics: the same counts in any order, so the result is
// deterministic.
extern "C" __global__ void ec_select(const unsigned* keys, int* chosen, int T, int E, int cap) {
    __shared__ int hist[256];
    __shared__ int warp_n[32];
    __shared__ unsigned s_prefix;
    __shared__ int s_left;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
        const unsigned* k = keys + (long long)e * T;
        unsigned prefix = 0u, mask = 0u;
        int left = cap;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
            __syncthreads();
            for (int t = threadIdx.x; t < T; t += blockDim.x) {
                unsigned v = k[t];
                if ((v & mask) == prefix) atomicAdd(&hist[(v >> shift) & 255u], 1);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                int d = 255;
                while (d > 0 && left > hist[d]) left -= hist[d--];
                s_prefix = prefix | ((unsigned)d << shift);
                s_left = left;
            }
            __syncthreads();
            prefix = s_prefix;
            left = s_left;
            mask |= 255u << shift;
            // No barrier needed here: thread 0 rewrites s_prefix/s_left, and anyone rewrites hist,
            // only after the next pass's first barrier, which every thread reaches after reading.
        }
        int run = 0;  // tokens with key == prefix before this chunk (the same in every thread)
        for (int base = 0; base < T; base += blockDim.x) {
            int t = base + threadIdx.x;
            unsigned v = t < T ? k[t] : 0u;
            bool tie = t < T && v == prefix;
            unsigned b = __ballot_sync(FULL, tie);
            if (lane == 0) warp_n[w] = __popc(b);
            __syncthreads();
            int before = run + __popc(b & ((1u << lane) - 1u));
            for (int i = 0; i < w; i++) before += warp_n[i];
            if (t < T) chosen[(long long)t * E + e] = (v > prefix || (tie && before < left)) ? 1 : 0;
            for (int i = 0; i < warps; i++) run += warp_n[i];
            __syncthreads();  // warp_n is rewritten for the next chunk
        }
        // The next expert's first barrier (after zeroing hist) orders its writes after these reads.
    }
}

// stats [3] from chosen [T,E]: the chosen (token, expert) pairs in all, the tokens with none, and
// the most experts any token got, as floats (integer counts: exact below 2^24). One block of 256
// threads; integer sums, so the order does not matter.
extern "C" __global__ void ec_stats(const int* chosen, float* stats, int T, int E) {
    __shared__ long long s_sum[256];
    __shared__ int s_none[256], s_most[256];
    long long sum = 0;
    int none = 0, most = 0;
    for (int r = threadIdx.x; r < T; r += blockDim.x) {
        const int* c = chosen + (long long)r * E;
        int n = 0;
        for (int j = 0; j < E; j++) n += c[j];
        sum += n;
        none += n == 0;
        most = max(most, n);
    }
    s_sum[threadIdx.x] = sum;
    s_none[threadIdx.x] = none;
    s_most[threadIdx.x] = most;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            s_sum[threadIdx.x] += s_sum[threadIdx.x + o];
            s_none[threadIdx.x] += s_none[threadIdx.x + o];
            s_most[threadIdx.x] = max(s_most[threadIdx.x], s_most[threadIdx.x + o]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        stats[0] = (float)s_sum[0];
        stats[1] = (float)s_none[0];
        stats[2] = (float)s_most[0];
    }
}

// ids [T,k], weights [T,k]: each token's chosen experts by descending key (ties: the lower id),
// gate = its probability, then EMPTY (-1) with weight 0. k >= the most experts of any token: one
// round of a warp argmax per chosen expert.
extern "C" __global__ void ec_gather(const float* probs, const int* chosen, int* ids, float* weights, int T, int E,
                                     int k) {
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E, out = (long long)r * k;
        unsigned taken = 0;
        int n = 0;
        for (; n < k; n++) {
            unsigned bk = 0u;
            int bi = NO_ID;
            for (int j = lane, b = 0; j < E; j += 32, b++) {
                if ((taken >> b & 1u) || !chosen[row + j]) continue;
                unsigned kj = ec_key(probs[row + j]);
                if (bi == NO_ID || kj > bk) bk = kj, bi = j;  // j ascending: a tie keeps the lower id
            }
            for (int o = 16; o > 0; o >>= 1) {  // the larger key, the lower id on ties; NO_ID loses
                unsigned ok = __shfl_xor_sync(FULL, bk, o);
                int oi = __shfl_xor_sync(FULL, bi, o);
                if (oi != NO_ID && (bi == NO_ID || ok > bk || (ok == bk && oi < bi))) bk = ok, bi = oi;
            }
            if (bi == NO_ID) break;  // the same in every lane: no chosen expert left
            if (lane == 0) {
                ids[out + n] = bi;
                weights[out + n] = probs[row + bi];
            }
            if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        }
        for (int q = n + lane; q < k; q += 32) {
            ids[out + q] = -1;
            weights[out + q] = 0.f;
        }
    }
}

// dl [T,E] (bf16, for the GEMMs) = d_logits + p ⊙ (ds − ⟨ds, p⟩), ds = d_probs plus d_weights on
// the chosen ids (the gates are the probabilities themselves); EMPTY slots (id < 0) add nothing.
extern "C" __global__ void ec_bwd(const float* probs, const int* ids, const float* d_weights, const float* d_probs,
                                  const float* d_logits, __nv_bfloat16* dl, int T, int E, int k) {
    __shared__ float ds_rows[8][1024];
    int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float* ds = ds_rows[threadIdx.x >> 5];
    for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < T; r += gridDim.x * warps) {
        long long row = (long long)r * E, out = (long long)r * k;
        const float* p = probs + row;
        for (int j = lane; j < E; j += 32) ds[j] = d_probs[row + j];
        __syncwarp();
        for (int q = lane; q < k; q += 32) {
            int id = ids[out + q];
            if (id >= 0) ds[id] += d_weights[out + q];  // the ids of a row are distinct
        }
        __syncwarp();
        float pd = 0.f;
        for (int j = lane; j < E; j += 32) pd += p[j] * ds[j];
        pd = warp_sum(pd);
        for (int j = lane; j < E; j += 32) dl[row + j] = __float2bfloat16(d_logits[row + j] + p[j] * (ds[j] - pd));
        __syncwarp();  // ds is rewritten for the next row
    }
}

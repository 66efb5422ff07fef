// capacity comm schedule (see src/lib.rs). Pair i = t·k + slot. rows[i] = the sorted row of pair i,
// or -1 for an EMPTY slot (id -1) or a dropped pair, which every kernel skips; within an expert,
// the kept rows keep (token, slot) order, as in `local`. bf16 rows, fp32 math, no float atomics.
//
// dispatch: capacity_rank (local's ranking: position of each pair within its expert in (token,
// slot) order, and the counts) → the host computes C from the counts → when some expert has more
// than C pairs: capacity_list (the pairs of each expert, in (token, slot) order) and
// capacity_select (each expert keeps its C largest gates; krank = the kept rank or -1), else krank
// is the rank itself (nothing drops: exactly `local`) → capacity_gather.

// One block of 1024 threads per class e in 0..E (grid-stride over classes) walks ids [n] in
// chunks; a ballot and a block prefix sum rank the pairs routed to e: rank[i] = the position of
// pair i within its expert, counts[e] = the pairs routed to e. Class E counts the ids that are
// neither experts nor EMPTY (an error); EMPTY ids are in no count. (local_rank, unchanged.)
extern "C" __global__ void capacity_rank(const int* ids, int* rank, int* counts, int n, int E) {
    __shared__ int warp_prefix[32];
    __shared__ int chunk_total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int e = blockIdx.x; e <= E; e += gridDim.x) {
        int base = 0;
        for (int start = 0; start < n; start += blockDim.x) {
            int i = start + threadIdx.x, id = i < n ? ids[i] : -1;
            bool mine = e < E ? id == e : id < -1 || id >= E;
            unsigned ballot = __ballot_sync(FULL, mine);
            if (lane == 0) warp_prefix[warp] = __popc(ballot);
            __syncthreads();
            if (warp == 0) {  // inclusive scan of the per-warp counts
                int v = lane < warps ? warp_prefix[lane] : 0;
                for (int o = 1; o < 32; o <<= 1) {
                    int u = __shfl_up_sync(FULL, v, o);
                    if (lane >= o) v += u;
                }
                if (lane < warps) warp_prefix[lane] = v;
                if (lane == 31) chunk_total = v;
            }
            __syncthreads();
            if (mine) rank[i] = base + (warp ? warp_prefix[warp - 1] : 0) + __popc(ballot & ((1u << lane) - 1));
            base += chunk_total;
            __syncthreads();  // warp_prefix and chunk_total are rewritten by the next chunk
        }
        if (threadIdx.x == 0) counts[e] = base;
    }
}

// Thread per pair i: list[all[ids[i]] + rank[i]] = i, so list[all[e] .. all[e+1]) holds expert e's
// pairs in (token, slot) order (`all` = the exclusive prefix sum of every pair's counts). Runs
// after the host has refused ids that are neither experts nor EMPTY.
extern "C" __global__ void capacity_list(const int* ids, const int* rank, const int* all, int* list, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        int id = ids[i];
        if (id >= 0) list[all[id] + rank[i]] = i;
    }
}

// A gate as an int that orders like Rust's f32::total_cmp (so both devices pick the same pairs,
// -0 < +0 and NaNs included): flip the magnitude bits of negative values.
__device__ __forceinline__ int order_key(float f) {
    int a = __float_as_int(f);
    return a ^ (int)(((unsigned)(a >> 31)) >> 1);
}

// One block of 1024 threads per expert e (grid-stride over experts), over its pairs list[all[e] ..
// all[e+1]) in chunks of 1024. Pair i's gate rank = the pairs of e with a larger gate, or an equal
// gate and an earlier index (each thread counts them over the list, staged through shared memory
// in tiles: O(cnt²) per expert, skipped when cnt ≤ C: then every pair is kept). Kept: gate rank <
// C. A ballot and block prefix sum over the kept flags, in list order, give krank[i] = the pair's
// position among e's kept pairs ((token, slot) order), or -1 when dropped.
extern "C" __global__ void capacity_select(const int* list, const int* all, const float* w, int* krank, int E, int C) {
    __shared__ int tile_key[1024];
    __shared__ int tile_pair[1024];
    __shared__ int warp_prefix[32];
    __shared__ int chunk_total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int e = blockIdx.x; e < E; e += gridDim.x) {
        int begin = all[e], cnt = all[e + 1] - begin, base = 0;
        for (int start = 0; start < cnt; start += blockDim.x) {
            int p = start + threadIdx.x;
            bool valid = p < cnt;
            int i = valid ? list[begin + p] : 0;
            int key = valid ? order_key(w[i]) : 0;
            int ahead = 0;
            if (cnt > C) {  // the same for the whole block, so every thread reaches each barrier
                for (int t0 = 0; t0 < cnt; t0 += blockDim.x) {
                    int q = t0 + threadIdx.x;
                    if (q < cnt) {
                        int j = list[begin + q];
                        tile_pair[threadIdx.x] = j;
                        tile_key[threadIdx.x] = order_key(w[j]);
                    }
                    __syncthreads();
                    int m = min((int)blockDim.x, cnt - t0);
                    if (valid) {
                        for (int s = 0; s < m; s++) {
                            int kj = tile_key[s];
                            ahead += kj > key || (kj == key && tile_pair[s] < i);
                        }
                    }
                    __syncthreads();  // the tile is rewritten next
                }
            }
            bool keep = valid && ahead < C;
            unsigned ballot = __ballot_sync(FULL, keep);
            if (lane == 0) warp_prefix[warp] = __popc(ballot);
            __syncthreads();
            if (warp == 0) {  // inclusive scan of the per-warp kept counts
                int v = lane < warps ? warp_prefix[lane] : 0;
                for (int o = 1; o < 32; o <<= 1) {
                    int u = __shfl_up_sync(FULL, v, o);
                    if (lane >= o) v += u;
                }
                if (lane < warps) warp_prefix[lane] = v;
                if (lane == 31) chunk_total = v;
            }
            __syncthreads();
            if (valid) {
                int before = base + (warp ? warp_prefix[warp - 1] : 0) + __popc(ballot & ((1u << lane) - 1));
                krank[i] = keep ? before : -1;
            }
            base += chunk_total;
            __syncthreads();  // warp_prefix and chunk_total are rewritten by the next chunk
        }
    }
}

// The row kernels below are local.cu's: they move 8 bf16 (16 bytes) per thread per load when H is
// a multiple of 8, else one element. Gather and combine_bwd give each pair one warp (8 per
// 256-thread block); combine and dispatch_bwd, which sum k rows per token, one block of 128
// threads per token.
#define WARPS 8

// Row i of the warp's walk, or -1 past the end.
__device__ __forceinline__ int warp_row(int step, int n) {
    int i = (step * gridDim.x + blockIdx.x) * WARPS + (threadIdx.x >> 5);
    return i < n ? i : -1;
}

template <int W>
__device__ __forceinline__ void load_n(const __nv_bfloat16* p, float* f) {
    if constexpr (W == 8) load8(p, f);
    else f[0] = __bfloat162float(p[0]);
}
template <int W>
__device__ __forceinline__ void store_n(__nv_bfloat16* p, const float* f) {
    if constexpr (W == 8) store8(p, f);
    else p[0] = __float2bfloat16(f[0]);
}

// Each kernel body is a template on the chunk width W (8, or 1 when H % 8 != 0), so the
// per-thread arrays stay in registers; `c` walks the columns of a row.
template <int W>
__device__ void gather_rows(const __nv_bfloat16* x, const int* ids, const int* krank, const int* offsets, int* rows,
                            __nv_bfloat16* xs, int n, int k, int H) {
    int lane = threadIdx.x & 31;
    for (int step = 0, i; (i = warp_row(step, n)) >= 0; step++) {
        int id = ids[i];
        int kr = id < 0 ? -1 : krank[i];  // krank is not written for EMPTY pairs
        if (kr < 0) {
            if (lane == 0) rows[i] = -1;
            continue;
        }
        int r = offsets[id] + kr;
        if (lane == 0) rows[i] = r;
        const __nv_bfloat16* src = x + (long long)(i / k) * H;
        __nv_bfloat16* dst = xs + (long long)r * H;
        float f[W];
        for (int c = lane * W; c < H; c += 32 * W) {
            load_n<W>(src + c, f);
            store_n<W>(dst + c, f);
        }
    }
}

// Warp per pair i: rows[i] = offsets[ids[i]] + krank[i];  xs[rows[i]] = x[i / k]
// (rows[i] = -1 if EMPTY or dropped: krank[i] < 0). `offsets` are the kept rows' offsets.
extern "C" __global__ void capacity_gather(const __nv_bfloat16* x, const int* ids, const int* krank,
                                           const int* offsets, int* rows, __nv_bfloat16* xs, int n, int k, int H) {
    if (H % 8 == 0) gather_rows<8>(x, ids, krank, offsets, rows, xs, n, k, H);
    else gather_rows<1>(x, ids, krank, offsets, rows, xs, n, k, H);
}

// out[t] = Σ_slot (w ? w[t,slot] : 1) · y[rows[t·k + slot]] over kept slots, in slot order,
// one block per token.
template <int W>
__device__ void sum_rows(const __nv_bfloat16* y, const float* w, const int* rows, __nv_bfloat16* out, int T, int k,
                         int H) {
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        for (int c = threadIdx.x * W; c < H; c += blockDim.x * W) {
            float acc[W], f[W];
            for (int j = 0; j < W; j++) acc[j] = 0.f;
            for (int s = 0; s < k; s++) {
                int i = t * k + s;
                if (rows[i] < 0) continue;
                float g = w ? w[i] : 1.f;
                load_n<W>(y + (long long)rows[i] * H + c, f);
                for (int j = 0; j < W; j++) acc[j] += g * f[j];
            }
            store_n<W>(out + (long long)t * H + c, acc);
        }
    }
}

// Block of 128 threads per token t: out[t] = Σ_slot w[t,slot] · y[rows[t·k + slot]].
extern "C" __global__ void capacity_combine(const __nv_bfloat16* y, const float* w, const int* rows,
                                            __nv_bfloat16* out, int T, int k, int H) {
    if (H % 8 == 0) sum_rows<8>(y, w, rows, out, T, k, H);
    else sum_rows<1>(y, w, rows, out, T, k, H);
}

// Block of 128 threads per token t: dx[t] = Σ_slot dx_sorted[rows[t·k + slot]] (0 with no kept slot).
extern "C" __global__ void capacity_dispatch_bwd(const __nv_bfloat16* dxs, const int* rows, __nv_bfloat16* dx, int T,
                                                 int k, int H) {
    if (H % 8 == 0) sum_rows<8>(dxs, nullptr, rows, dx, T, k, H);
    else sum_rows<1>(dxs, nullptr, rows, dx, T, k, H);
}

// Warp per pair i = t·k + slot: dy[rows[i]] = w[i] · dout[t];  dw[i] = ⟨dout[t], y[rows[i]]⟩
// (a fixed-order warp sum, so the result is reproducible); dw[i] = 0 for an EMPTY or dropped slot.
template <int W>
__device__ void combine_bwd_rows(const __nv_bfloat16* dout, const __nv_bfloat16* y, const float* w, const int* rows,
                                 __nv_bfloat16* dy, float* dw, int n, int k, int H) {
    int lane = threadIdx.x & 31;
    for (int step = 0, i; (i = warp_row(step, n)) >= 0; step++) {
        if (rows[i] < 0) {
            if (lane == 0) dw[i] = 0.f;
            continue;
        }
        const __nv_bfloat16* g = dout + (long long)(i / k) * H;
        long long r = (long long)rows[i] * H;
        float dot = 0.f, gf[W], yf[W];
        for (int c = lane * W; c < H; c += 32 * W) {
            load_n<W>(g + c, gf);
            load_n<W>(y + r + c, yf);
            for (int j = 0; j < W; j++) {
                dot += gf[j] * yf[j];
                gf[j] *= w[i];
            }
            store_n<W>(dy + r + c, gf);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL, dot, o);
        if (lane == 0) dw[i] = dot;
    }
}

extern "C" __global__ void capacity_combine_bwd(const __nv_bfloat16* dout, const __nv_bfloat16* y, const float* w,
                                                const int* rows, __nv_bfloat16* dy, float* dw, int n, int k, int H) {
    if (H % 8 == 0) combine_bwd_rows<8>(dout, y, w, rows, dy, dw, n, k, H);
    else combine_bwd_rows<1>(dout, y, w, rows, dy, dw, n, k, H);
}

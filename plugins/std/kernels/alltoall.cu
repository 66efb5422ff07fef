// alltoall comm schedule (see src/alltoall.rs): out[i] = x[idx[i]] for n rows of W words (a
// row of bf16 activations seen as 16-byte words when its size allows, else 2-byte ones). One
// thread per word, grid-stride; consecutive threads read consecutive words of a row.
template <typename T>
__device__ void gather(const T* x, const int* idx, T* out, int n, int W) {
    long long total = (long long)n * W;
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < total; j += (long long)gridDim.x * blockDim.x) {
        long long i = j / W, c = j % W;
        out[j] = x[(long long)idx[i] * W + c];
    }
}
extern "C" __global__ void alltoall_gather16(const uint4* x, const int* idx, uint4* out, int n, int W) {
    gather(x, idx, out, n, W);
}
extern "C" __global__ void alltoall_gather2(const unsigned short* x, const int* idx, unsigned short* out, int n, int W) {
    gather(x, idx, out, n, W);
}

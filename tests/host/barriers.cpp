// host_launch's barriers (kernels/host.h), run by tests/kernel_host.rs: a kernel whose threads
// all reach every barrier computes over two blocks; with an argument, a kernel in which one
// thread skips a __syncthreads (so its warp's next shuffle can never complete) must stop the
// harness with host_launch's message instead of hanging.
#include "../../kernels/common.cuh"

// y[block] = the sum of the block's thread indices, through a warp sum and shared memory.
__global__ void sums(float* y) {
    __shared__ float s[2];
    float v = warp_sum((float)threadIdx.x);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) y[blockIdx.x] = s[0] + s[1];
}

// Thread 5 skips the block barrier, then waits at a shuffle the rest of its warp never reaches.
__global__ void skips(float* y) {
    if (threadIdx.x != 5) __syncthreads();
    if (threadIdx.x < 32) y[0] = __shfl_xor_sync(FULL_MASK, (float)threadIdx.x, 1);
}

int main(int argc, char**) {
    float y[2] = {0, 0};
    host_launch({2, 1, 1}, 64, [&] { sums(y); });
    std::printf("sums %g %g\n", (double)y[0], (double)y[1]);
    if (y[0] != 2016.0f || y[1] != 2016.0f) return 1;
    if (argc > 1) {
        host_launch({1, 1, 1}, 64, [&] { skips(y); });
        std::printf("skips finished\n");
    }
    return 0;
}

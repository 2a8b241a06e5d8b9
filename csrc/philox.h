// Counter-based random bits for attention dropout (Philox4x32-10).
//
// Every backend (CPU, CUDA, Triton) and the PyTorch reference
// (fastattn/reference.py, dropout_keep_mask) draw the keep/drop decision of
// attention probability (segment s, query row i, key column j) the same way:
//     words = philox4x32_10(counter = {j / 4, i, s, offset}, key = seed)
//     keep  = words[j % 4] >= threshold,  threshold = round(p * 2^32)
// with s = batch_index * num_q_heads + q_head and (seed, offset) the int64 pair
// drawn from torch's generator. Nothing is stored: backward regenerates it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

struct Philox4 {
  uint32_t w[4];
};

FASTATTN_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                           uint64_t seed) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// uint32 threshold below which a random word drops the element.
FASTATTN_HOST_DEVICE uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace fastattn

// The emulated device of device_emulation.h: a block's threads as fibers, warp-level
// instructions as collectives resolved by the PTX ISA's rules, cp.async queues, and the
// launch checks of the driver. See the header for what is checked.
#include "device_emulation.h"

#include <ucontext.h>

#include <deque>
#include <map>
#include <sstream>
#include <vector>

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fastattn {
namespace cuda {
constexpr size_t kSmemArena = 256 * 1024;  // above every GPU's per-block opt-in limit (sm90: 227 KB)
alignas(128) unsigned char smem_raw[kSmemArena];
}  // namespace cuda

namespace emu {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kDefaultSmemLimit = 48 * 1024;  // dynamic smem a kernel may use without the attribute

enum class Wait { kRunnable, kWarp, kBlock, kDone };
enum class Op { kNone, kMma, kLdmatrix, kLdmatrixTrans, kShfl };

const char* op_name(Op op) {
  switch (op) {
    case Op::kMma: return "mma.sync.m16n8k16";
    case Op::kLdmatrix: return "ldmatrix.x4";
    case Op::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case Op::kShfl: return "shfl.sync.bfly";
    default: return "none";
  }
}

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
};

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  Wait wait = Wait::kRunnable;
  // Operands of the warp collective this thread waits at, and its result.
  Op op = Op::kNone;
  Mma mma_kind = Mma::kF16;
  uint32_t in[10] = {};
  uint32_t out[4] = {};
  int arg = 0;
  // cp.async: copies issued since the last commit, and committed groups not yet waited for.
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> groups;
};

struct Buffer {
  const unsigned char* begin;
  size_t bytes;
  std::string name;
};

struct State {
  DeviceModel device;
  Counters counters;
  std::vector<Buffer> buffers;
  std::map<const void*, int> max_dynamic_smem;
  // The running launch.
  bool active = false;
  const KernelBody* body = nullptr;
  int smem_bytes = 0, num_threads = 0, done = 0, block_arrived = 0, current = 0;
  std::vector<int> warp_arrived;
  std::vector<Thread> threads;
  ucontext_t scheduler;
  bool failed = false;
  std::string error;
};

State& state() {
  static State s;
  return s;
}

Thread& self() { return state().threads[state().current]; }

std::string where() {
  std::ostringstream os;
  os << "block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z << "), thread " << threadIdx.x;
  return os.str();
}

// Inside a launch: records the first error and leaves the thread for good (the scheduler
// ends the launch); outside one it throws directly.
[[noreturn]] void fail(const std::string& message) {
  State& s = state();
  if (!s.active) TORCH_CHECK(false, "fastattn cuda emulation: ", message);
  if (!s.failed) {
    s.failed = true;
    s.error = message + " (" + where() + ")";
  }
  swapcontext(&self().ctx, &s.scheduler);
  __builtin_unreachable();
}

void yield_to_scheduler() { swapcontext(&self().ctx, &state().scheduler); }

void thread_main() {
  State& s = state();
  (*s.body)();
  Thread& t = self();
  t.wait = Wait::kDone;
  ++s.done;
  const int warp = s.current / kWarp;
  if (s.warp_arrived[warp] > 0) {
    fail("thread exited while " + std::to_string(s.warp_arrived[warp]) + " lanes of its warp wait at a warp-level "
         "instruction (divergent warp)");
  }
  if (s.block_arrived > 0) {
    fail("thread exited while " + std::to_string(s.block_arrived) + " threads wait at __syncthreads");
  }
  swapcontext(&t.ctx, &s.scheduler);
}

float half_bits_to_float(Mma kind, uint16_t bits) {
  if (kind == Mma::kF16) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

uint32_t load_u32(uint32_t offset) {
  uint32_t w;
  std::memcpy(&w, cuda::smem_raw + offset, 4);
  return w;
}
uint16_t load_u16(uint32_t offset) {
  uint16_t h;
  std::memcpy(&h, cuda::smem_raw + offset, 2);
  return h;
}

void check_smem_range(uint32_t offset, uint32_t bytes, const char* what) {
  const State& s = state();
  if (offset % 16 != 0) fail(std::string(what) + ": shared address " + std::to_string(offset) + " is not 16-byte aligned");
  if (static_cast<int64_t>(offset) + bytes > s.smem_bytes) {
    fail(std::string(what) + ": shared bytes " + std::to_string(offset) + ".." + std::to_string(offset + bytes) +
         " are past the launch's dynamic shared memory (" + std::to_string(s.smem_bytes) + " bytes)");
  }
}

// The warp's result, computed by its last lane to arrive once all 32 deposited operands.
void resolve(int warp) {
  State& s = state();
  Thread* lanes = &s.threads[warp * kWarp];
  const Op op = lanes[0].op;
  for (int l = 1; l < kWarp; ++l) {
    if (lanes[l].op != op) {
      fail(std::string("divergent warp: lane 0 is at ") + op_name(op) + ", lane " + std::to_string(l) + " at " +
           op_name(lanes[l].op));
    }
  }
  switch (op) {
    case Op::kShfl:
      for (int l = 0; l < kWarp; ++l) {
        if (lanes[l].in[1] != 0xffffffffu) fail("shfl.sync with a partial member mask");
        lanes[l].out[0] = lanes[l ^ (lanes[l].arg & 31)].in[0];
      }
      ++s.counters.shuffles;
      break;
    case Op::kLdmatrix:
    case Op::kLdmatrixTrans: {
      for (int l = 0; l < kWarp; ++l) check_smem_range(lanes[l].in[0], 16, op_name(op));
      for (int l = 0; l < kWarp; ++l) {
        for (int i = 0; i < 4; ++i) {
          if (op == Op::kLdmatrix) {  // row l/4 of matrix i, its 32-bit column pair l%4
            lanes[l].out[i] = load_u32(lanes[8 * i + l / 4].in[0] + 4 * (l % 4));
          } else {  // column l/4 of matrix i, rows 2(l%4) and 2(l%4)+1
            const uint32_t lo = load_u16(lanes[8 * i + 2 * (l % 4)].in[0] + 2 * (l / 4));
            const uint32_t hi = load_u16(lanes[8 * i + 2 * (l % 4) + 1].in[0] + 2 * (l / 4));
            lanes[l].out[i] = lo | (hi << 16);
          }
        }
      }
      ++s.counters.ldmatrix;
      break;
    }
    case Op::kMma: {
      const Mma kind = lanes[0].mma_kind;
      // PTX ISA, mma.m16n8k16 with .f16/.bf16 A/B and .f32 C/D; groupID g = lane / 4,
      // threadID_in_group t = lane % 4; the lower-indexed element is in the low 16 bits.
      //   A regs 0..3: (g, 2t..2t+1), (g+8, 2t..2t+1), (g, 2t+8..2t+9), (g+8, 2t+8..2t+9)
      //   B regs 0..1: (k 2t..2t+1, n g), (k 2t+8..2t+9, n g)
      //   C/D 0..3:    (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < kWarp; ++l) {
        const Thread& x = lanes[l];
        if (x.mma_kind != kind) fail("mma.sync: lanes disagree on the element type");
        const int g = l / 4, t = l % 4;
        auto h = [&](uint32_t w, int high) { return half_bits_to_float(kind, static_cast<uint16_t>(w >> (16 * high))); };
        for (int e = 0; e < 2; ++e) {
          A[g][2 * t + e] = h(x.in[0], e);
          A[g + 8][2 * t + e] = h(x.in[1], e);
          A[g][2 * t + 8 + e] = h(x.in[2], e);
          A[g + 8][2 * t + 8 + e] = h(x.in[3], e);
          B[2 * t + e][g] = h(x.in[4], e);
          B[2 * t + 8 + e][g] = h(x.in[5], e);
        }
        float c[4];
        std::memcpy(c, &x.in[6], 16);
        C[g][2 * t] = c[0], C[g][2 * t + 1] = c[1], C[g + 8][2 * t] = c[2], C[g + 8][2 * t + 1] = c[3];
      }
      float D[16][8];
      for (int i = 0; i < 16; ++i) {
        for (int n = 0; n < 8; ++n) {
          double acc = C[i][n];
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[i][k]) * B[k][n];
          D[i][n] = static_cast<float>(acc);
        }
      }
      for (int l = 0; l < kWarp; ++l) {
        const int g = l / 4, t = l % 4;
        const float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
        std::memcpy(lanes[l].out, d, 16);
      }
      ++s.counters.mma;
      break;
    }
    default:
      fail("warp collective without an instruction");
  }
}

// Deposits this lane's operands (already in self().in) and waits for the warp.
void warp_collective(Op op) {
  State& s = state();
  if (!s.active) TORCH_CHECK(false, "fastattn cuda emulation: ", op_name(op), " outside a kernel launch");
  Thread& t = self();
  const int warp = s.current / kWarp;
  for (int l = warp * kWarp; l < (warp + 1) * kWarp; ++l) {
    if (s.threads[l].wait == Wait::kDone) {
      fail(std::string(op_name(op)) + " after lane " + std::to_string(l % kWarp) + " of the warp exited");
    }
  }
  t.op = op;
  if (++s.warp_arrived[warp] == kWarp) {
    resolve(warp);
    s.warp_arrived[warp] = 0;
    for (int l = warp * kWarp; l < (warp + 1) * kWarp; ++l) {
      if (s.threads[l].wait == Wait::kWarp) s.threads[l].wait = Wait::kRunnable;
    }
    return;  // the last lane goes on with its result at once
  }
  t.wait = Wait::kWarp;
  yield_to_scheduler();
}

void perform(const std::vector<Copy>& group) {
  static const unsigned char zeros[16] = {};
  for (const Copy& c : group) std::memcpy(cuda::smem_raw + c.dst, c.valid ? c.src : zeros, 16);
}

const Buffer* find_buffer(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (const Buffer& buf : state().buffers) {
    if (b >= buf.begin && b + bytes <= buf.begin + buf.bytes) return &buf;
  }
  return nullptr;
}

void run_block(dim3 block_index) {
  State& s = state();
  blockIdx = block_index;
  std::memset(cuda::smem_raw, 0xFF, s.smem_bytes);  // NaN in fp16, bf16 and fp32
  s.done = s.block_arrived = 0;
  std::fill(s.warp_arrived.begin(), s.warp_arrived.end(), 0);
  for (int i = 0; i < s.num_threads; ++i) {
    Thread& t = s.threads[i];
    if (t.stack.empty()) t.stack.resize(kStackBytes);
    t.wait = Wait::kRunnable;
    t.op = Op::kNone;
    t.open_group.clear();
    t.groups.clear();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, thread_main, 0);
  }
  while (s.done < s.num_threads) {
    bool progressed = false;
    for (int i = 0; i < s.num_threads && !s.failed; ++i) {
      if (s.threads[i].wait != Wait::kRunnable) continue;
      s.current = i;
      threadIdx = dim3(i, 0, 0);
      swapcontext(&s.scheduler, &s.threads[i].ctx);
      progressed = true;
    }
    if (s.failed) return;
    if (!progressed) {
      int at_warp = 0, at_block = 0;
      for (const Thread& t : s.threads) at_warp += t.wait == Wait::kWarp, at_block += t.wait == Wait::kBlock;
      s.failed = true;
      std::ostringstream os;
      os << "deadlock in block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z << "): " << s.done
         << " threads exited, " << at_block << " wait at __syncthreads, " << at_warp
         << " at warp-level instructions";
      s.error = os.str();
      return;
    }
  }
}

}  // namespace

DeviceModel& device() { return state().device; }

void set_device(const std::string& name) {
  // Opt-in dynamic shared memory per block (CUDA programming guide, compute capabilities table).
  // Multiprocessors of a typical part: A100, A40, RTX 4090, H100/H200, B200, RTX 5090.
  static const std::map<std::string, std::tuple<int, int, int, int>> kDevices = {
      {"sm80", {8, 0, 166912, 108}}, {"sm86", {8, 6, 101376, 84}},   {"sm89", {8, 9, 101376, 128}},
      {"sm90", {9, 0, 232448, 132}}, {"sm100", {10, 0, 232448, 148}}, {"sm120", {12, 0, 101376, 170}}};
  const auto it = kDevices.find(name);
  TORCH_CHECK(it != kDevices.end(), "fastattn cuda emulation: unknown device ", name,
              "; known: sm80, sm86, sm89, sm90, sm100, sm120");
  DeviceModel& d = state().device;
  d.name = name;
  std::tie(d.major, d.minor, d.max_smem_optin, d.sm_count) = it->second;
  state().max_dynamic_smem.clear();  // attributes belong to a device
}

void register_buffer(const void* ptr, size_t bytes, const char* name) {
  state().buffers.push_back({static_cast<const unsigned char*>(ptr), bytes, name});
}
void clear_buffers() { state().buffers.clear(); }
Counters& counters() { return state().counters; }

void mma_m16n8k16(Mma kind, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Thread& t = self();
  std::memcpy(t.in, a, 16);
  t.in[4] = b0, t.in[5] = b1;
  std::memcpy(&t.in[6], c, 16);
  t.mma_kind = kind;
  warp_collective(Op::kMma);
  std::memcpy(c, self().out, 16);
}

void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_offset, bool trans) {
  self().in[0] = smem_offset;
  warp_collective(trans ? Op::kLdmatrixTrans : Op::kLdmatrix);
  std::memcpy(r, self().out, 16);
}

uint32_t shfl_xor(unsigned mask, uint32_t value, int lane_mask) {
  Thread& t = self();
  t.in[0] = value, t.in[1] = mask, t.arg = lane_mask;
  warp_collective(Op::kShfl);
  return self().out[0];
}

void cp_async_16(uint32_t smem_offset, const void* src, bool valid) {
  if (!state().active) TORCH_CHECK(false, "fastattn cuda emulation: cp.async outside a kernel launch");
  check_smem_range(smem_offset, 16, "cp.async");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: global source is not 16-byte aligned");
    if (find_buffer(src, 16) == nullptr) fail("cp.async: global source is outside every tensor of the call");
  }
  self().open_group.push_back({smem_offset, src, valid});
  ++state().counters.cp_async;
}

void cp_async_commit() {
  Thread& t = self();
  t.groups.push_back(std::move(t.open_group));
  t.open_group.clear();
}

void cp_async_wait(int pending) {
  Thread& t = self();
  while (static_cast<int>(t.groups.size()) > pending) {
    perform(t.groups.front());
    t.groups.pop_front();
  }
}

void syncthreads() {
  State& s = state();
  if (!s.active) TORCH_CHECK(false, "fastattn cuda emulation: __syncthreads outside a kernel launch");
  ++s.counters.barriers;
  if (s.done > 0) fail("__syncthreads after " + std::to_string(s.done) + " threads of the block exited");
  if (++s.block_arrived == s.num_threads) {
    s.block_arrived = 0;
    for (Thread& t : s.threads) {
      if (t.wait == Wait::kBlock) t.wait = Wait::kRunnable;
    }
    return;
  }
  self().wait = Wait::kBlock;
  yield_to_scheduler();
}

uint32_t smem_offset_of(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < cuda::smem_raw || b > cuda::smem_raw + cuda::kSmemArena) {
    fail("__cvta_generic_to_shared of an address that is not in shared memory");
  }
  return static_cast<uint32_t>(b - cuda::smem_raw);
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > state().device.max_smem_optin) return cudaErrorInvalidValue;
  state().max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

void launch_body(const void* kernel, dim3 grid, dim3 threads, int smem_bytes, const KernelBody& body) {
  State& s = state();
  TORCH_CHECK(!s.active, "fastattn cuda emulation: nested launch");
  TORCH_CHECK(threads.y == 1 && threads.z == 1 && threads.x % kWarp == 0 && threads.x > 0 && threads.x <= 1024,
              "fastattn cuda emulation: blocks of (n, 1, 1) threads with n a multiple of 32 only, got (", threads.x,
              ", ", threads.y, ", ", threads.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.y <= 65535 && grid.z <= 65535,
              "fastattn cuda emulation: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const auto attr = s.max_dynamic_smem.find(kernel);
  const int limit = attr == s.max_dynamic_smem.end() ? kDefaultSmemLimit : std::max(attr->second, kDefaultSmemLimit);
  TORCH_CHECK(smem_bytes <= limit, "fastattn cuda emulation (", s.device.name, "): launch with ", smem_bytes,
              " bytes of dynamic shared memory, but the kernel's limit is ", limit,
              " (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) not called or smaller); "
              "a GPU fails this launch with 'invalid argument'");
  s.active = true;
  s.failed = false;
  s.error.clear();
  s.body = &body;
  s.smem_bytes = smem_bytes;
  s.num_threads = static_cast<int>(threads.x);
  s.threads.resize(s.num_threads);
  s.warp_arrived.assign(s.num_threads / kWarp, 0);
  blockDim = threads;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z && !s.failed; ++z) {
    for (unsigned y = 0; y < grid.y && !s.failed; ++y) {
      for (unsigned x = 0; x < grid.x && !s.failed; ++x) {
        run_block(dim3(x, y, z));
        ++s.counters.blocks;
      }
    }
  }
  s.active = false;
  TORCH_CHECK(!s.failed, "fastattn cuda emulation (", s.device.name, "): ", s.error);
}

}  // namespace emu
}  // namespace fastattn

// ---------------------------------------------------------------------------
// The memory a launch may read with cp.async, from the call's own description.
// ---------------------------------------------------------------------------
#include "../flash_params.h"

namespace fastattn {
namespace emu {

void register_param_buffers(const cuda::AttnParams& p) {
  constexpr int64_t kElem = 2;  // fp16 / bf16
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows_q = varlen ? p.cu_seqlens_q[p.batch] : p.seqlen_q;
  const int64_t rows_k = varlen ? p.cu_seqlens_k[p.batch] : p.seqlen_k;
  const int64_t batch = varlen ? 1 : p.batch;
  // One past the last element of (batch, heads, rows, head_dim) with these strides.
  auto extent = [&](int64_t batch_stride, int64_t heads, int64_t head_stride, int64_t rows, int64_t row_stride) {
    if (batch == 0 || heads == 0 || rows == 0) return int64_t{0};
    return ((batch - 1) * batch_stride + (heads - 1) * head_stride + (rows - 1) * row_stride + p.head_dim) * kElem;
  };
  register_buffer(p.q, extent(p.q_batch_stride, p.num_heads_q, p.q_head_stride, rows_q, p.q_row_stride), "q");
  register_buffer(p.k, extent(p.k_batch_stride, p.num_heads_kv, p.k_head_stride, rows_k, p.k_row_stride), "k");
  register_buffer(p.v, extent(p.v_batch_stride, p.num_heads_kv, p.v_head_stride, rows_k, p.v_row_stride), "v");
  if (p.dout != nullptr) {
    register_buffer(p.dout, extent(p.do_batch_stride, p.num_heads_q, p.do_head_stride, rows_q, p.do_row_stride),
                    "dout");
  }
}

}  // namespace emu
}  // namespace fastattn

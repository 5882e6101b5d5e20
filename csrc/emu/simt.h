// SIMT emulator: CUDA kernel source compiled by g++ runs on the CPU, one fiber per CUDA thread, for tests.
//
// One OS thread per launch; the threads of a block are fibers (ucontext), blocks run one after another, so a run is
// deterministic. Emulated: __syncthreads (divergent barriers and deadlocks are reported with file:line), warp
// shuffles/votes/__syncwarp, mma.sync m16n8k16 (bf16 and fp16 in, fp32 accumulate) and ldmatrix x1/x2/x4 (+.trans)
// with the fragment layouts of the PTX ISA, cp.async with the copy deferred until cp.async.wait_group (the destination
// is poisoned at issue, so a missing wait reads garbage), and the math intrinsics the kernels use.
// Under -fsanitize=thread every fiber is a TSAN fiber and barriers are the only happens-before edges, so a missing
// __syncthreads is reported as a data race at its line; under -fsanitize=address fiber stacks are annotated.
// Kernels do not include this file: they include ptx.cuh; the emulated translation unit includes this first.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include <cuda_bf16.h>  // host-usable __nv_bfloat16 / __half and dim3 (CUDA headers only, no runtime)
#include <cuda_fp16.h>

#define LLADA_EMU 1
#undef __shared__
#define __shared__ static thread_local  // one block at a time per OS thread
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

#ifndef EMU_STACK_BYTES
#if defined(__SANITIZE_ADDRESS__)
#define EMU_STACK_BYTES (256 * 1024)  // ASan redzones make frames several times larger
#else
#define EMU_STACK_BYTES (64 * 1024)   // stacks are reused block after block; untouched pages cost nothing
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(const char*, int);
extern "C" void AnnotateIgnoreReadsEnd(const char*, int);
extern "C" void AnnotateIgnoreWritesBegin(const char*, int);
extern "C" void AnnotateIgnoreWritesEnd(const char*, int);
#define EMU_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

namespace emu {

#ifdef EMU_TSAN  // emulator bookkeeping is invisible to TSAN; only barriers create happens-before
struct Quiet {
  Quiet() { AnnotateIgnoreReadsBegin("", 0); AnnotateIgnoreWritesBegin("", 0); }
  ~Quiet() { AnnotateIgnoreWritesEnd("", 0); AnnotateIgnoreReadsEnd("", 0); }
};
inline void hb_release(void* a) { __tsan_release(a); }
inline void hb_acquire(void* a) { __tsan_acquire(a); }
#else
struct Quiet {  // user-provided ctor/dtor: no unused-variable warnings
  Quiet() {}
  ~Quiet() {}
};
inline void hb_release(void*) {}
inline void hb_acquire(void*) {}
#endif

struct AsyncCopy { void* dst; unsigned char data[16]; int bytes; };  // one cp.async: data captured at issue

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 tid;
  int lin = 0;
  bool done = false;
  void* tsan = nullptr;
  const unsigned long* wait_gen = nullptr;  // blocked until *wait_gen != wait_val (skipped by the scheduler)
  unsigned long wait_val = 0;
  const char* wait_file = nullptr;           // where it is blocked, for deadlock reports
  int wait_line = 0;
  std::vector<AsyncCopy> cp_open;                  // issued, not yet committed
  std::vector<std::vector<AsyncCopy>> cp_groups;   // committed groups, oldest first
};

struct Warp {
  unsigned waiting = 0;             // lanes parked at a warp collective
  unsigned wait_mask[32];           // the mask each parked lane passed
  unsigned long lane_gen[32] = {};  // bumped when the lane's collective completes (what a parked lane waits on)
  char lane_hb[32];                 // TSAN sync object per lane (__syncwarp)
  alignas(16) unsigned char slot[32][64];
  float A[16][16], B[16][8];        // mma operands, assembled once per mma by the lane that completes it
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Fiber> f;
  std::vector<Warp> w;
  ucontext_t sched;
  int nthreads = 0, bar_arrived = 0;
  unsigned long bar_gen = 0, events = 0;
  const char* bar_file = nullptr;  // call site of the first arrival at the open barrier
  int bar_line = 0;
  char hb[2], start_tok, end_tok;
  void* sched_tsan = nullptr;
  const void* sched_stack = nullptr;  // ASan: the scheduler's stack bounds, learned at the first switch
  size_t sched_stack_size = 0;
  std::vector<unsigned char> dyn_smem;
  std::function<void()> body;
};

inline thread_local Block* blk = nullptr;
inline thread_local Fiber* cur = nullptr;

[[noreturn]] inline void fail(const char* m, const char* file = nullptr, int line = 0) {
  std::fprintf(stderr, "simt_emu: %s", m);
  if (file) std::fprintf(stderr, " at %s:%d", file, line);
  if (blk)
    std::fprintf(stderr, " (block %u,%u,%u thread %u,%u,%u)", blk->bid.x, blk->bid.y, blk->bid.z,
                 cur ? cur->tid.x : 0u, cur ? cur->tid.y : 0u, cur ? cur->tid.z : 0u);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// Fiber -> scheduler. `gen` != null: the fiber stays parked until *gen changes (the scheduler does not resume it).
inline void yield(const unsigned long* gen = nullptr, unsigned long val = 0, const char* file = nullptr, int line = 0) {
  ucontext_t *from, *to;
  void* st;
  {
    Quiet q;
    cur->wait_gen = gen; cur->wait_val = val; cur->wait_file = file; cur->wait_line = line;
    from = &cur->ctx; to = &blk->sched; st = blk->sched_tsan;
  }
#ifdef EMU_TSAN
  __tsan_switch_to_fiber(st, __tsan_switch_to_fiber_no_sync);
#else
  (void)st;
#endif
#ifdef EMU_ASAN
  void* fake = nullptr;
  bool last = cur->done;  // a finished fiber never comes back: let ASan drop its fake stack
  __sanitizer_start_switch_fiber(last ? nullptr : &fake, blk->sched_stack, blk->sched_stack_size);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(from, to);
#endif
}

inline int lane() { Quiet q; return cur->lin & 31; }
inline Warp& warp() { Quiet q; return blk->w[cur->lin >> 5]; }

// Block barrier: release on arrival, acquire on departure (one sync object per generation parity).
inline void syncthreads(const char* file, int line) {
  Quiet q;
  Block* b = blk;
  unsigned long g = b->bar_gen;
  b->events++;
  if (b->bar_arrived == 0) { b->bar_file = file; b->bar_line = line; }
  else if (b->bar_line != line || std::strcmp(b->bar_file, file) != 0) {
    char m[512];
    std::snprintf(m, sizeof m, "divergent __syncthreads: threads wait at %s:%d and", b->bar_file, b->bar_line);
    fail(m, file, line);
  }
  hb_release(&b->hb[g & 1]);
  if (++b->bar_arrived == b->nthreads) { b->bar_arrived = 0; b->bar_gen++; }
  else yield(&b->bar_gen, g, file, line);
  hb_acquire(&b->hb[g & 1]);
}

// Warp rendezvous of the lanes in `mask`: completes when every lane of mask waits here with the same mask, so
// disjoint subsets of a warp may run collectives at the same time (as on sm_70+). `on_complete` runs once, in the
// last lane to arrive, before anyone leaves. memory_order: __syncwarp semantics (a happens-before edge).
template <class F>
inline void warp_sync(unsigned mask, bool memory_order, const char* file, int line, F&& on_complete) {
  Quiet q;
  const int l = lane();
  if (!(mask >> l & 1u)) fail("warp op called by a lane not in its mask", file, line);
  Warp& w = warp();
  const int base = cur->lin & ~31;
  for (int i = 0; i < 32; ++i)
    if ((mask >> i & 1u) && base + i >= blk->nthreads) fail("warp op mask names a lane past the end of the block", file, line);
  blk->events++;
  if (memory_order) hb_release(&w.lane_hb[l]);
  w.waiting |= 1u << l;
  w.wait_mask[l] = mask;
  bool complete = (w.waiting & mask) == mask;
  for (int i = 0; complete && i < 32; ++i) if (mask >> i & 1u) complete = w.wait_mask[i] == mask;
  if (complete) {
    on_complete();
    w.waiting &= ~mask;
    for (int i = 0; i < 32; ++i) if (mask >> i & 1u) w.lane_gen[i]++;
  } else {
    const unsigned long g = w.lane_gen[l];
    yield(&w.lane_gen[l], g, file, line);
  }
  if (memory_order) for (int i = 0; i < 32; ++i) if (mask >> i & 1u) hb_acquire(&w.lane_hb[i]);
}
inline void warp_sync(unsigned mask, bool memory_order = false, const char* file = "warp collective", int line = 0) {
  warp_sync(mask, memory_order, file, line, [] {});
}

// Two-phase exchange: every lane in mask publishes, then reads lane `src`.
template <class T>
T exch(unsigned mask, const T& v, int src) {
  static_assert(sizeof(T) <= 64, "too large");
  Quiet q;
  Warp& w = warp();
  std::memcpy(w.slot[lane()], &v, sizeof(T));
  warp_sync(mask);
  if (!(mask >> src & 1u)) fail("shuffle reads a lane that is not in the mask");
  T r;
  std::memcpy(&r, w.slot[src], sizeof(T));
  warp_sync(mask);
  return r;
}

// ---- cp.async: data is read at issue (so ASan sees a bad source at its line), written at wait_group ------------------
// Fixed-size copies compile to plain loads/stores, which the sanitizers instrument in the calling fiber (a libc
// memset/memcpy call is not reliably attributed to the fiber by TSAN).
inline void copy_small(void* dst, const void* src, int bytes) {
  switch (bytes) {
    case 4: std::memcpy(dst, src, 4); break;
    case 8: std::memcpy(dst, src, 8); break;
    case 16: std::memcpy(dst, src, 8); std::memcpy(static_cast<char*>(dst) + 8, static_cast<const char*>(src) + 8, 8); break;
    default: fail("cp.async: bad size");
  }
}
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async size must be 4, 8 or 16");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes))
    fail("cp.async address not aligned to its size");
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async src-size out of range");
  AsyncCopy c;
  c.dst = dst; c.bytes = bytes;
  std::memset(c.data, 0, sizeof c.data);  // bytes past src-size are zero-filled, as the ISA says
  if (src_bytes == bytes) copy_small(c.data, src, bytes);
  else for (int i = 0; i < src_bytes; ++i) c.data[i] = static_cast<const unsigned char*>(src)[i];
  static const unsigned char poison[16] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                                           0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
  copy_small(dst, poison, bytes);  // contents are undefined until the wait: poison (a NaN pattern for bf16/fp16/fp32)
  Quiet q;
  cur->cp_open.push_back(c);
}
inline void cp_async_commit() { Quiet q; cur->cp_groups.emplace_back(std::move(cur->cp_open)); cur->cp_open.clear(); }
inline void cp_async_wait(int n) {  // completes every committed group but the newest n
  std::vector<std::vector<AsyncCopy>> done;
  {
    Quiet q;
    int keep = std::max(0, n);
    while ((int)cur->cp_groups.size() > keep) {
      done.emplace_back(std::move(cur->cp_groups.front()));
      cur->cp_groups.erase(cur->cp_groups.begin());
    }
  }
  for (auto& g : done) for (auto& c : g) copy_small(c.dst, c.data, c.bytes);  // visible to TSAN as this fiber's writes
}
inline void cp_async_wait_all() { cp_async_commit(); cp_async_wait(0); }

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 (PTX ISA 9.7.14.5.15) -----------------------------------
// Lanes 8i..8i+7 give the row addresses of matrix i (16 contiguous bytes each, 16-byte aligned). Lane l receives, for
// matrix i, register r[i] = elements (row l/4, cols 2*(l%4), 2*(l%4)+1); with .trans the matrix is transposed first,
// i.e. elements (rows 2*(l%4), 2*(l%4)+1; col l/4).
inline void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr) {
  const unsigned char* rows[32];
  int l;
  {
    Quiet q;
    Warp& w = warp();
    l = lane();
    const void* mine = row_addr;
    std::memcpy(w.slot[l], &mine, sizeof mine);
    warp_sync(0xffffffffu, false, "ldmatrix");
    for (int i = 0; i < 8 * num; ++i) {
      std::memcpy(&rows[i], w.slot[i], sizeof rows[i]);
      if (reinterpret_cast<uintptr_t>(rows[i]) % 16) fail("ldmatrix row address not 16-byte aligned");
    }
    warp_sync(0xffffffffu, false, "ldmatrix");
  }
  for (int m = 0; m < num; ++m) {  // the shared-memory reads themselves are visible to TSAN (outside Quiet)
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int row = trans ? 2 * (l % 4) + h : l / 4;
      const int col = trans ? l / 4 : 2 * (l % 4) + h;
      std::memcpy(&e[h], rows[8 * m + row] + 2 * col, 2);
    }
    r[m] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
  }
}

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA 9.7.14.5.8) ---------------------------
// groupID g = lane>>2, threadID_in_group t = lane%4; element i of a fragment is bits 16*(i&1) of register i>>1.
//   A (16x16, 8 elems): row = g for i in {0,1,4,5}, else g+8;  col = 2t + (i&1), plus 8 for i >= 4
//   B (16x8, 4 elems):  row = 2t + (i&1), plus 8 for i >= 2;   col = g
//   C/D (16x8, 4 fp32): row = g for i < 2, else g+8;            col = 2t + (i&1)
inline float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  __half_raw raw; raw.x = h; return __half2float(__half(raw));
}
inline int mma_a_row(int lane, int i) { return (lane >> 2) + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0); }
inline int mma_a_col(int lane, int i) { return (lane & 3) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
inline int mma_b_row(int lane, int i) { return (lane & 3) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
inline int mma_b_col(int lane, int) { return lane >> 2; }
inline int mma_c_row(int lane, int i) { return (lane >> 2) + (i >= 2 ? 8 : 0); }
inline int mma_c_col(int lane, int i) { return (lane & 3) * 2 + (i & 1); }

inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], bool bf16) {
  struct P { uint32_t a[4], b[2]; } p;
  std::memcpy(p.a, a, 16); std::memcpy(p.b, b, 8);
  float cin[4]; std::memcpy(cin, c, 16);  // d may alias c
  Quiet q;
  Warp& w = warp();
  int l = lane();
  std::memcpy(w.slot[l], &p, sizeof p);
  warp_sync(0xffffffffu, false, "mma.sync", 0, [&w, bf16] {
    for (int s = 0; s < 32; ++s) {
      P x; std::memcpy(&x, w.slot[s], sizeof x);
      for (int i = 0; i < 8; ++i)
        w.A[mma_a_row(s, i)][mma_a_col(s, i)] = half_bits_to_float(uint16_t(x.a[i >> 1] >> (16 * (i & 1))), bf16);
      for (int i = 0; i < 4; ++i)
        w.B[mma_b_row(s, i)][mma_b_col(s, i)] = half_bits_to_float(uint16_t(x.b[i >> 1] >> (16 * (i & 1))), bf16);
    }
  });
  float out[4];
  for (int i = 0; i < 4; ++i) {
    int r = mma_c_row(l, i), col = mma_c_col(l, i);
    float s = 0.f;  // products of 16-bit floats are exact in fp32
    for (int k = 0; k < 16; ++k) s += w.A[r][k] * w.B[k][col];
    out[i] = s + cin[i];
  }
  warp_sync(0xffffffffu, false, "mma.sync");  // nobody overwrites the slots before every lane has read A and B
  std::memcpy(d, out, 16);
}

// ---- scheduler ------------------------------------------------------------------------------------------------------
inline void trampoline() {
  Block* b;
  { Quiet q; b = blk; }
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack, &b->sched_stack_size);
#endif
  hb_acquire(&b->start_tok);
  b->body();
  cp_async_wait_all();  // a kernel may exit with copies in flight; they land before the block retires
  hb_release(&b->end_tok);
  { Quiet q; cur->done = true; b->events++; }
  yield();
}

inline void report_deadlock(Block& b) {
  std::fprintf(stderr, "simt_emu: deadlock in block %u,%u,%u: no thread can make progress. Waiting threads:\n",
               b.bid.x, b.bid.y, b.bid.z);
  int shown = 0;
  for (Fiber& f : b.f)
    if (!f.done && shown++ < 16)
      std::fprintf(stderr, "  thread %u,%u,%u (warp %d lane %d) at %s:%d\n", f.tid.x, f.tid.y, f.tid.z, f.lin >> 5,
                   f.lin & 31, f.wait_file ? f.wait_file : "?", f.wait_line);
  int exited = 0;
  for (Fiber& f : b.f) exited += f.done;
  std::fprintf(stderr, "  (%d threads exited)\n", exited);
  cur = nullptr;
  fail("deadlock: a barrier or warp collective can never complete");
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"  // swapcontext returns twice; loop state lives in Block
template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t dyn_smem, A... args) {
  Block b;
  b.gdim = grid; b.bdim = block;
  b.nthreads = block.x * block.y * block.z;
  if (b.nthreads < 1 || b.nthreads > 1024) { std::fprintf(stderr, "simt_emu: bad block size %d\n", b.nthreads); std::abort(); }
  if (dyn_smem > 227 * 1024) { std::fprintf(stderr, "simt_emu: %zu bytes of dynamic shared memory\n", dyn_smem); std::abort(); }
  Quiet quiet_scheduler;  // the scheduler's own bookkeeping is not checked
  b.body = [&] { kernel(args...); };
  Block* saved = blk;
  blk = &b;
  const size_t kStack = EMU_STACK_BYTES;
  std::unique_ptr<char[]> stacks(new char[kStack * b.nthreads]);  // uninitialised, reused block after block
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.bid = dim3(bx, by, bz);
        b.f.assign(b.nthreads, Fiber{});
        b.w.assign((b.nthreads + 31) / 32, Warp{});
        b.bar_arrived = 0; b.bar_gen = 0;
        b.dyn_smem.assign(dyn_smem, 0xFF);  // poison: shared memory starts undefined in every block
        for (int i = 0; i < b.nthreads; ++i) {
          Fiber& f = b.f[i];
          f.lin = i;
          f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.stack = stacks.get() + kStack * i;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack; f.ctx.uc_stack.ss_size = kStack; f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, trampoline, 0);
        }
#ifdef EMU_TSAN
        b.sched_tsan = __tsan_get_current_fiber();
        for (Fiber& f : b.f) f.tsan = __tsan_create_fiber(0);
#endif
        hb_release(&b.start_tok);
        for (int live = b.nthreads; live > 0;) {
          unsigned long before = b.events;
          live = 0;
          for (Fiber& f : b.f) {
            if (f.done) continue;
            if (f.wait_gen && *f.wait_gen == f.wait_val) { ++live; continue; }  // still parked
            cur = &f;
#ifdef EMU_TSAN
            __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef EMU_ASAN
            void* fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, f.stack, kStack);
            swapcontext(&b.sched, &f.ctx);
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
            swapcontext(&b.sched, &f.ctx);
#endif
            cur = nullptr;
            live += !f.done;
          }
          if (live && b.bar_arrived && b.bar_arrived + (b.nthreads - live) == b.nthreads) {
            cur = nullptr;
            fail("divergent __syncthreads: reached by only part of the block (the others exited)", b.bar_file,
                 b.bar_line);
          }
          if (live && b.events == before) report_deadlock(b);
        }
        hb_acquire(&b.end_tok);
#ifdef EMU_TSAN
        for (Fiber& f : b.f) __tsan_destroy_fiber(f.tsan);
#endif
      }
  blk = saved;
}
#pragma GCC diagnostic pop

inline dim3 tid() { Quiet q; return cur->tid; }
inline Block* B() { Quiet q; return blk; }

}  // namespace emu

// ---- the CUDA names kernels use -------------------------------------------------------------------------------------
#define threadIdx (emu::tid())
#define blockIdx (emu::B()->bid)
#define blockDim (emu::B()->bdim)
#define gridDim (emu::B()->gdim)
#define EMU_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::B()->dyn_smem.data())
static constexpr int warpSize = 32;
#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned m = 0xffffffffu) { emu::warp_sync(m, true, "__syncwarp"); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline unsigned __activemask() {
  emu::Quiet q;
  unsigned m = 0;
  int base = emu::cur->lin & ~31;
  for (int i = 0; i < 32 && base + i < emu::blk->nthreads; ++i) m |= unsigned(!emu::blk->f[base + i].done) << i;
  return m;
}
template <class T> T __shfl_sync(unsigned m, T v, int s, int w = 32) {
  int l = emu::lane();
  return emu::exch(m, v, (l & ~(w - 1)) + (s & (w - 1)));
}
template <class T> T __shfl_xor_sync(unsigned m, T v, int x, int w = 32) {
  int l = emu::lane(), s = l ^ x;
  return emu::exch(m, v, ((s & ~(w - 1)) == (l & ~(w - 1))) ? s : l);
}
template <class T> T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
  int l = emu::lane(), s = l + int(d);
  return emu::exch(m, v, (s & ~(w - 1)) == (l & ~(w - 1)) ? s : l);
}
template <class T> T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
  int l = emu::lane(), s = l - int(d);
  return emu::exch(m, v, s >= (l & ~(w - 1)) ? s : l);
}
inline unsigned __ballot_sync(unsigned m, int p) {
  emu::Quiet q;
  emu::Warp& w = emu::warp();
  w.slot[emu::lane()][0] = p != 0;
  emu::warp_sync(m, false, "__ballot_sync");
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) if (m >> i & 1u) r |= unsigned(w.slot[i][0]) << i;
  emu::warp_sync(m, false, "__ballot_sync");
  return r;
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, p) == m; }

// math intrinsics (fast-math variants are computed exactly; kernels' tolerances must cover the hardware's error)
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
template <class T> T __ldg(const T* p) { return *p; }
// atomics: fibers are never preempted, so a plain read-modify-write is atomic (and invisible to TSAN, like hardware)
template <class T> T atomicAdd(T* p, T v) { emu::Quiet q; T o = *p; *p = o + v; return o; }
template <class T> T atomicMax(T* p, T v) { emu::Quiet q; T o = *p; *p = o > v ? o : v; return o; }
template <class T> T atomicMin(T* p, T v) { emu::Quiet q; T o = *p; *p = o < v ? o : v; return o; }
template <class T> T atomicExch(T* p, T v) { emu::Quiet q; T o = *p; *p = v; return o; }
template <class T> T atomicCAS(T* p, T cmp, T v) { emu::Quiet q; T o = *p; if (o == cmp) *p = v; return o; }

// Kernel-side wrappers for tensor-core and async-copy instructions: inline PTX under nvcc, the SIMT emulator under g++.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LLADA_DEVICE __device__ __forceinline__
// dynamic shared memory as T*; one extern symbol for every kernel (its element type must not differ between kernels)
#define LLADA_DYN_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char llada_dyn_smem[]; \
  T* name = reinterpret_cast<T*>(llada_dyn_smem)
#else
#include "emu/simt.h"
#define LLADA_DEVICE inline
#define LLADA_DYN_SMEM(T, name) EMU_DYN_SMEM(T, name)
#endif

namespace llada::ptx {

// A shared-memory address as the instructions take it: a 32-bit shared-window address on the GPU, a plain pointer
// value under the emulator. Byte offsets may be added to it.
#if defined(__CUDACC__)
using smem_t = uint32_t;
LLADA_DEVICE smem_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
#else
using smem_t = uintptr_t;
LLADA_DEVICE smem_t smem_addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }
#endif

template <class T> struct is_bf16 { static constexpr bool value = false; };
template <> struct is_bf16<__nv_bfloat16> { static constexpr bool value = true; };

// D = A * B + C, m16n8k16, A row-major 16x16, B column-major 16x8, fp32 accumulators; T = __nv_bfloat16 or __half.
// Fragments (PTX ISA "Matrix Fragments for mma.m16n8k16"): a[4] and b[2] hold two 16-bit elements each, c/d four fp32.
template <class T>
LLADA_DEVICE void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#if defined(__CUDACC__)
  if constexpr (is_bf16<T>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#else
  emu::mma_m16n8k16(d, a, b, c, is_bf16<T>::value);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lane 8i+j passes the address of row j of matrix i.
LLADA_DEVICE void ldmatrix_x1(uint32_t r[1], smem_t addr) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
#else
  emu::ldmatrix(r, 1, false, reinterpret_cast<const void*>(addr));
#endif
}
LLADA_DEVICE void ldmatrix_x2(uint32_t r[2], smem_t addr) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#else
  emu::ldmatrix(r, 2, false, reinterpret_cast<const void*>(addr));
#endif
}
LLADA_DEVICE void ldmatrix_x4(uint32_t r[4], smem_t addr) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
  emu::ldmatrix(r, 4, false, reinterpret_cast<const void*>(addr));
#endif
}
LLADA_DEVICE void ldmatrix_x1_trans(uint32_t r[1], smem_t addr) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
#else
  emu::ldmatrix(r, 1, true, reinterpret_cast<const void*>(addr));
#endif
}
LLADA_DEVICE void ldmatrix_x2_trans(uint32_t r[2], smem_t addr) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#else
  emu::ldmatrix(r, 2, true, reinterpret_cast<const void*>(addr));
#endif
}
LLADA_DEVICE void ldmatrix_x4_trans(uint32_t r[4], smem_t addr) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
  emu::ldmatrix(r, 4, true, reinterpret_cast<const void*>(addr));
#endif
}

// cp.async.cg.shared.global, 16 bytes (L2 only). pred false: nothing is read and the 16 bytes are zero-filled.
// The data is guaranteed in shared memory only after cp_async_wait<N>() retires its group (and, for other threads,
// after a __syncthreads).
LLADA_DEVICE void cp_async_16(smem_t dst, const void* src, bool pred = true) {
#if defined(__CUDACC__)
  int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#else
  emu::cp_async(reinterpret_cast<void*>(dst), src, 16, pred ? 16 : 0);
#endif
}
// cp.async.ca.shared.global (L1 and L2), 16 bytes, same contract.
LLADA_DEVICE void cp_async_ca_16(smem_t dst, const void* src, bool pred = true) {
#if defined(__CUDACC__)
  int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
#else
  emu::cp_async(reinterpret_cast<void*>(dst), src, 16, pred ? 16 : 0);
#endif
}
LLADA_DEVICE void cp_async_commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  emu::cp_async_commit();
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
LLADA_DEVICE void cp_async_wait() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#else
  emu::cp_async_wait(N);
#endif
}
LLADA_DEVICE void cp_async_wait_all() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_all;\n" ::);
#else
  emu::cp_async_wait_all();
#endif
}

// Two floats rounded to T and packed as one 32-bit register, `lo` in the low half (the fragment element order).
template <class T>
LLADA_DEVICE uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (is_bf16<T>::value) {
    __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&r, &x, 4);
  } else {
    __half2 x = __floats2half2_rn(lo, hi);
    std::memcpy(&r, &x, 4);
  }
  return r;
}

// One float rounded to T (round to nearest even).
template <class T>
LLADA_DEVICE T from_float(float x) {
  if constexpr (is_bf16<T>::value) return __float2bfloat16(x);
  else return __float2half(x);
}

}  // namespace llada::ptx

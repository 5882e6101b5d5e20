// Fragment-layout probe: the same source runs on a GPU (nvcc) and under the SIMT emulator (g++ -x c++); both print
// what mma.sync and ldmatrix hand to each lane, and tests/test_emu.py requires the two printouts to be identical.
// Inputs carry their own coordinates: tile element (row, col) = row*16 + col, and mma operands are small integers, so
// every printed value is exact and any layout difference shows up as a differing line.
#include "ptx.cuh"

#include <cstdio>
#include <vector>

using namespace llada;

struct ProbeIn {
  uint16_t tile[256];      // 16x16 b16 tile, element = row*16 + col
  uint32_t a[32][4];       // mma A registers per lane (raw), built from the same tile
  uint32_t b[32][2];       // mma B registers per lane (raw)
  float c[32][4];
};
struct ProbeOut {
  uint32_t ld[6][32][4];   // ldmatrix x1, x2, x4, x1.trans, x2.trans, x4.trans
  float d[2][32][4];       // mma bf16, f16
};

template <class T>
__device__ void probe_mma(const ProbeIn* in, float* d, int l) {
  float out[4];
  ptx::mma_m16n8k16<T>(out, in->a[l], in->b[l], in->c[l]);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

template <bool kBf16>
__global__ void probe_kernel(const ProbeIn* in, ProbeOut* out) {
  __shared__ __align__(16) uint16_t s[256];
  const int l = threadIdx.x;
  for (int i = l; i < 256; i += 32) s[i] = in->tile[i];
  __syncwarp();
  // lane 8i+j addresses row j of matrix i = (rows 8*(i%2).., cols 8*(i/2)..) of the tile
  const ptx::smem_t a = ptx::smem_addr(s + (8 * ((l / 8) % 2) + l % 8) * 16 + 8 * ((l / 16) % 2));
  uint32_t r[4];
  r[0] = r[1] = r[2] = r[3] = 0; ptx::ldmatrix_x1(r, a); for (int i = 0; i < 4; ++i) out->ld[0][l][i] = r[i];
  r[0] = r[1] = r[2] = r[3] = 0; ptx::ldmatrix_x2(r, a); for (int i = 0; i < 4; ++i) out->ld[1][l][i] = r[i];
  r[0] = r[1] = r[2] = r[3] = 0; ptx::ldmatrix_x4(r, a); for (int i = 0; i < 4; ++i) out->ld[2][l][i] = r[i];
  r[0] = r[1] = r[2] = r[3] = 0; ptx::ldmatrix_x1_trans(r, a); for (int i = 0; i < 4; ++i) out->ld[3][l][i] = r[i];
  r[0] = r[1] = r[2] = r[3] = 0; ptx::ldmatrix_x2_trans(r, a); for (int i = 0; i < 4; ++i) out->ld[4][l][i] = r[i];
  r[0] = r[1] = r[2] = r[3] = 0; ptx::ldmatrix_x4_trans(r, a); for (int i = 0; i < 4; ++i) out->ld[5][l][i] = r[i];
  if (kBf16) probe_mma<__nv_bfloat16>(in, out->d[0][l], l);
  else probe_mma<__half>(in, out->d[1][l], l);
}

static uint16_t to_bits(float x, bool bf16) {
  uint16_t u;
  if (bf16) { __nv_bfloat16 h = __float2bfloat16(x); memcpy(&u, &h, 2); }
  else { __half h = __float2half(x); memcpy(&u, &h, 2); }
  return u;
}

int main() {
  ProbeIn in;
  ProbeOut out;
  memset(&in, 0, sizeof in);
  memset(&out, 0, sizeof out);
  for (int i = 0; i < 256; ++i) in.tile[i] = uint16_t(i);
  for (int pass = 0; pass < 2; ++pass) {
    const bool bf16 = pass == 0;
    // register element e of lane l holds value (l*8 + e) % 251 for A, (l*4 + e) % 5 - 2 for B, lane - 16 for C:
    // nothing about the layout is assumed here; the two printouts are compared
    for (int l = 0; l < 32; ++l) {
      for (int e = 0; e < 8; ++e) {
        uint32_t& reg = in.a[l][e / 2];
        if (e % 2 == 0) reg = 0;
        reg |= uint32_t(to_bits(float((l * 8 + e) % 251), bf16)) << (16 * (e % 2));
      }
      for (int e = 0; e < 4; ++e) {
        uint32_t& reg = in.b[l][e / 2];
        if (e % 2 == 0) reg = 0;
        reg |= uint32_t(to_bits(float((l * 4 + e) % 5 - 2), bf16)) << (16 * (e % 2));
      }
      for (int e = 0; e < 4; ++e) in.c[l][e] = float(l - 16);
    }
#if defined(__CUDACC__)
    ProbeIn* din; ProbeOut* dout;
    cudaMalloc(&din, sizeof in); cudaMalloc(&dout, sizeof out);
    cudaMemcpy(din, &in, sizeof in, cudaMemcpyHostToDevice);
    cudaMemcpy(dout, &out, sizeof out, cudaMemcpyHostToDevice);
    if (bf16) probe_kernel<true><<<1, 32>>>(din, dout); else probe_kernel<false><<<1, 32>>>(din, dout);
    cudaError_t e = cudaMemcpy(&out, dout, sizeof out, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) { fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e)); return 2; }
    cudaFree(din); cudaFree(dout);
#else
    if (bf16) emu::launch(probe_kernel<true>, dim3(1), dim3(32), 0, &in, &out);
    else emu::launch(probe_kernel<false>, dim3(1), dim3(32), 0, &in, &out);
#endif
  }
  const char* names[6] = {"x1", "x2", "x4", "x1.trans", "x2.trans", "x4.trans"};
  for (int k = 0; k < 6; ++k)
    for (int l = 0; l < 32; ++l)
      printf("ldmatrix.%s lane %2d: %08x %08x %08x %08x\n", names[k], l, out.ld[k][l][0], out.ld[k][l][1],
             out.ld[k][l][2], out.ld[k][l][3]);
  for (int k = 0; k < 2; ++k)
    for (int l = 0; l < 32; ++l)
      printf("mma.%s lane %2d: %g %g %g %g\n", k ? "f16" : "bf16", l, out.d[k][l][0], out.d[k][l][1], out.d[k][l][2],
             out.d[k][l][3]);
  return 0;
}

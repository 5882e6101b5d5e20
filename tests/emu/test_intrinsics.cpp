// The emulated intrinsics (csrc/ptx.cuh under g++) against tables written out from the PTX ISA, not from simt.h.
// Usage: test_intrinsics            -> every check; exit status 0 when all pass
//        test_intrinsics divergent  -> a __syncthreads inside a branch taken by half the block (must abort, reported)
//        test_intrinsics exited     -> a __syncthreads after half the block returned (must abort, reported)
//        test_intrinsics deadlock   -> a full-warp shuffle that half the warp never reaches (must abort, reported)
#include "ptx.cuh"

#include <random>
#include <string>

using namespace llada;

namespace {

int failures = 0;
#define EXPECT(cond, ...)                                    \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);       \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
    }                                                        \
  } while (0)

uint16_t bits_of(float x, bool bf16) {
  uint16_t u;
  if (bf16) { __nv_bfloat16 h = __float2bfloat16(x); std::memcpy(&u, &h, 2); }
  else { __half h = __float2half(x); std::memcpy(&u, &h, 2); }
  return u;
}

// ---- PTX ISA 9.7.14.5.8, mma.m16n8k16 .f16/.bf16, written as (row, col) offsets from (groupID, 2*threadID_in_group)
// A: a0 a1 | a2 a3 | a4 a5 | a6 a7  (register 0 | 1 | 2 | 3)
const int kA[8][2] = {{0, 0}, {0, 1}, {8, 0}, {8, 1}, {0, 8}, {0, 9}, {8, 8}, {8, 9}};
// B (row = k, col = n): b0 b1 | b2 b3 at (k = 2*tig + {0, 1, 8, 9}, n = groupID)
const int kBk[4] = {0, 1, 8, 9};
// C/D: c0 c1 | c2 c3 at (row = groupID + {0, 0, 8, 8}, col = 2*tig + {0, 1, 0, 1})
const int kC[4][2] = {{0, 0}, {0, 1}, {8, 0}, {8, 1}};

struct MmaIn { uint32_t a[32][4], b[32][2]; float c[32][4]; };

template <class T>
__global__ void mma_kernel(const MmaIn* in, float* d) {
  const int l = threadIdx.x;
  float out[4];
  ptx::mma_m16n8k16<T>(out, in->a[l], in->b[l], in->c[l]);
  for (int i = 0; i < 4; ++i) d[l * 4 + i] = out[i];
}

template <class T>
void check_mma(bool bf16, uint32_t seed, bool codes) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-4, 4);
  float A[16][16], Bm[16][8], C[16][8];
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) A[r][c] = codes ? float(r * 16 + c) : float(small(rng));
  for (int k = 0; k < 16; ++k) for (int n = 0; n < 8; ++n) Bm[k][n] = float(small(rng));
  for (int r = 0; r < 16; ++r) for (int n = 0; n < 8; ++n) C[r][n] = float(small(rng));
  MmaIn in{};
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, tig = l % 4;
    for (int i = 0; i < 8; ++i) {
      uint16_t u = bits_of(A[g + kA[i][0]][2 * tig + kA[i][1]], bf16);
      in.a[l][i / 2] |= uint32_t(u) << (16 * (i % 2));
    }
    for (int i = 0; i < 4; ++i) {
      uint16_t u = bits_of(Bm[2 * tig + kBk[i]][g], bf16);
      in.b[l][i / 2] |= uint32_t(u) << (16 * (i % 2));
    }
    for (int i = 0; i < 4; ++i) in.c[l][i] = C[g + kC[i][0]][2 * tig + kC[i][1]];
  }
  std::vector<float> d(128);
  emu::launch(mma_kernel<T>, dim3(1), dim3(32), 0, &in, d.data());
  int bad = 0;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const int r = l / 4 + kC[i][0], n = 2 * (l % 4) + kC[i][1];
      float ref = C[r][n];
      for (int k = 0; k < 16; ++k) ref += A[r][k] * Bm[k][n];  // small integers: exact in fp32
      if (d[l * 4 + i] != ref && bad++ < 4)
        EXPECT(false, "mma %s lane %d d%d (row %d col %d): got %g want %g", bf16 ? "bf16" : "f16", l, i, r, n,
               d[l * 4 + i], ref);
    }
  std::printf("mma.m16n8k16 %s (%s): %s\n", bf16 ? "bf16" : "f16", codes ? "A = row*16+col" : "random", bad ? "FAIL" : "ok");
}

// ---- PTX ISA 9.7.14.5.15 ldmatrix: lane 8i+j gives row j of matrix i; lane l receives from matrix i the pair
// (row l/4, cols 2(l%4), 2(l%4)+1), or with .trans the pair (rows 2(l%4), 2(l%4)+1; col l/4).
template <int kNum, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* tile, const int* row_perm, uint32_t* out) {
  __shared__ __align__(16) uint16_t s[16 * 16];
  const int l = threadIdx.x;
  for (int i = l; i < 256; i += 32) s[i] = tile[i];
  __syncwarp();
  // matrix i = (tile rows 8*(i%2).., cols 8*(i/2)..); its row j is tile row row_perm[8*(i%2) + j]
  const int m = (l / 8) % kNum, j = l % 8;
  const uint16_t* row = s + row_perm[8 * (m % 2) + j] * 16 + 8 * (m / 2);
  uint32_t r[4] = {0, 0, 0, 0};
  const ptx::smem_t a = ptx::smem_addr(row);
  if (kNum == 1) { if (kTrans) ptx::ldmatrix_x1_trans(r, a); else ptx::ldmatrix_x1(r, a); }
  if (kNum == 2) { if (kTrans) ptx::ldmatrix_x2_trans(r, a); else ptx::ldmatrix_x2(r, a); }
  if (kNum == 4) { if (kTrans) ptx::ldmatrix_x4_trans(r, a); else ptx::ldmatrix_x4(r, a); }
  for (int i = 0; i < 4; ++i) out[l * 4 + i] = r[i];
}

template <int kNum, bool kTrans>
void check_ldmatrix() {
  uint16_t tile[256];
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c) tile[r * 16 + c] = uint16_t(r * 16 + c);
  int perm[16];
  for (int i = 0; i < 16; ++i) perm[i] = (i * 5 + 3) % 16;  // rows in a scrambled order: addresses are per lane
  std::vector<uint32_t> out(128);
  emu::launch(ldmatrix_kernel<kNum, kTrans>, dim3(1), dim3(32), 0, tile, perm, out.data());
  int bad = 0;
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < kNum; ++m) {
      uint16_t want[2];
      for (int h = 0; h < 2; ++h) {
        const int mr = kTrans ? 2 * (l % 4) + h : l / 4;  // row, col inside the 8x8 matrix
        const int mc = kTrans ? l / 4 : 2 * (l % 4) + h;
        want[h] = tile[perm[8 * (m % 2) + mr] * 16 + 8 * (m / 2) + mc];
      }
      const uint32_t w = uint32_t(want[0]) | (uint32_t(want[1]) << 16);
      if (out[l * 4 + m] != w && bad++ < 4)
        EXPECT(false, "ldmatrix x%d%s lane %d r%d: got %08x want %08x", kNum, kTrans ? ".trans" : "", l, m,
               out[l * 4 + m], w);
    }
  std::printf("ldmatrix x%d%s: %s\n", kNum, kTrans ? ".trans" : "", bad ? "FAIL" : "ok");
}

// ---- cp.async: nothing lands before its group is waited for; wait_group N leaves the newest N groups in flight ----
__global__ void cp_async_kernel(const uint32_t* src, uint32_t* seen) {
  __shared__ __align__(16) uint32_t s[3][4];
  const int l = threadIdx.x;  // one thread
  for (int i = 0; i < 12; ++i) s[i / 4][i % 4] = 7u;
  ptx::cp_async_16(ptx::smem_addr(s[0]), src);
  ptx::cp_async_commit();
  ptx::cp_async_16(ptx::smem_addr(s[1]), src + 4);
  ptx::cp_async_16(ptx::smem_addr(s[2]), src + 8, /*pred=*/false);  // zero-fill
  ptx::cp_async_commit();
  seen[0] = s[0][0]; seen[1] = s[1][0];  // before any wait: undefined (poisoned), never the source
  ptx::cp_async_wait<1>();
  seen[2] = s[0][0]; seen[3] = s[1][0];  // group 0 landed, group 1 still in flight
  ptx::cp_async_wait<0>();
  seen[4] = s[1][3]; seen[5] = s[2][0] | s[2][1] | s[2][2] | s[2][3];
  ptx::cp_async_16(ptx::smem_addr(s[0]), src + 4);
  seen[6] = s[0][1];
  ptx::cp_async_wait_all();  // also completes a group that was never committed
  seen[7] = s[0][1];
  (void)l;
}

void check_cp_async() {
  uint32_t src[12];
  for (int i = 0; i < 12; ++i) src[i] = 100u + i;
  uint32_t seen[8];
  emu::launch(cp_async_kernel, dim3(1), dim3(1), 0, src, seen);
  int before = failures;
  EXPECT(seen[0] != src[0] && seen[0] != 7u, "cp.async data visible before wait_group: %u", seen[0]);
  EXPECT(seen[1] != src[4] && seen[1] != 7u, "cp.async data visible before wait_group: %u", seen[1]);
  EXPECT(seen[2] == src[0], "wait_group 1 did not complete the older group: %u", seen[2]);
  EXPECT(seen[3] != src[4], "wait_group 1 completed the newest group: %u", seen[3]);
  EXPECT(seen[4] == src[7], "wait_group 0 did not complete every group: %u", seen[4]);
  EXPECT(seen[5] == 0u, "cp.async with pred=false did not zero-fill: %u", seen[5]);
  EXPECT(seen[6] != src[5], "uncommitted cp.async visible before wait_all: %u", seen[6]);
  EXPECT(seen[7] == src[5], "wait_all did not complete an uncommitted copy: %u", seen[7]);
  std::printf("cp.async deferred semantics: %s\n", failures == before ? "ok" : "FAIL");
}

// ---- shuffles, votes, __syncwarp ------------------------------------------------------------------------------------
__global__ void warp_kernel(int* out) {
  const int l = threadIdx.x & 31, w = threadIdx.x >> 5;
  int* o = out + threadIdx.x * 12;
  const int x = 100 * w + l;
  o[0] = __shfl_sync(0xffffffffu, x, (l * 7) % 32);
  o[1] = __shfl_sync(0xffffffffu, x, 3, 8);  // lane 3 of each 8-lane segment
  o[2] = __shfl_xor_sync(0xffffffffu, x, 5);
  o[3] = __shfl_up_sync(0xffffffffu, x, 3);  // lanes < 3 keep their own value
  o[4] = __shfl_down_sync(0xffffffffu, x, 3, 16);  // lanes past the segment end keep theirs
  o[5] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
  o[6] = __any_sync(0xffffffffu, l == 17 && w == 1);
  o[7] = __all_sync(0xffffffffu, l < 31);
  o[8] = __all_sync(0xffffffffu, l < 32);
  float f = __shfl_xor_sync(0xffffffffu, 0.5f * x, 1);
  o[9] = int(f * 2.f);
  if (l < 16) o[10] = (int)__ballot_sync(0x0000ffffu, l & 1);  // a partial mask: only the lower half takes part
  else o[10] = -1;
  __syncwarp();
  o[11] = l < 16 ? __shfl_sync(0x0000ffffu, x, 15 - l) : x;
}

void check_warp() {
  const int n = 64;
  std::vector<int> out(n * 12);
  emu::launch(warp_kernel, dim3(1), dim3(n), 0, out.data());
  int before = failures;
  for (int t = 0; t < n; ++t) {
    const int l = t & 31, w = t >> 5, x = 100 * w + l;
    const int* o = &out[t * 12];
    EXPECT(o[0] == 100 * w + (l * 7) % 32, "shfl t%d: %d", t, o[0]);
    EXPECT(o[1] == 100 * w + (l & ~7) + 3, "shfl width 8 t%d: %d", t, o[1]);
    EXPECT(o[2] == 100 * w + (l ^ 5), "shfl_xor t%d: %d", t, o[2]);
    EXPECT(o[3] == (l >= 3 ? x - 3 : x), "shfl_up t%d: %d", t, o[3]);
    EXPECT(o[4] == ((l % 16) + 3 < 16 ? x + 3 : x), "shfl_down width 16 t%d: %d", t, o[4]);
    EXPECT((unsigned)o[5] == 0x49249249u, "ballot t%d: %08x", t, (unsigned)o[5]);
    EXPECT(o[6] == (w == 1), "any t%d: %d", t, o[6]);
    EXPECT(o[7] == 0 && o[8] == 1, "all t%d: %d %d", t, o[7], o[8]);
    EXPECT(o[9] == 100 * w + (l ^ 1), "shfl_xor float t%d: %d", t, o[9]);
    EXPECT(o[10] == (l < 16 ? 0xAAAA : -1), "partial ballot t%d: %x", t, o[10]);
    EXPECT(o[11] == (l < 16 ? 100 * w + 15 - l : x), "partial shfl t%d: %d", t, o[11]);
  }
  std::printf("shuffles, votes, __syncwarp: %s\n", failures == before ? "ok" : "FAIL");
}

// ---- math intrinsics and conversions ----------------------------------------------------------------------------
void check_math() {
  int before = failures;
  EXPECT(exp2f(3.f) == 8.f, "exp2f");
  EXPECT(std::abs(__expf(1.f) - 2.7182818f) < 1e-6f, "__expf");
  EXPECT(std::abs(__logf(8.f) - 2.0794415f) < 1e-6f, "__logf");
  EXPECT(rsqrtf(0.25f) == 2.f, "rsqrtf");
  EXPECT(fmaxf(-INFINITY, 1.f) == 1.f, "fmaxf");
  EXPECT(__bfloat162float(__float2bfloat16(1.00390625f)) == 1.f, "bf16 round to nearest even");
  EXPECT(__half2float(__float2half(65504.f)) == 65504.f, "fp16 max");
  EXPECT(ptx::pack2<__nv_bfloat16>(1.f, -2.f) == 0xC0003F80u, "pack2 bf16: %08x", ptx::pack2<__nv_bfloat16>(1.f, -2.f));
  EXPECT(ptx::pack2<__half>(1.f, -2.f) == 0xC0003C00u, "pack2 f16: %08x", ptx::pack2<__half>(1.f, -2.f));
  std::printf("math intrinsics and conversions: %s\n", failures == before ? "ok" : "FAIL");
}

// ---- errors that must be reported (each aborts the process; tests/test_emu.py checks the message) ----------------
__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void exited_kernel(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void deadlock_kernel(int* out) {
  int x = threadIdx.x;
  if (threadIdx.x < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);  // lanes 16..31 never arrive
  out[threadIdx.x] = x;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> out(64);
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "divergent") { emu::launch(divergent_kernel, dim3(1), dim3(64), 0, out.data()); return 0; }
  if (mode == "exited") { emu::launch(exited_kernel, dim3(1), dim3(64), 0, out.data()); return 0; }
  if (mode == "deadlock") { emu::launch(deadlock_kernel, dim3(1), dim3(32), 0, out.data()); return 0; }
  check_mma<__nv_bfloat16>(true, 1, false);
  check_mma<__nv_bfloat16>(true, 2, true);
  check_mma<__half>(false, 3, false);
  check_mma<__half>(false, 4, true);
  check_ldmatrix<1, false>();
  check_ldmatrix<2, false>();
  check_ldmatrix<4, false>();
  check_ldmatrix<1, true>();
  check_ldmatrix<2, true>();
  check_ldmatrix<4, true>();
  check_cp_async();
  check_warp();
  check_math();
  std::printf("%s\n", failures ? "FAILED" : "all intrinsic checks passed");
  return failures ? 1 : 0;
}

"""The SIMT emulator's own tests: tests/emu/*.cpp built with g++ against csrc/emu, run plain, under ThreadSanitizer and
AddressSanitizer, with a planted race that TSAN must report; on a GPU, the fragment-layout probe against the hardware."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU_TESTS = ROOT / "tests" / "emu"
CACHE = ROOT / "build" / "emu_tests"


def _cuda_include() -> Path | None:
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_bf16.h").exists():
            return Path(base) / "include"
    return None


CUDA_INCLUDE = _cuda_include()
CXX = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(CUDA_INCLUDE is None or CXX is None,
                                reason="needs g++ and the CUDA headers (cuda_bf16.h; set CUDA_HOME)")

# every tests/emu/test_*.cpp is built plain, with ThreadSanitizer and with AddressSanitizer (+UBSan); the sanitizer
# builds run with the argument "quick" (each test program then runs only its first, small cases)
SOURCES = sorted(p.name for p in EMU_TESTS.glob("test_*.cpp"))
BUILDS = {}  # name -> (source, sanitizer, defines)
for _src in SOURCES:
    _stem = _src[len("test_"):-len(".cpp")]
    BUILDS[_stem] = (_src, None, ())
    BUILDS[f"{_stem}_tsan"] = (_src, "thread", ())
    BUILDS[f"{_stem}_asan"] = (_src, "address,undefined", ())
BUILDS["attention_race_tsan"] = ("test_attention.cpp", "thread", ("LLADA_PLANT_RACE",))
BUILDS["linear_race_tsan"] = ("test_linear.cpp", "thread", ("LLADA_PLANT_RACE",))
PROGRAMS = [_src[len("test_"):-len(".cpp")] for _src in SOURCES]
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1 exitcode=66",
    "ASAN_OPTIONS": "halt_on_error=1 detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "halt_on_error=1 print_stacktrace=1",
}


def _digest(src: Path, flags: list[str]) -> str:
    """Key of a build: compiler, flags and the content of every file the source includes (from g++ -MM)."""
    deps = subprocess.run([CXX, *flags, "-MM", str(src)], capture_output=True, text=True, check=True).stdout
    paths = sorted({p for p in deps.replace("\\\n", " ").split()[1:] if not p.endswith(":")})
    h = hashlib.sha256(" ".join([CXX, *flags]).encode())
    for path in paths:
        h.update(path.encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def _build(name: str) -> Path:
    source, sanitizer, defines = BUILDS[name]
    src = EMU_TESTS / source
    flags = ["-std=c++17", "-O1", "-g", f"-I{ROOT / 'csrc'}", f"-I{CUDA_INCLUDE}", *(f"-D{d}" for d in defines)]
    if sanitizer:
        flags.append(f"-fsanitize={sanitizer}")
    exe = CACHE / f"{name}-{_digest(src, flags)}"
    if not exe.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_name(exe.name + f".tmp{os.getpid()}")
        r = subprocess.run([CXX, *flags, str(src), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{r.stderr[-4000:]}")
        os.replace(tmp, exe)  # atomic: concurrent test runs never see a half-written binary
    return exe


@pytest.fixture(scope="module")
def exe():
    """Every binary of BUILDS, built in parallel (cached under build/emu_tests by content hash)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        paths = dict(zip(BUILDS, pool.map(_build, BUILDS)))
    return paths


def _run(path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **SANITIZER_ENV}
    r = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=timeout, env=env)
    print(f"$ {path.name} {' '.join(args)}  -> exit {r.returncode}")
    print(r.stdout[-3000:])
    print(r.stderr[-3000:])
    return r


def test_intrinsics_match_isa_tables(exe):
    r = _run(exe["intrinsics"])
    assert r.returncode == 0 and "all intrinsic checks passed" in r.stdout


@pytest.mark.parametrize("mode, message", [
    ("divergent", "divergent __syncthreads: threads wait at"),
    ("exited", "divergent __syncthreads: reached by only part of the block"),
    ("deadlock", "deadlock: a barrier or warp collective can never complete"),
])
def test_emulator_reports_misuse(exe, mode, message):
    r = _run(exe["intrinsics"], mode)
    assert r.returncode != 0, f"{mode}: the emulator let a broken kernel finish"
    assert message in r.stderr
    if mode != "deadlock":
        assert "test_intrinsics.cpp:" in r.stderr, "the report must name the __syncthreads line"


@pytest.mark.parametrize("program", [p for p in PROGRAMS if p != "intrinsics"])
def test_kernel_emulated(exe, program):
    r = _run(exe[program])
    assert r.returncode == 0, f"test_{program}.cpp: the kernel under the emulator differs from its reference"


@pytest.mark.parametrize("name", [f"{p}_{s}" for p in PROGRAMS for s in ("tsan", "asan")])
def test_sanitizers_clean(exe, name):
    r = _run(exe[name], "quick")
    assert "WARNING: ThreadSanitizer" not in r.stderr
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error:" not in r.stderr
    assert r.returncode == 0


@pytest.mark.parametrize("kernel", ["attention", "linear"])
def test_planted_race_is_reported(exe, kernel):
    """attention.cuh / linear.cuh built with LLADA_PLANT_RACE lack the __syncthreads that protects a shared-memory
    buffer from the next prefetch: TSAN must report the race, between the prefetch and the reads of that buffer."""
    r = _run(exe[f"{kernel}_race_tsan"], "quick")
    race = [line for line in r.stderr.splitlines() if "data race" in line or f"{kernel}.cuh" in line]
    print("\n".join(race[:12]))
    assert "WARNING: ThreadSanitizer: data race" in r.stderr, "TSAN missed the planted race"
    assert f"{kernel}.cuh" in r.stderr
    assert r.returncode != 0


def _gpu_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_available() or shutil.which("nvcc") is None, reason="needs a CUDA GPU and nvcc")
def test_layout_probe_matches_gpu(exe):
    """mma.sync and ldmatrix on the GPU hand every lane exactly what the emulator hands it."""
    src = EMU_TESTS / "layout_probe.cu"
    CACHE.mkdir(parents=True, exist_ok=True)
    gpu_exe, emu_exe = CACHE / "layout_probe_gpu", CACHE / "layout_probe_emu"
    subprocess.run(["nvcc", "-std=c++17", "-arch=native", f"-I{ROOT / 'csrc'}", str(src), "-o", str(gpu_exe)],
                   check=True)
    subprocess.run([CXX, "-std=c++17", "-O1", "-x", "c++", f"-I{ROOT / 'csrc'}", f"-I{CUDA_INCLUDE}", str(src), "-o",
                    str(emu_exe)], check=True)
    gpu = subprocess.run([str(gpu_exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    emu = subprocess.run([str(emu_exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    diff = [(g, e) for g, e in zip(gpu, emu) if g != e]
    print(f"{len(gpu)} probe lines, {len(diff)} differ")
    for g, e in diff[:10]:
        print(f"  gpu: {g}\n  emu: {e}")
    assert len(gpu) == len(emu) and not diff

"""Builds llada_rt._C (and llada_rt._emu) by running CMake with Ninja; CMakeLists.txt owns the source list."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _drop_stale_cache(build_dir: Path, cmake: str, ninja: str) -> None:
    """pip builds in a throw-away environment: a cache made by an earlier build points at a cmake or ninja that is
    gone (or another one), and CMake then fails. Start such a build directory's configuration afresh."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return
    recorded = {}
    for line in cache.read_text(errors="replace").splitlines():
        for key in ("CMAKE_COMMAND:INTERNAL=", "CMAKE_MAKE_PROGRAM:FILEPATH="):
            if line.startswith(key):
                recorded[key] = line[len(key):]
    if recorded.get("CMAKE_COMMAND:INTERNAL=") != cmake or recorded.get("CMAKE_MAKE_PROGRAM:FILEPATH=") != ninja:
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


class CMakeBuild(build_ext):
    """One CMake run builds every module; _emu exists only where the CUDA headers were found (LLADA_EMU)."""

    def build_extension(self, ext):
        import pybind11

        if ext.name != "llada_rt._C":   # built by the _C run below, or deliberately absent
            return

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("LLADA_BUILD_DIR", ROOT / "build" / f"py{sys.version_info[0]}{sys.version_info[1]}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
        _drop_stale_cache(build_dir, cmake, ninja)
        cmake_args = [
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LLADA_BUILD_TYPE', 'Release')}",
            f"-DLLADA_CUDA={os.environ.get('LLADA_CUDA', 'AUTO')}",
            f"-DLLADA_EMU={os.environ.get('LLADA_EMU', 'AUTO')}",
        ]
        if os.environ.get("LLADA_CUDA_ARCHS"):
            cmake_args.append(f"-DLLADA_CUDA_ARCHS={os.environ['LLADA_CUDA_ARCHS']}")
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *cmake_args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


    def copy_extensions_to_source(self):   # --inplace: copy what was built, skip _emu where it was not
        built = [e for e in self.extensions if Path(self.get_ext_fullpath(e.name)).exists()]
        self.extensions, all_exts = built, self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = all_exts


setup(ext_modules=[CMakeExtension("llada_rt._C"), CMakeExtension("llada_rt._emu")], cmdclass={"build_ext": CMakeBuild})

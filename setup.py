"""Build hook for the optional CUDA extension (``csrc/`` via CMake + ninja).

The extension is optional at build time: without nvcc, without CUDA sources in csrc/, or with
CUSPRUN_BUILD_CUDA=0, the package installs without it and the ``cuda`` backend reports why.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cuda_skip_reason() -> str | None:
    if os.environ.get("CUSPRUN_BUILD_CUDA", "1") == "0":
        return "CUSPRUN_BUILD_CUDA=0"
    if not list((ROOT / "csrc").glob("*.cu")):
        return "csrc/ holds no CUDA sources"
    if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        return "nvcc not found"
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", str(ROOT), *generator, f"-DPython_EXECUTABLE={sys.executable}",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", "-DCMAKE_BUILD_TYPE=Release"],
                       cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


reason = cuda_skip_reason()
if reason:
    print(f"cusprun: building without the CUDA extension ({reason})", file=sys.stderr)
setup(
    ext_modules=[] if reason else [Extension("cusprun_kernels._cuda", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)

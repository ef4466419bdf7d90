"""Build hook for the optional CUDA extension (``csrc/`` via CMake + ninja -> ``cusprun_kernels._cuda``).

The extension is optional at build time: without nvcc, or with CUSPRUN_BUILD_CUDA=0, the package
installs without it; a failed CUDA build warns and installs without it too (CUSPRUN_BUILD_CUDA=1
makes it an error). Either way ``cusprun_kernels/_cuda_build.json`` records what happened and why,
which ``python -m cusprun`` and ``CUSPRUN_BACKEND=cuda`` report.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
INFO_NAME = "_cuda_build.json"


def record(status: str, reason: str = "", *folders: Path) -> None:
    """Write the build outcome next to the package sources (editable installs) and the built package."""
    for folder in {ROOT / "cusprun_kernels", *folders}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INFO_NAME).write_text(json.dumps({"status": status, "reason": reason}) + "\n")


def remove_stale_module() -> None:
    """An editable install keeps the module of an earlier build beside the sources; when this build does
    not produce one, that stale module (compiled from other sources) must not be imported instead."""
    for stale in (ROOT / "cusprun_kernels").glob("_cuda.*.so"):
        stale.unlink()


def cuda_skip_reason() -> str | None:
    if os.environ.get("CUSPRUN_BUILD_CUDA", "") == "0":
        return "CUSPRUN_BUILD_CUDA=0 at install time"
    if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        return "nvcc was not found at install time"
    if shutil.which("cmake") is None:
        return "cmake was not found at install time"
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        try:
            for cmd in (["cmake", str(ROOT), *generator, f"-DPython_EXECUTABLE={sys.executable}",
                         f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}", "-DCMAKE_BUILD_TYPE=Release"],
                        ["cmake", "--build", ".", "--parallel"]):
                subprocess.run(cmd, cwd=build_dir, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            if os.environ.get("CUSPRUN_BUILD_CUDA") == "1":
                raise
            reason = f"the CUDA build failed: {exc}"
            print(f"cusprun: WARNING: {reason}; installing without the CUDA extension", file=sys.stderr)
            record("failed", reason, out_dir)
            remove_stale_module()
            self.extensions = []  # nothing to copy into place
            return
        record("built", "", out_dir)


reason = cuda_skip_reason()
if reason:
    print(f"cusprun: building without the CUDA extension ({reason})", file=sys.stderr)
    record("skipped", reason)
    remove_stale_module()
setup(
    ext_modules=[] if reason else [Extension("cusprun_kernels._cuda", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)

"""Build pars_fast with its C++ extension (pars_fast._heap) through CMake.

The pattern follows pybind/cmake_example: setuptools drives CMake, which finds
pybind11 through its CMake config, so no submodule is needed.
Honoured environment: CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL, CMAKE_BUILD_TYPE.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

VERSION = "0.1.0"


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cmake = shutil.which("cmake")
        if cmake is None:
            sys.exit("pars_fast build error: cmake was not found. Install it with `pip install cmake` or your OS package manager.")
        try:
            import pybind11
        except ImportError:
            sys.exit("pars_fast build error: pybind11 is not installed in the build environment (`pip install pybind11`).")

        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPARS_FAST_VERSION={VERSION}",
        ]
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [a for a in os.environ["CMAKE_ARGS"].split(" ") if a]
        if shutil.which("ninja") or _ninja_from_wheel():
            cmake_args += ["-GNinja"]
            ninja = _ninja_from_wheel()
            if ninja:
                cmake_args += [f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build_args = []
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += [f"-j{os.cpu_count() or 2}"]

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        for step in ([cmake, ext.sourcedir, *cmake_args], [cmake, "--build", ".", *build_args]):
            result = subprocess.run(step, cwd=build_temp, capture_output=True, text=True)
            if result.returncode != 0:
                sys.stderr.write(result.stdout[-8000:] + result.stderr[-8000:])
                sys.exit(
                    f"pars_fast build error: `{' '.join(step[:3])} ...` failed (exit {result.returncode}); "
                    "its output is above. A C++17 compiler (g++ >= 9 or clang >= 10), cmake >= 3.18 "
                    "and the Python headers are required."
                )


def _ninja_from_wheel() -> str | None:
    try:
        import ninja
    except ImportError:
        return None
    path = Path(ninja.BIN_DIR) / "ninja"
    return str(path) if path.exists() else None


# Every package with an __init__.py under pars_fast/ ships, found automatically: a
# hand-kept list once left pars_fast.e2e out of the wheel. The Triton kernels live in
# kernels/ at the top level and ship as pars_fast.kernels. `make check-wheel` installs
# the built wheel into a fresh venv and checks that every module of the tree is in it.
PACKAGES = find_packages(include=["pars_fast", "pars_fast.*"]) + ["pars_fast.kernels"]

setup(
    packages=PACKAGES,
    package_dir={"pars_fast": "pars_fast", "pars_fast.kernels": "kernels"},
    package_data={"pars_fast": ["py.typed", "*.pyi", "sim/presets/*.json"]},
    ext_modules=[CMakeExtension("pars_fast._heap")],
    cmdclass={"build_ext": CMakeBuild},
)

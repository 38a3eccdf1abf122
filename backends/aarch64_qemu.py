"""Run an ``aarch64`` TVM artifact on an x86-64 machine under qemu-aarch64 (user-mode emulation).

Three pieces, each cached:

* the aarch64 TVM runtime (``libtvm_runtime.so``, ``libtvm_ffi.so``) taken from PyPI's aarch64
  wheels of the installed apache-tvm / apache-tvm-ffi versions, in :func:`runtime_dir`
  (``~/.cache/rehyat-compile/aarch64-runtime/<tvm version>`` or ``$REHYAT_AARCH64_RUNTIME``);
  :func:`fetch_runtime` downloads them (``scripts/setup.sh`` calls it; nothing else downloads);
* ``aarch64_driver.cc`` (beside this file), compiled once with ``aarch64-linux-gnu-g++`` against
  that runtime and the installed tvm-ffi headers, cached by the hash of what went into it;
* :func:`run_entry`: inputs to raw files, the driver under qemu, raw output files back to numpy.

Missing pieces raise ``verify.ToolMissing`` naming the command that provides them.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .verify import ToolMissing, tool

CROSS_GXX = "aarch64-linux-gnu-g++"
SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's libc6-arm64-cross / libstdc++6-arm64-cross
DRIVER_SOURCE = Path(__file__).with_name("aarch64_driver.cc")
RUNTIME_ENV = "REHYAT_AARCH64_RUNTIME"
# Wheel distribution -> the shared libraries the driver links against (the Relax VM lives in
# libtvm_runtime.so; everything it needs besides libc/libstdc++ is libtvm_ffi.so).
RUNTIME_LIBRARIES = {"apache-tvm": ("libtvm_runtime.so",), "apache-tvm-ffi": ("libtvm_ffi.so",)}
AARCH64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
FETCH_COMMAND = "python -m rehyat_compile.backends.aarch64_qemu (run by scripts/setup.sh)"


# ---------------------------------------------------------------------------------------------
# The aarch64 runtime libraries
# ---------------------------------------------------------------------------------------------

def runtime_versions() -> dict[str, str]:
    """{distribution: installed version}: the aarch64 runtime must match the x86 compiler."""
    return {dist: importlib.metadata.version(dist) for dist in RUNTIME_LIBRARIES}


def runtime_dir() -> Path:
    """Folder holding the aarch64 runtime libraries (it need not exist yet)."""
    override = os.environ.get(RUNTIME_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "rehyat-compile" / "aarch64-runtime" / runtime_versions()["apache-tvm"]


def runtime_library_names() -> list[str]:
    return [name for names in RUNTIME_LIBRARIES.values() for name in names]


def require_runtime() -> Path:
    """:func:`runtime_dir` when every runtime library is in it; ToolMissing otherwise."""
    folder = runtime_dir()
    missing = [name for name in runtime_library_names() if not (folder / name).is_file()]
    if missing:
        raise ToolMissing(f"the aarch64 TVM runtime ({', '.join(missing)}) is not in {folder}; "
                          f"fetch it with: {FETCH_COMMAND}")
    return folder


def download_wheels(dest: Path) -> list[Path]:
    """``pip download`` the aarch64 wheels of the installed apache-tvm and apache-tvm-ffi into
    ``dest`` (about 100 MB); returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{dist}=={version}" for dist, version in runtime_versions().items()]
    platforms = [arg for p in AARCH64_PLATFORMS for arg in ("--platform", p)]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *pins, *platforms, "--only-binary=:all:",
                    "--no-deps", "--python-version", python, "-d", str(dest)], check=True)
    return sorted(dest.glob("*.whl"))


def extract_runtime(wheels: list[Path], dest: Path) -> Path:
    """Copy the runtime libraries (by file name, wherever they sit in the wheels) into ``dest``."""
    wanted = set(runtime_library_names())
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=_ensure_parent(dest)))
    try:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                for member in archive.namelist():
                    if Path(member).name in wanted:
                        (staging / Path(member).name).write_bytes(archive.read(member))
        missing = wanted - {p.name for p in staging.iterdir()}
        if missing:
            raise FileNotFoundError(f"{', '.join(sorted(missing))} not found in {[w.name for w in wheels]}")
        dest.mkdir(parents=True, exist_ok=True)
        for library in staging.iterdir():
            library.replace(dest / library.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _ensure_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def fetch_runtime(wheel_dir: Path | None = None) -> Path:
    """Make :func:`runtime_dir` hold the runtime: from the wheels in ``wheel_dir`` when given,
    else downloaded with pip (kept only while extracting). Returns the folder."""
    dest = runtime_dir()
    try:
        return require_runtime()
    except ToolMissing:
        pass
    if wheel_dir is not None:
        return extract_runtime(sorted(Path(wheel_dir).glob("*aarch64*.whl")), dest)
    with tempfile.TemporaryDirectory(prefix="rehyat-aarch64-wheels-") as tmp:
        return extract_runtime(download_wheels(Path(tmp)), dest)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def _driver_command(runtime: Path, output: Path) -> list[str]:
    import tvm_ffi.libinfo
    includes = {tvm_ffi.libinfo.find_include_path(), tvm_ffi.libinfo.find_dlpack_include_path()}
    return [tool(CROSS_GXX), "-std=c++17", "-O2", *[f"-I{p}" for p in sorted(includes)], str(DRIVER_SOURCE),
            "-o", str(output), f"-L{runtime}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
            f"-Wl,-rpath-link,{runtime}"]


def driver_path() -> Path:
    """The compiled aarch64 driver in the runtime folder, built on first use; its name carries
    the hash of the source, the runtime versions and the compile command."""
    runtime = require_runtime()
    recipe = "\n".join([DRIVER_SOURCE.read_text(), repr(sorted(runtime_versions().items())),
                        " ".join(_driver_command(runtime, Path("driver")))])
    driver = runtime / f"aarch64_driver-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if driver.is_file():
        return driver
    partial = driver.with_name(f".{driver.name}.{os.getpid()}")  # concurrent builds must not clash
    done = subprocess.run(_driver_command(runtime, partial), capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {DRIVER_SOURCE.name} with {CROSS_GXX} failed:\n{done.stderr[-3000:]}")
    partial.replace(driver)
    return driver


def sysroot() -> Path:
    """The aarch64 libc/libstdc++ that qemu-aarch64 loads the driver with."""
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").is_file():
        raise ToolMissing(f"no aarch64 sysroot at {SYSROOT} (Debian g++-aarch64-linux-gnu; "
                          "scripts/install_system_deps.sh)")
    return SYSROOT


def require_emulation() -> list[str]:
    """The command prefix that runs the driver under qemu-aarch64 (the driver compiled on first
    use); ToolMissing naming every missing piece and what provides it."""
    found, missing = {}, []
    for name, check in (("qemu", lambda: tool("qemu-aarch64")), ("sysroot", sysroot), ("runtime", require_runtime)):
        try:
            found[name] = check()
        except ToolMissing as err:
            missing.append(str(err))
    if missing:
        raise ToolMissing("; ".join(missing))
    return [found["qemu"], "-L", str(found["sysroot"]), "-E", f"LD_LIBRARY_PATH={found['runtime']}", str(driver_path())]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def _spec_line(array: np.ndarray, path: Path) -> str:
    return " ".join([str(array.dtype), str(array.ndim), *map(str, array.shape), str(path)])


def _read_outputs(out_dir: Path) -> list[np.ndarray]:
    """The driver's ``outputs.txt`` lines ``<dtype> <ndim> <dims...> <file>`` as arrays."""
    arrays = []
    for line in (out_dir / "outputs.txt").read_text().splitlines():
        dtype, ndim, *rest = line.split()
        shape, name = tuple(int(d) for d in rest[:int(ndim)]), rest[int(ndim)]
        arrays.append(np.fromfile(out_dir / name, dtype=np.dtype(dtype)).reshape(shape))
    return arrays


def run_entry(library_path, entry: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Call function ``entry`` of the aarch64 Relax VM executable ``library_path`` on ``arrays``
    (in the function's parameter order) under qemu-aarch64; every output tensor, a tuple result
    flattened depth first."""
    command = require_emulation()
    with tempfile.TemporaryDirectory(prefix="rehyat-aarch64-run-") as tmp:
        folder = Path(tmp)
        lines = []
        for i, array in enumerate(arrays):
            array = np.ascontiguousarray(array)
            array.tofile(folder / f"in{i}.bin")
            lines.append(_spec_line(array, folder / f"in{i}.bin"))
        (folder / "inputs.txt").write_text("\n".join(lines) + "\n")
        (folder / "out").mkdir()
        done = subprocess.run([*command, str(Path(library_path).resolve()), entry, str(folder / "inputs.txt"),
                               str(folder / "out")], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(library_path).name}:{entry} under qemu-aarch64 failed "
                               f"(exit {done.returncode}):\n{(done.stderr or done.stdout)[-3000:]}")
        return _read_outputs(folder / "out")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the aarch64 TVM runtime for qemu-aarch64 runs "
                                                 "and compile the driver.")
    parser.add_argument("--wheels", type=Path, help="folder with the aarch64 wheels already downloaded")
    args = parser.parse_args(argv)
    folder = fetch_runtime(args.wheels)
    print(f"aarch64 TVM runtime in {folder}")
    try:
        print(f"driver: {driver_path()}")
    except ToolMissing as missing:
        print(f"driver not compiled: {missing}")


if __name__ == "__main__":
    main()

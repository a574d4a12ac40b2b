"""Build the kernel library on first use, into a cache folder, with the machine's own C++ compiler.

Why built at first use rather than at install: the library is two C++ files compiled in seconds, and
building it when a session first needs it works the same for `pip install -e .`, a wheel, or a
source tree on PYTHONPATH, with no build hook; a machine without a compiler or without ONNX
Runtime's headers installs and runs as before (on MatMulNBits), and the reason is one line.

ONNX Runtime's C API headers (the library needs no link to libonnxruntime: ONNX Runtime hands it the
API in RegisterCustomOps) are taken from, in order:
1. $ORT_INCLUDE_DIR (the folder holding onnxruntime_c_api.h, or one with an onnxruntime/ inside);
2. a system install: /usr/include/onnxruntime, /usr/local/include/onnxruntime;
3. Debian's libonnxruntime-dev (trixie: ONNX Runtime 1.21, C API version 21), fetched once with
   `apt-get download` through a private sources list in the cache folder and unpacked there with
   `dpkg-deb -x`: nothing is installed system-wide. ONNX Runtime serves older API versions, so a
   library built on 1.21's headers loads in later releases.
The library lands in CACHE/<hash of source, compiler and headers>/ (CACHE: $GPTEXPORT_KERNELS_CACHE,
else $XDG_CACHE_HOME/gptexport/kernels, else ~/.cache/gptexport/kernels), built into a temporary
file and renamed, under a file lock, so concurrent first uses build it once.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name) for name in ("int4_matmul.cc", "int8_matmul.cc", "attention.cc"))
HEADERS = (Path(__file__).with_name("kernels.h"),)  # included by the sources: part of the build's key
LIBRARY = "libgptexport_kernels.so"
HEADER = "onnxruntime_c_api.h"
SYSTEM_INCLUDES = (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def debian_mirror() -> str:
    """The Debian mirror this machine's own apt sources name (the one it is allowed to reach); trixie is
    asked of it. One-line KernelsUnavailable when no source names a Debian archive."""
    files = [APT_SOURCES[0]] + sorted(APT_SOURCES[1].glob("*.list")) + sorted(APT_SOURCES[1].glob("*.sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            uris = words[1:] if words[:1] == ["URIs:"] else [w for w in words[1:2] if words[:1] == ["deb"]]
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    raise KernelsUnavailable("no Debian archive in /etc/apt/sources.list(.d) to fetch libonnxruntime-dev from")
DEBIAN_PACKAGE = "libonnxruntime-dev"
CXX_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall")
TIMEOUT_S = 300
RETRY_FETCH_S = 3600


class KernelsUnavailable(Exception):
    """The library cannot be built or loaded here; the message says why in one line."""


def cache_root() -> Path:
    if os.environ.get("GPTEXPORT_KERNELS_CACHE"):
        return Path(os.environ["GPTEXPORT_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gptexport" / "kernels"


def compiler() -> str:
    given = os.environ.get("CXX")
    cxx = shutil.which(given) if given else shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelsUnavailable(f"no C++ compiler ({'CXX=' + given if given else 'g++ or c++'}) to build them")
    return cxx


MIN_ONNXRUNTIME = (1, 21)  # C API version 21, the headers' (ORT_API_VERSION): older ones cannot serve it


def check_onnxruntime() -> None:
    """The installed onnxruntime serves the API the library asks for, or KernelsUnavailable."""
    import onnxruntime

    version = onnxruntime.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return  # a dev build: let RegisterCustomOps find out
    if major_minor < MIN_ONNXRUNTIME:
        raise KernelsUnavailable(f"onnxruntime {version} is older than the {'.'.join(map(str, MIN_ONNXRUNTIME))} "
                                 f"whose C API they are built on (pip install -U onnxruntime)")


def ensure_library() -> Path:
    """The built library's path, building it (and fetching the headers) the first time."""
    check_onnxruntime()
    cxx = compiler()
    include = find_headers()
    key = hashlib.sha256(b"".join(s.read_bytes() for s in (*SOURCES, *HEADERS)) + cxx.encode() + str(include).encode()
                         + (include / HEADER).read_bytes() + " ".join(CXX_FLAGS).encode()).hexdigest()[:16]
    path = cache_root() / key / LIBRARY
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent / ".lock"):
            if not path.exists():
                _compile(cxx, include, path)
    return path


def isa(path: Path) -> str:
    """The code path the library runs on this CPU ("avx512vnni": AVX2 with Int8MatMul on VNNI, "avx2"
    or "generic")."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelsUnavailable(f"{path} does not load ({e})") from None
    lib.GptexportKernelsIsa.restype = ctypes.c_char_p
    return lib.GptexportKernelsIsa().decode()


def find_headers() -> Path:
    """The folder holding onnxruntime_c_api.h (see the module docstring for the order)."""
    given = os.environ.get("ORT_INCLUDE_DIR")
    if given:
        for folder in (Path(given), Path(given) / "onnxruntime"):
            if (folder / HEADER).is_file():
                return folder
        raise KernelsUnavailable(f"ORT_INCLUDE_DIR={given} has no {HEADER} (nor onnxruntime/{HEADER})")
    for folder in (*SYSTEM_INCLUDES, debian_headers()):
        if (folder / HEADER).is_file():
            return folder
    return fetch_debian_headers()


def debian_headers() -> Path:
    return cache_root() / "debian" / "usr" / "include" / "onnxruntime"


def fetch_debian_headers() -> Path:
    """Debian's libonnxruntime-dev unpacked into the cache folder; its include folder."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise KernelsUnavailable(f"no ONNX Runtime headers ({HEADER}): set ORT_INCLUDE_DIR, or install "
                                 f"{DEBIAN_PACKAGE} (this machine has no apt-get to fetch it)")
    root = cache_root() / "debian"
    root.mkdir(parents=True, exist_ok=True)
    failed = root / "last-failure.txt"  # a failed fetch is not retried by every session for an hour
    with _locked(root / ".lock"):
        if (debian_headers() / HEADER).is_file():
            return debian_headers()
        if failed.is_file() and time.time() - failed.stat().st_mtime < RETRY_FETCH_S:
            raise KernelsUnavailable(failed.read_text().strip() + f" (not retried before an hour has passed: {failed})")
        try:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                deb = _apt_download(Path(tmp))
                _run(["dpkg-deb", "-x", str(deb), str(root)], "dpkg-deb -x")
        except KernelsUnavailable as e:
            failed.write_text(f"no ONNX Runtime headers: {e}\n")
            raise KernelsUnavailable(f"no ONNX Runtime headers: {e}") from None
    if not (debian_headers() / HEADER).is_file():
        raise KernelsUnavailable(f"{DEBIAN_PACKAGE} unpacked into {root} has no {HEADER}")
    return debian_headers()


def _apt_download(work: Path) -> Path:
    """`apt-get download libonnxruntime-dev` from trixie, with lists and caches under `work`."""
    (work / "lists" / "partial").mkdir(parents=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True)
    (work / "sources.list").write_text(f"deb [signed-by={KEYRING}] {debian_mirror()} trixie main\n")
    options = ["-o", f"Dir::Etc::SourceList={work / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent",
               "-o", f"Dir::State::Lists={work / 'lists'}", "-o", f"Dir::Cache={work / 'cache'}",
               "-o", "Debug::NoLocking=1", "-o", "Acquire::Retries=0", "-o", "Acquire::http::Timeout=20"]
    if os.geteuid() == 0:  # root: download as root rather than as _apt, who cannot write to `work`
        options += ["-o", "APT::Sandbox::User=root"]
    said = _run(["apt-get", "-q", *options, "update"], "apt-get update (Debian trixie)")
    unreached = [ln for ln in said.splitlines() if ln.startswith(("W: Failed to fetch", "Err:"))]
    if unreached:  # apt-get update exits 0 when it cannot reach the mirror: say that, not "no such package"
        raise KernelsUnavailable(f"apt-get update (Debian trixie) failed: {' '.join(unreached[-1].split())}")
    _run(["apt-get", "-q", *options, "download", DEBIAN_PACKAGE], f"apt-get download {DEBIAN_PACKAGE}", cwd=work)
    debs = sorted(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if not debs:
        raise KernelsUnavailable(f"apt-get download {DEBIAN_PACKAGE} left no .deb")
    return debs[-1]


def _compile(cxx: str, include: Path, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        _run([cxx, *CXX_FLAGS, f"-I{include}", "-o", tmp, *map(str, SOURCES)],
             f"{Path(cxx).name} {' '.join(s.name for s in SOURCES)}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a build step; its output, or KernelsUnavailable naming it and its first error line."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelsUnavailable(f"{what} failed ({e})") from None
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith("E:")]
        raise KernelsUnavailable(f"{what} failed: {(errors or lines or ['exit ' + str(result.returncode)])[0].strip()}")
    return result.stdout + result.stderr


class _locked:
    """An exclusive lock on a file for the duration of a with-block (across processes)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()

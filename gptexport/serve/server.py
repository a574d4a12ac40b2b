"""`gptexport serve`: a real tritonserver on a model repository, started and always stopped.

The server is the `tritonserver` on the PATH, or else the one bundled in the nvidia-pytriton
wheel (pinned below), of which we use the server binary, its Python backend and the backend's
stub, never pytriton's Python API. The stub embeds a Python, which must be this interpreter with this import path:
- the stub ignores PYTHONPATH and takes its `sys.prefix` from the `python3` it finds on the PATH
  (with a pyvenv.cfg beside it, as for any virtual environment). So the server's PATH starts
  with a throwaway environment made for it (`stub_environment`): a `python3` link to this
  interpreter, and a .pth file that adds this process's import path (site directories with
  their own .pth files, so an editable gptexport is found too);
- it links libpython dynamically: this interpreter's LIBDIR goes on LD_LIBRARY_PATH, and an
  interpreter built without a shared libpython cannot serve;
- the bundled stub (Triton 24.10's Python backend) was compiled against numpy 1.x: under numpy 2
  it reads a dtype's item size wrongly and garbles every tensor (all elements become the first
  byte). Where this environment has numpy 2, the stub's import path starts with numpy 1.26 of
  its own, installed in `<sys.prefix>/triton-stub-site`; nothing else changes.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import importlib.metadata
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..artifacts.modeldir import MANIFEST
from ..errors import BackendUnavailable, GptExportError, UsageError

PYTRITON = "nvidia-pytriton"
PYTRITON_VERSION = "0.7.0"  # its tritonserver is Triton 2.51 (container release 24.10)
STUB_NUMPY = "numpy==1.26.4"
STUB_SITE = "triton-stub-site"
EXIT_TIMEOUT_S = 5  # how long a stopping server waits for requests in flight


@dataclass
class TritonInstall:
    tritonserver: Path
    description: str
    python_backend: Path | None = None  # bundled: libtriton_python.so and its utils; None: the server's own
    stub: Path | None = None
    libs: Path | None = None
    stub_site: Path | None = None


def find_tritonserver() -> TritonInstall:
    """The tritonserver on the PATH, or nvidia-pytriton's; BackendUnavailable says how to get one."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), f"tritonserver {on_path}")
    try:
        dist = importlib.metadata.distribution(PYTRITON)
    except importlib.metadata.PackageNotFoundError:
        raise BackendUnavailable(
            f"no tritonserver on the PATH and {PYTRITON} is not installed; "
            f"install its server with: pip install --no-deps {PYTRITON}=={PYTRITON_VERSION}") from None
    if dist.version != PYTRITON_VERSION:
        raise BackendUnavailable(f"{PYTRITON} {dist.version} is installed; gptexport serves with {PYTRITON_VERSION}: "
                                 f"pip install --no-deps {PYTRITON}=={PYTRITON_VERSION}")
    root = Path(dist.locate_file("pytriton")) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(root / "bin" / "tritonserver", f"tritonserver 2.51 from {PYTRITON} {PYTRITON_VERSION}",
                            root / "backends" / "python",
                            root / "python_backend_stubs" / version / "triton_python_backend_stub",
                            Path(dist.locate_file("nvidia_pytriton.libs")))
    if not install.stub.is_file():
        raise BackendUnavailable(f"{PYTRITON} {PYTRITON_VERSION} has no Python backend stub for Python {version} "
                                 f"({install.stub} is missing)")
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        install.stub_site = Path(sys.prefix) / STUB_SITE
        if not list(install.stub_site.glob("numpy-1.*.dist-info")):
            raise BackendUnavailable(
                f"the Python backend stub of {PYTRITON} {PYTRITON_VERSION} was built for numpy 1.x and garbles tensors "
                f"under numpy {numpy.__version__}; give it numpy 1.26 of its own, beside this environment's: "
                f"{sys.executable} -m pip install --no-deps --target {install.stub_site} '{STUB_NUMPY}'")
    return install


def server_env(install: TritonInstall, stub_bin: Path) -> dict[str, str]:
    """The environment of tritonserver, whose Python stub runs `stub_bin`'s python3 (stub_environment)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (Path(libdir) / soname).is_file():
        raise BackendUnavailable(f"{sys.executable} has no shared libpython (built without --enable-shared); "
                                 f"Triton's Python backend stub needs one: use a Python built with --enable-shared")
    env = dict(os.environ)

    def prepend(var: str, *paths) -> None:
        env[var] = os.pathsep.join([*map(str, paths), *filter(None, [env.get(var)])])

    prepend("PATH", stub_bin)
    prepend("LD_LIBRARY_PATH", libdir, *([install.libs] if install.libs else []))
    return env


def stub_environment(where: Path, stub_site: Path | None) -> Path:
    """A virtual environment at `where` for the stub's Python: this interpreter, this process's
    import path (after `stub_site` if given); returns its bin directory."""
    base = Path(getattr(sys, "_base_executable", "") or sys.executable)
    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").symlink_to(base)
    (where / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                      f"version = {'.'.join(map(str, sys.version_info[:3]))}\n")
    site_packages = where / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site_packages.mkdir(parents=True)
    site_dirs = sorted(set(site.getsitepackages()) | ({site.getusersitepackages()} if site.ENABLE_USER_SITE else set()))
    paths = ([str(stub_site)] if stub_site else []) + [p or os.getcwd() for p in sys.path]
    # a .pth line runs at the stub's startup; the module it imports extends sys.path
    (site_packages / "gptexport_stub_path.py").write_text(
        f"import site, sys\n\nSITE_DIRS = {site_dirs!r}\n"
        f"for p in {paths!r}:\n"
        f"    if p in sys.path:\n        continue\n"
        f"    if p in SITE_DIRS:\n        site.addsitedir(p)  # with its .pth files (an editable install)\n"
        f"    else:\n        sys.path.append(p)\n")
    (site_packages / "gptexport_stub_path.pth").write_text("import gptexport_stub_path\n")
    return bin_dir


def backend_directory(install: TritonInstall, where: Path) -> Path:
    """A backend directory whose python/ links the bundled Python backend and the stub for this Python."""
    python = where / "python"
    python.mkdir(parents=True)
    for f in install.python_backend.iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / "triton_python_backend_stub").symlink_to(install.stub)
    return where


def model_names(repo: Path) -> list[str]:
    """The models of a Triton repository (folders with a config.pbtxt)."""
    if not repo.is_dir():
        raise GptExportError(f"{repo}: no such directory (give a repository written by `gptexport triton` "
                             f"or a model directory)")
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not names:
        raise GptExportError(f"{repo}: not a Triton model repository (no NAME/config.pbtxt) "
                             f"nor a model directory (no {MANIFEST})")
    return names


class TritonServer:
    """A tritonserver process on `repo`, listening on `address` only; a context manager that stops it.

    `echo` receives every line the server prints (its log, the models' logs); the last lines are
    kept for error messages either way.
    """

    def __init__(self, repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, address: str = "127.0.0.1",
                 echo: Callable[[str], None] | None = None, ready_timeout_s: float = 120,
                 metrics_port: int | None = None):
        self.repo, self.address = Path(repo).resolve(), address
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.echo, self.ready_timeout_s = echo, ready_timeout_s
        self.lines: collections.deque[str] = collections.deque(maxlen=500)
        self.proc: subprocess.Popen | None = None
        self._stack = ExitStack()

    def __enter__(self) -> "TritonServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address
        return f"http://{host}:{self.http_port}"

    def start(self) -> None:
        model_names(self.repo)
        install = find_tritonserver()
        work = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="gptexport-triton-")))
        env = server_env(install, stub_environment(work / "python", install.stub_site))
        for port, option in ((self.http_port, "--http-port"), (self.grpc_port, "--grpc-port")):
            _check_port_free(self.address, port, option)
        cmd = [str(install.tritonserver), f"--model-repository={self.repo}",
               f"--http-address={self.address}", f"--grpc-address={self.address}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}",
               *self._metrics_options(), "--allow-sagemaker=false", "--allow-vertex-ai=false",
               f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--exit-on-error=true", "--strict-readiness=true"]
        if not any("KIND_GPU" in p.read_text() for p in self.repo.glob("*/config.pbtxt")):
            cmd += ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]  # no GPU to stage for
        if install.python_backend is not None:
            cmd.append(f"--backend-directory={backend_directory(install, work / 'backends')}")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self._stack.callback(reader.join, 5)
        self.wait_ready()

    def _metrics_options(self) -> list[str]:
        if self.metrics_port is None:
            return ["--allow-metrics=false"]
        return ["--allow-metrics=true", "--allow-gpu-metrics=false", f"--metrics-address={self.address}",
                f"--metrics-port={self.metrics_port}"]

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if self.echo is not None:
                self.echo(line)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader take the last lines
                raise GptExportError(f"{self.repo}: tritonserver exited with code {self.proc.returncode}: "
                                     f"{self.failure()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise GptExportError(f"{self.repo}: tritonserver was not ready after {self.ready_timeout_s:.0f} s: "
                             f"{self.failure()}")

    def failure(self) -> str:
        """The most telling line of the server's output: our model's error, else Triton's first error."""
        mark = "TritonModelException: error: "  # raised by gptexport.serve.model's initialize
        for line in self.lines:
            if mark in line:
                return line[line.index(mark) + len(mark):].split("\\n")[0].rstrip(' |"')
        errors = [ln for ln in self.lines if ln[:1] == "E" and "CudaDriverHelper" not in ln]
        return (errors or list(self.lines)[-1:] or ["no output"])[0]

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (Triton's clean shutdown), SIGKILL if it has not exited in time; then clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stack.close()


def serve(path: str | Path, http_port: int = 8000, grpc_port: int = 8001, address: str = "127.0.0.1",
          echo: Callable[[str], None] | None = None, say: Callable[[str], None] = print,
          openai_port: int | None = 9000) -> None:
    """Serve a repository (or a model directory, through a temporary repository) until Ctrl-C / SIGTERM,
    with the OpenAI front on `openai_port` (None: without it) in this process."""
    from .repository import write_repository

    path = Path(path)
    # both stop the server cleanly, even where the shell started us with SIGINT ignored (`... &`)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as stack:
            if (path / MANIFEST).is_file():
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gptexport-serve-")))
                repo = write_repository(path, tmp / "repo")
            else:
                repo = path
            names = model_names(repo)
            metrics_port = _free_port(address) if openai_port is not None else None  # read through the front only
            front = _start_front(stack, repo, address, grpc_port, openai_port, metrics_port)
            server = stack.enter_context(TritonServer(repo, http_port, grpc_port, address, echo,
                                                      metrics_port=metrics_port))
            say(f"serving {path} with {find_tritonserver().description}")
            for name in names:
                say(f"  {name}: POST {server.url}/v2/models/{name}/generate_stream (or /generate); "
                    f"gRPC {address}:{grpc_port}")
            if front is not None:
                say(f"  OpenAI API: {front.url}/v1 (completions{', chat/completions' if _chats(front) else ''}, "
                    f"models), {front.url}/health, {front.url}/metrics")
            say("Ctrl-C to stop")
            try:
                code = _wait(server, front)
            except KeyboardInterrupt:
                say("stopping")
                return
            raise GptExportError(f"{path}: tritonserver exited with code {code}: {server.failure()}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_front(stack: ExitStack, repo: Path, address: str, grpc_port: int, openai_port: int | None,
                 metrics_port: int | None):
    """The OpenAI front, listening before Triton starts (its /health says 503 until the model is ready)."""
    if openai_port is None:
        return None
    from .openai_front import OpenAIFront

    _check_port_free(address, openai_port, "--openai-port")
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    front = OpenAIFront(repo, f"{host}:{grpc_port}", address, openai_port,
                        f"http://{host}:{metrics_port}/metrics" if metrics_port else None)
    stack.callback(front.stop)
    front.start()
    return front


def _chats(front) -> bool:
    return any(m.chat_template is not None for m in front.models.values())


def _wait(server: TritonServer, front) -> int:
    """Until Triton exits (its exit code) or the front stops (GptExportError): either ends both."""
    while True:
        try:
            return server.proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        why = front.failed() if front is not None else None
        if why:
            raise GptExportError(why)


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address if address not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_port_free(address: str, port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise GptExportError(f"{address}:{port} is already in use; pick another port with {option}") from None
            raise UsageError(f"cannot listen on {address}:{port} ({e.strerror})") from None


def _die_with_parent() -> None:
    """In the child: SIGTERM it when gptexport dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass

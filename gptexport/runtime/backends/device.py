"""The device-memory core both GPU runners stand on, with a host twin that runs the same code in CI.

A `DeviceMemory` owns buffers and one stream: allocate, zero, upload (host -> buffer), download
(buffer -> host), copy3d (the strided copy that appends a sequence's new keys/values to its row of
the batch cache, across every layer at once), synchronize, free. `HostMemory` implements it on host
memory (numpy-owned bytes, ctypes.memmove, strided numpy
copies) and `CudaMemory` with cuda-python's runtime API on one CUDA stream. Everything above this
seam (batchcache.py, the ONNX Runtime and TensorRT runners) is the same code for both, so what a GPU
runs is what the test suite ran on the CPU; only the methods of `CudaMemory` touch CUDA.

Both implementations check every access against their own allocation table (base pointer and
size; a pointer may point inside an allocation, as the cache's per-layer tensors do), so a copy
plan that would write past a buffer fails loudly on the CPU in CI instead of silently corrupting
device memory. The same holds for the tensors the runners bind (`check_tensor`): ONNX Runtime and
TensorRT read and write whatever a bound shape spans, so a shape larger than its buffer (a decode
bucket of more rows than the cache has) is refused before either is given it.

The addresses a CUDA graph was captured with are replayed for as long as the graph lives, and
ONNX Runtime frees its graphs only with the session (see ort.py): buffers a graph names must
outlive it, which is why the batch cache's decode buckets live in arenas the runner keeps
(buckets.GraphArena) rather than in each cache.

What CudaMemory relies on (CUDA Runtime API, as exposed by cuda-python's `cuda.bindings.runtime`):
- every call returns (cudaError_t, *values); `cuda_call` unwraps it and raises on an error;
- cudaMemcpyAsync / cudaMemcpy3DAsync / cudaMemsetAsync are ordered on the
  stream they are given,
  after everything queued on it before (ONNX Runtime's runs included, since it is handed the same
  stream as `user_compute_stream`, and TensorRT's `execute_async_v3(stream)`);
- a host -> device copy from pageable memory may return before the copy has happened, so a step
  keeps its host arrays alive until its `synchronize()`; a device -> host copy is read only after
  `synchronize()` (cudaStreamSynchronize) returns;
- cudaMalloc memory is not initialised: cache buffers are zeroed explicitly (see batchcache.py);
- cudaMemcpy3DAsync between linear buffers (no CUDA array): cudaPitchedPtr{ptr, pitch, xsize,
  ysize} describes each side, a slice being `ysize` rows of `pitch` bytes; cudaExtent{width in
  bytes, height in rows, depth in slices}; positions are left at 0 (the pointers are offset
  instead). Written to the CUDA Runtime API documentation and run only on the host twin so far.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import sys
import threading
from abc import ABC, abstractmethod

import numpy as np

from ...errors import BackendUnavailable, GptExportError

ALIGN = 256  # cudaMalloc returns 256-byte aligned memory; the host twin aligns its buffers the same

# Linux's madvise(2), for HostMemory (elsewhere discarded bytes stay as they were, pages as they are)
PAGE, MADV_DONTNEED, MADV_NOHUGEPAGE = mmap.PAGESIZE, 4, 15
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform == "linux" else None
except (OSError, AttributeError):
    _madvise = None


def _advise(ptr: int, nbytes: int, advice: int) -> None:
    """madvise the whole pages inside [ptr, ptr + nbytes); advice only: a refusal changes nothing we rely on."""
    start, end = -(-ptr // PAGE) * PAGE, (ptr + nbytes) // PAGE * PAGE
    if end > start and _madvise is not None:
        _madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


class DeviceMemory(ABC):
    """Buffers addressed by integer pointers, and the one stream every copy and run goes on."""

    ort_device: str  # ONNX Runtime's device_type for IOBinding.bind_input/bind_output: "cpu" or "cuda"
    stream_handle: int = 0  # the cudaStream_t as an int (0 on the host); what ORT and TensorRT are given

    def __init__(self):
        self.sizes: dict[int, int] = {}  # base pointer -> bytes, of every live allocation
        self._bases: list[int] = []  # the same base pointers, sorted: which allocation holds a pointer
        # the table is read by every thread's checks and changed by any thread's allocation: a free
        # between another thread's bisect and its read of the list would hand it a wrong base
        self._table = threading.Lock()
        # One stream is shared by all of a runner's caches, so a step (upload, run, append, download,
        # synchronize) must not interleave with another thread's. Host memory has no stream: no lock.
        self.lock = contextlib.nullcontext()

    # ---- what each implementation provides ----

    @abstractmethod
    def _malloc(self, nbytes: int) -> int: ...

    @abstractmethod
    def _free(self, ptr: int) -> None: ...

    @abstractmethod
    def _memset0(self, ptr: int, nbytes: int) -> None: ...

    def _malloc_zeroed(self, nbytes: int) -> int:
        ptr = self._malloc(nbytes)
        self._memset0(ptr, nbytes)
        return ptr

    @abstractmethod
    def _upload(self, dst: int, src: int, nbytes: int) -> None: ...

    @abstractmethod
    def _download(self, dst: int, src: int, nbytes: int) -> None: ...

    @abstractmethod
    def _copy3d(self, dst: int, dpitch: int, dslice: int, src: int, spitch: int, sslice: int,
                width: int, height: int, depth: int) -> None:
        """Both ranges already checked to lie inside allocations; slices are whole rows apart."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait until everything queued on the stream has finished."""

    # ---- the checked interface the runners use ----

    def allocate(self, nbytes: int) -> int:
        return self._record(self._malloc(max(int(nbytes), 1)), nbytes)

    def _record(self, ptr: int, nbytes: int) -> int:
        with self._table:
            self.sizes[ptr] = int(nbytes)
            bisect.insort(self._bases, ptr)
        return ptr

    def allocate_zeroed(self, nbytes: int, small_pages: bool = False) -> int:
        """An allocation filled with zeros (on CUDA, by the time queued work reads it). `small_pages`:
        host memory committed a base page at a time as it is written (see HostMemory)."""
        ptr = self._record(self._malloc_zeroed(max(int(nbytes), 1)), nbytes)
        if small_pages:
            self._small_pages(ptr, nbytes)
        return ptr

    def _small_pages(self, ptr: int, nbytes: int) -> None:
        return None  # device memory is committed whole

    def free(self, ptr: int) -> None:
        """Free an allocation: `ptr` must be what allocate() returned."""
        with self._table:
            self.sizes.pop(ptr)
            self._bases.remove(ptr)
        self._free(ptr)

    def zero(self, ptr: int, nbytes: int) -> None:
        self._check(ptr, 0, nbytes)
        self._memset0(ptr, nbytes)

    def discard(self, ptr: int, nbytes: int) -> None:
        """What these bytes hold is not needed any more: afterwards they read as zeros or as they
        were (host memory gives their whole pages back, committed again when next written)."""
        self._check(ptr, 0, nbytes)
        self._discard(ptr, nbytes)

    def _discard(self, ptr: int, nbytes: int) -> None:
        return None  # device memory stays as it is (and committed)

    def upload(self, dst: int, array: np.ndarray) -> None:
        """Copy a C-contiguous host array to the start of buffer `dst` (queued on the stream)."""
        self._check(dst, 0, _contiguous(array).nbytes)
        self._upload(dst, array.ctypes.data, array.nbytes)

    def download(self, array: np.ndarray, src: int) -> None:
        """Copy the start of buffer `src` into a C-contiguous host array; valid after synchronize()."""
        self._check(src, 0, _contiguous(array).nbytes)
        self._download(array.ctypes.data, src, array.nbytes)

    def copy3d(self, dst: int, src: int, plan) -> None:
        """cudaMemcpy3D's contract between linear buffers (see batchcache.Copy3D): `plan.depth` slices
        of `plan.height` rows of `plan.width` bytes, from src + plan.src_offset to dst + plan.dst_offset."""
        p = plan
        if p.depth == 0 or p.height == 0 or p.width == 0:
            return
        if p.dslice % p.dpitch or p.sslice % p.spitch or p.width > min(p.dpitch, p.spitch):
            raise GptExportError(f"internal error: a 3-D copy needs whole rows per slice and rows wider than {p.width}")
        self._check(dst, p.dst_offset, (p.depth - 1) * p.dslice + (p.height - 1) * p.dpitch + p.width)
        self._check(src, p.src_offset, (p.depth - 1) * p.sslice + (p.height - 1) * p.spitch + p.width)
        self._copy3d(dst + p.dst_offset, p.dpitch, p.dslice, src + p.src_offset, p.spitch, p.sslice,
                     p.width, p.height, p.depth)

    def check_tensor(self, ptr: int, shape: tuple, dtype) -> None:
        """A tensor of `shape` and `dtype` at `ptr` lies inside one allocation (what a runner checks
        before binding it: ONNX Runtime and TensorRT read and write whatever the shape spans)."""
        self._check(ptr, 0, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)

    def close(self) -> None:
        """Free every allocation still live."""
        for ptr in list(self.sizes):
            self.free(ptr)

    def base_of(self, ptr: int) -> int:
        """The allocation `ptr` points into (its base pointer)."""
        with self._table:
            i = bisect.bisect_right(self._bases, ptr) - 1
            if i >= 0 and ptr < self._bases[i] + max(self.sizes[self._bases[i]], 1):
                return self._bases[i]
        raise GptExportError(f"internal error: {ptr:#x} is not in a buffer of this {type(self).__name__}")

    def _check(self, ptr: int, offset: int, nbytes: int) -> None:
        base = self.base_of(ptr)
        start, size = ptr - base + offset, self.sizes.get(base, 0)
        if offset < 0 or start + nbytes > size:
            raise GptExportError(f"internal error: bytes {start}..{start + nbytes} are outside a buffer of {size}")


def _contiguous(array: np.ndarray) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise GptExportError("internal error: host arrays given to device memory must be C-contiguous")
    return array


# ---- the host twin -------------------------------------------------------------------------------

class HostMemory(DeviceMemory):
    """DeviceMemory in host RAM: what the CPU provider binds, and what CI runs the GPU code paths on."""

    ort_device = "cpu"

    def __init__(self):
        super().__init__()
        # pointer -> (the numpy storage that keeps it alive, that storage's own address)
        self._owners: dict[int, tuple[np.ndarray, int]] = {}

    def _malloc(self, nbytes: int, make=np.empty) -> int:
        raw = make(nbytes + ALIGN, np.uint8)
        base = raw.ctypes.data
        ptr = base + (-base) % ALIGN
        self._owners[ptr] = (raw, base)
        return ptr

    def _malloc_zeroed(self, nbytes: int) -> int:
        # np.zeros of a large array is calloc: the OS maps zero pages lazily, so the masked, never
        # written slots of a cache cost no memory and are cheap to read (numpy's own zeros, which
        # the OrtValue binding's HostCache uses, behave the same); a memset would touch every page
        return self._malloc(nbytes, np.zeros)

    def _free(self, ptr: int) -> None:
        del self._owners[ptr]

    def _memset0(self, ptr: int, nbytes: int) -> None:
        ctypes.memset(ptr, 0, nbytes)

    def _discard(self, ptr: int, nbytes: int) -> None:
        # the whole pages inside the range back to the OS (they read as zeros after): a cache row's
        # pages then cost nothing until a later sequence writes them
        _advise(ptr, nbytes, MADV_DONTNEED)

    def _small_pages(self, ptr: int, nbytes: int) -> None:
        # numpy asks for transparent huge pages on large arrays: a write anywhere in 2 MB would
        # commit all of it, a cache row at block_size whole (GPT-2: 72 MB a row, its first position
        # written); base pages commit 4 KB at a time, what the row holds
        _advise(ptr, nbytes, MADV_NOHUGEPAGE)

    def _upload(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def _download(self, dst: int, src: int, nbytes: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def _copy3d(self, dst: int, dpitch: int, dslice: int, src: int, spitch: int, sslice: int,
                width: int, height: int, depth: int) -> None:
        # overlapping rows (a cache's row moved within its own block) never share bytes: copyto is safe
        np.copyto(self._slices(dst, dpitch, dslice, width, height, depth),
                  self._slices(src, spitch, sslice, width, height, depth))

    def _slices(self, ptr: int, pitch: int, slice_: int, width: int, height: int, depth: int) -> np.ndarray:
        """`depth` slices, `slice_` bytes apart, of `height` rows of `width` bytes, `pitch` bytes apart,
        from `ptr`: a strided view of the storage of the buffer it points into (numpy checks the
        view stays inside that storage)."""
        raw, raw_address = self._owners[self.base_of(ptr)]
        return np.ndarray((depth, height, width), np.uint8, raw, ptr - raw_address, (slice_, pitch, 1))

    def view(self, ptr: int, shape: tuple, dtype) -> np.ndarray:
        """A numpy array over the buffer at `ptr` (for runners that run the graph on host arrays)."""
        self.check_tensor(ptr, shape, dtype)
        raw, raw_address = self._owners[self.base_of(ptr)]
        return np.ndarray(shape, dtype, raw, ptr - raw_address)

    def synchronize(self) -> None:
        pass  # host copies are done when they return


# ---- CUDA, through cuda-python -----------------------------------------------------------------------

GPU_INSTALL_HINT = "pip install 'gptexport[gpu]' (onnxruntime-gpu and cuda-python; see docs/tensorrt.md)"


def import_cudart():
    """cuda-python's runtime module (cuda.bindings.runtime; `from cuda import cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendUnavailable(f"cuda-python is not installed (the GPU backends manage device memory "
                                     f"through it): {GPU_INSTALL_HINT}") from None
    return runtime


def cuda_call(cudart, result, what: str, error: type = GptExportError):
    """Unwrap a cuda-python call's (error, *values) tuple, raising `error` on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise error(f"CUDA {what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values) if values else None


def current_device(cudart):
    """Name and compute capability of the current CUDA device; BackendUnavailable without one."""
    from ...artifacts.engine_record import DeviceInfo

    try:
        device = cuda_call(cudart, cudart.cudaGetDevice(), "cudaGetDevice", BackendUnavailable)
        props = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties", BackendUnavailable)
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{e}: no usable NVIDIA GPU (is the driver installed?)") from None
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.strip(), f"{props.major}.{props.minor}")


class CudaMemory(DeviceMemory):
    """DeviceMemory on the current CUDA device, every copy queued on one stream of its own."""

    ort_device = "cuda"

    def __init__(self, cudart=None):
        super().__init__()
        self.rt = rt = cudart or import_cudart()
        try:
            count = cuda_call(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount", BackendUnavailable)
        except BackendUnavailable as e:
            raise BackendUnavailable(f"{e}: no usable NVIDIA GPU and driver here") from None
        if not count:
            raise BackendUnavailable("no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
        # A non-blocking stream, as ONNX Runtime and trtexec create theirs: it never synchronizes
        # implicitly with the legacy default stream, which would also break graph capture on it.
        self.stream = self._call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.stream_handle = int(self.stream)  # the handle's value: what ORT's user_compute_stream and TensorRT take
        self.lock = threading.Lock()
        self._kinds = rt.cudaMemcpyKind

    def _call(self, result, what: str):
        return cuda_call(self.rt, result, what)

    def _malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), "cudaMalloc"))

    def _free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def _memset0(self, ptr: int, nbytes: int) -> None:
        self._call(self.rt.cudaMemsetAsync(ptr, 0, nbytes, self.stream), "cudaMemsetAsync")

    def _upload(self, dst: int, src: int, nbytes: int) -> None:
        kind = self._kinds.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def _download(self, dst: int, src: int, nbytes: int) -> None:
        kind = self._kinds.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def _copy3d(self, dst: int, dpitch: int, dslice: int, src: int, spitch: int, sslice: int,
                width: int, height: int, depth: int) -> None:
        rt = self.rt
        params = rt.cudaMemcpy3DParms()
        params.srcPtr = self._pitched(src, spitch, sslice // spitch)
        params.dstPtr = self._pitched(dst, dpitch, dslice // dpitch)
        extent = rt.cudaExtent()
        extent.width, extent.height, extent.depth = width, height, depth
        params.extent = extent
        params.kind = self._kinds.cudaMemcpyDeviceToDevice
        self._call(rt.cudaMemcpy3DAsync(params, self.stream), "cudaMemcpy3DAsync")

    def _pitched(self, ptr: int, pitch: int, rows: int):
        p = self.rt.cudaPitchedPtr()
        p.ptr, p.pitch, p.xsize, p.ysize = ptr, pitch, pitch, rows
        return p

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        self.synchronize()  # nothing queued may still read what is freed
        super().close()
        self._call(self.rt.cudaStreamDestroy(self.stream), "cudaStreamDestroy")

    # ---- CUDA graphs of work queued on the stream (TensorRT's decode) ----

    def begin_capture(self) -> None:
        """Start recording the stream's work into a graph instead of running it. Thread-local mode:
        only CUDA calls of this thread are affected (TensorRT's samples capture the same way)."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._call(self.rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, recorded_ok: bool):
        """Stop recording; the instantiated graph, or None if recording or instantiation failed.

        cudaStreamEndCapture returns a NULL graph when the capture was invalidated (a call that is
        not allowed while capturing); TensorRT's enqueue returns False when it could not record.
        Either way the error state is cleared with cudaGetLastError, as trtexec does, so the stream
        stays usable for plain launches.
        """
        err, graph = self.rt.cudaStreamEndCapture(self.stream)
        captured = err == self.rt.cudaError_t.cudaSuccess and graph is not None and int(graph) != 0
        if not (captured and recorded_ok):
            if captured:
                self.rt.cudaGraphDestroy(graph)
            self.rt.cudaGetLastError()
            return None
        err, graph_exec = self.rt.cudaGraphInstantiate(graph, 0)
        self.rt.cudaGraphDestroy(graph)  # the executable graph keeps what it needs
        if err != self.rt.cudaError_t.cudaSuccess:
            self.rt.cudaGetLastError()
            return None
        return graph_exec

    def launch(self, graph_exec) -> None:
        self._call(self.rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec) -> None:
        self._call(self.rt.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")


def open_memory(ort_device: str) -> DeviceMemory:
    """The memory core for a device: HostMemory for "cpu", CudaMemory (needs cuda-python and a GPU) for "cuda"."""
    return HostMemory() if ort_device == "cpu" else CudaMemory()

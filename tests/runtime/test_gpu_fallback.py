"""No silent fallback, tested with the real onnxruntime-gpu wheel on a machine without CUDA.

The GPU wheel lists CUDAExecutionProvider and TensorrtExecutionProvider here, but neither can start
(no CUDA libraries, no driver): ONNX Runtime then runs on the CPU provider (CUDA) or prints to
stdout and retries on it (TensorRT). gptexport must stop instead: exit 1, one `error:` line on
stderr naming the provider and what ONNX Runtime reported, nothing on stdout.

The wheel is installed beside the CPU one, git-ignored, and put first on PYTHONPATH for a subprocess:
    .venv/bin/pip install --no-deps --target .venv/ort-gpu onnxruntime-gpu==1.31.1
Without it these tests are skipped, unless GPTEXPORT_TEST_STRICT=1 (then they fail).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_unless_strict

ROOT = Path(__file__).resolve().parents[2]
ORT_GPU = Path(os.environ.get("GPTEXPORT_ORT_GPU", ROOT / ".venv" / "ort-gpu"))
INSTALL = f"{sys.executable} -m pip install --no-deps --target {ORT_GPU} onnxruntime-gpu==1.31.1"


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


@pytest.fixture(scope="module")
def gpu_wheel_env() -> dict:
    if not (ORT_GPU / "onnxruntime" / "__init__.py").is_file():
        skip_unless_strict(f"the onnxruntime-gpu wheel is not installed in {ORT_GPU}; install it with: {INSTALL}")
    if _has_nvidia_gpu():
        pytest.skip("this machine has an NVIDIA GPU: the no-fallback test needs one where CUDA cannot start")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ORT_GPU), *filter(None, [os.environ.get("PYTHONPATH")])])}
    probe = subprocess.run([sys.executable, "-c", "import onnxruntime as o; print(o.__file__); "
                            "print(','.join(o.get_available_providers()))"],
                           capture_output=True, text=True, env=env, timeout=120, check=True)
    where, providers = probe.stdout.split()
    assert Path(where).is_relative_to(ORT_GPU), where  # the subprocesses really import the GPU wheel
    assert {"CUDAExecutionProvider", "TensorrtExecutionProvider"} <= set(providers.split(","))  # listed...
    return env


@pytest.mark.parametrize("backend,provider", [("ort-cuda", "CUDAExecutionProvider"),
                                              ("ort-tensorrt", "TensorrtExecutionProvider")])
def test_a_gpu_provider_that_cannot_start_is_an_error(gpu_wheel_env, tiny_model_dir, backend, provider):
    """...but cannot start: exit 1, one line naming the provider and the library ONNX Runtime could not load."""
    proc = subprocess.run([sys.executable, "-m", "gptexport", "generate", str(tiny_model_dir), "--backend", backend,
                           "--prompt", "To be", "--max-new-tokens", "5"],
                          capture_output=True, text=True, env=gpu_wheel_env, timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(rf"error: ONNX Runtime \S+ could not start {provider}", lines[0]), lines[0]
    assert re.search(r"libonnxruntime_providers_\w+\.so: lib\S+\.so\.\d+: cannot open shared object file", lines[0])
    assert "Traceback" not in proc.stderr and "EP Error" not in proc.stderr

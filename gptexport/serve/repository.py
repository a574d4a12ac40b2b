"""`gptexport triton OUTDIR -o REPO`: a self-contained Triton model repository for a model directory.

    REPO/
      README.md            how to start it and a request
      NAME/
        config.pbtxt       Python backend, decoupled, TensorRT-LLM's tensor names, instance group
        1/
          model.py         a two-line shim over gptexport.serve.model
          gptexport.json, model.onnx, ...   the model directory's files, hashes checked at load

The repository is written as `convert` writes OUTDIR (staged beside REPO, renamed at the end;
an existing REPO needs --force), so it is never half-written and can be copied as is.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .. import __version__
from ..artifacts.files import staging_dir
from ..artifacts.modeldir import MANIFEST, ModelDir, load_model_dir
from ..errors import ModelDirError, UsageError
from ..runtime.scheduler import PREFILL_CHUNK
from ..runtime.session import DEFAULT_MAX_BATCH
from .chat_template import check_fits, template_source, write_template
from .protocol import INPUTS, OUTPUTS, TensorSpec, tensors

# --backend -> (the runner the model opens, Triton's instance kind)
BACKENDS = {"onnxruntime": "KIND_CPU", "ort-cuda": "KIND_GPU", "tensorrt": "KIND_GPU"}
DEFAULT_MAX_TOKENS = 1024
VERSION = "1"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

SHIM = '''"""Triton Python-backend model written by `gptexport triton`: gptexport serves it
(gptexport/serve/model.py)."""

try:
    from gptexport.serve.model import TritonPythonModel  # noqa: F401
except ImportError as e:
    raise ImportError(f"gptexport is not installed in the Python of Triton's Python backend ({e}); "
                      "pip install gptexport=={version} there") from e
'''


def write_repository(model_dir: str | Path, out: str | Path, name: str | None = None, instances: int = 1,
                     backend: str = "onnxruntime", max_tokens: int = DEFAULT_MAX_TOKENS, force: bool = False,
                     max_batch: int = DEFAULT_MAX_BATCH, chat_template: str | None = None,
                     prefill_chunk: int = PREFILL_CHUNK, max_cache_mb: float | None = None) -> Path:
    """Write a Triton model repository serving `model_dir` at `out`; returns `out`. `chat_template`:
    a Jinja2 file or a shipped template's name, for the OpenAI front's /v1/chat/completions;
    `prefill_chunk`, `max_cache_mb`: each instance's scheduler's (None: default_cache_mb at start)."""
    out = Path(out)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} for Triton; valid: {', '.join(BACKENDS)}")
    if instances < 1:
        raise UsageError(f"--instances must be >= 1, got {instances}")
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}")
    if prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    if max_cache_mb is not None and not max_cache_mb > 0:
        raise UsageError(f"--max-cache-mb must be > 0, got {max_cache_mb}")
    template = template_source(chat_template) if chat_template is not None else None
    md = load_model_dir(model_dir)  # every hash checked: a tampered model is not copied
    if template is not None:
        check_fits(template, md.tokenizer(), chat_template)
    name = name if name is not None else default_name(md.path)
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"--name {name!r}: a Triton model name is letters, digits, '_', '.' and '-', "
                         f"not starting with '.' or '-'")
    if backend == "tensorrt" and "tensorrt" not in md.manifest:
        raise ModelDirError(f"{md.path}: has no TensorRT engine; build one with `gptexport build {md.path}`")
    with staging_dir(out, force) as tmp:
        version_dir = tmp / name / VERSION
        version_dir.mkdir(parents=True)
        for f in (MANIFEST, *md.manifest["files"]):
            (version_dir / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(md.path / f, version_dir / f)
        (version_dir / "model.py").write_text(SHIM.replace("{version}", __version__))
        (tmp / name / "config.pbtxt").write_text(model_config(md, name, instances, backend, max_tokens, max_batch,
                                                                    prefill_chunk, max_cache_mb))
        if template is not None:
            write_template(template, tmp / name)
        (tmp / "README.md").write_text(readme(md, out, name, instances, backend, max_batch))
    return out


def default_name(model_dir: Path) -> str:
    """The model directory's folder name, made a valid Triton model name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", model_dir.resolve().name).lstrip(".-")
    return name or "gptexport"


def model_config(md: ModelDir, name: str, instances: int, backend: str, max_tokens: int,
                 max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK,
                 max_cache_mb: float | None = None) -> str:
    with_text = md.manifest.get("tokenizer") is not None

    def block(specs: tuple[TensorSpec, ...], optional: bool) -> str:
        rows = [f'  {{ name: "{s.name}" data_type: {s.triton_type} dims: [ {", ".join(map(str, s.dims))} ]'
                f'{" optional: true" if optional else ""} }}' for s in tensors(specs, with_text)]
        return ",\n".join(rows)

    return f'''# Written by gptexport {__version__} (`gptexport triton`) from {md.path.resolve()}.
# TensorRT-LLM's tensor names; see docs/serving.md. gptexport's own settings are the parameters.
name: "{name}"
backend: "python"
max_batch_size: 1  # Triton hands each request on alone; the instance's own scheduler batches them in flight
model_transaction_policy {{ decoupled: true }}
input [
{block(INPUTS, optional=True)}
]
output [
{block(OUTPUTS, optional=False)}
]
instance_group [ {{ count: {instances} kind: {BACKENDS[backend]} }} ]
parameters {{ key: "backend" value: {{ string_value: "{backend}" }} }}
parameters {{ key: "max_tokens" value: {{ string_value: "{max_tokens}" }} }}  # the most a request may ask for
# max_batch: sequences in flight per instance; more queue
parameters {{ key: "max_batch" value: {{ string_value: "{max_batch}" }} }}
# prefill_chunk: prompt tokens prefilled per step beside the running sequences' decode
parameters {{ key: "prefill_chunk" value: {{ string_value: "{prefill_chunk}" }} }}
# max_cache_mb: KV cache the running sequences may hold (more wait); empty: a quarter of RAM on the CPU
parameters {{ key: "max_cache_mb" value: {{ string_value: "{max_cache_mb or ''}" }} }}
parameters {{ key: "threads" value: {{ string_value: "0" }} }}  # per instance; 0: the cores, shared among instances
'''


def readme(md: ModelDir, out: Path, name: str, instances: int, backend: str, max_batch: int = DEFAULT_MAX_BATCH) -> str:
    with_text = md.manifest.get("tokenizer") is not None
    prompt = '"text_input": "ROMEO:"' if with_text else '"input_ids": [0, 1, 2]'
    return f"""# Triton model repository for `{name}`

Written by gptexport {__version__} from `{md.path.resolve()}`: one Python-backend model, decoupled
(streaming), {instances} instance(s) on `{backend}`, each running up to {max_batch} sequences in one
forward per step (in-flight batching; more requests wait in its queue). `{name}/1/` holds the model directory's files,
checked against their sha256 when the model loads, and a `model.py` that imports gptexport's.

## Start it

With gptexport installed (`pip install 'gptexport[serve]'`, then `pip install --no-deps
nvidia-pytriton==0.7.0` for a tritonserver; where the environment has numpy 2, its stub needs
numpy 1.26 of its own: `gptexport serve` prints the one pip command for it):

    gptexport serve {out}

Or in NVIDIA's Triton container, whose Python backend uses the container's Python (24.10's was
built for numpy 1.x, hence the pin; a later release may not need it):

    docker run --rm -p 8000:8000 -p 8001:8001 -v $PWD:/models nvcr.io/nvidia/tritonserver:24.10-py3 \\
        bash -c "pip install gptexport 'numpy<2' && tritonserver --model-repository=/models"

## Ask it

    curl -N -X POST localhost:8000/v2/models/{name}/generate_stream \\
        -d '{{{prompt}, "max_tokens": 100, "stream": true, "seed": 1337}}'

Inputs (TensorRT-LLM's names): {", ".join(s.name for s in tensors(INPUTS, with_text))}.
Outputs: {", ".join(s.name for s in tensors(OUTPUTS, with_text))}.
"""

"""The model directory: model.onnx (+ external data), gptexport.json, tokenizer files, engines.

gptexport.json describes everything the runtime needs (config, I/O spec, dtype, tokenizer) and
the sha256 of every file, checked on load so a tampered or truncated file is caught before use.
Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import GPTConfig, IOSpec, io_spec
from ..errors import ModelDirError, check_format
from .files import read_json, sha256_file, write_json_atomic

MANIFEST = "gptexport.json"
FORMAT = "gptexport-model"
# 2: past_length is one value per sequence ([batch]), so sequences at different lengths share a
# step (in-flight batching). A version-1 graph has one past_length for the batch: re-convert it.
FORMAT_VERSION = 2
ONNX_FILE = "model.onnx"


@dataclass
class ModelDir:
    path: Path
    manifest: dict
    config: GPTConfig
    spec: IOSpec

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.get("onnx", ONNX_FILE)

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def tokenizer(self):
        """The tokenizer the model was exported with, or None (raw token ids only); built once per
        ModelDir, as building a GPT-2 tokenizer hashes its files."""
        from .tokenizer import tokenizer_from_json

        if "_tokenizer" not in self.__dict__:
            d = self.manifest.get("tokenizer")
            self._tokenizer = None if d is None else tokenizer_from_json(d, self.path)
        return self._tokenizer


def load_model_dir(path: str | Path | ModelDir, verify: bool = True) -> ModelDir:
    """Read and check OUTDIR/gptexport.json; with `verify`, check every file's sha256.

    A ModelDir already loaded is returned as it is, so every API that takes a path takes one too.
    """
    if isinstance(path, ModelDir):
        return path
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a model directory (run `gptexport convert CKPT -o {path}` first)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelDirError(f"{mpath}: missing; {path} is not a gptexport model directory")
    manifest = read_json(mpath, "manifest", ModelDirError)
    hint = ""
    if isinstance(manifest, dict) and manifest.get("format_version") == 1:
        hint = (f"; it was written by an older gptexport whose graph has one past_length for the whole batch: "
                f"re-run `gptexport convert CKPT -o {path} --force`")
    check_format(manifest, mpath, "manifest", FORMAT, FORMAT_VERSION, ModelDirError, hint)
    try:
        config = GPTConfig(**manifest["config"])
        spec = IOSpec.from_dict(manifest["io_spec"])
        files = dict(manifest["files"])
        manifest["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    problem = _config_problem(config) or _spec_problem(spec, config) or _files_problem(files, manifest)
    if problem:
        raise ModelDirError(f"{mpath}: malformed manifest: {problem}")
    problem = _tokenizer_problem(manifest.get("tokenizer"), config)
    if problem:  # a hand-edited vocabulary fails here, not mid-stream at the first unknown id
        raise ModelDirError(f"{mpath}: {problem}")
    if verify:
        verify_files(path, files)
    return ModelDir(path, manifest, config, spec)


def _config_problem(config: GPTConfig) -> str | None:
    for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        v = getattr(config, k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return f"config {k}={v!r} is not a positive integer"
    if config.n_embd % config.n_head:
        return f"config n_embd={config.n_embd} is not divisible by n_head={config.n_head}"
    return None


def _spec_problem(spec: IOSpec, config: GPTConfig) -> str | None:
    """The spec must be the one export writes for this config (any dtype): names and dims."""
    # first: io_spec() of a forged, huge n_layer would not fit in memory
    if len(spec.inputs) != 3 + 2 * config.n_layer:
        return f"io_spec has {len(spec.inputs)} inputs, config n_layer={config.n_layer} needs {3 + 2 * config.n_layer}"
    want = io_spec(config)
    for side in ("inputs", "outputs"):
        got = [(t.name, t.shape) for t in getattr(spec, side)]
        if got != [(t.name, t.shape) for t in getattr(want, side)]:
            return f"io_spec {side} do not match config (n_layer={config.n_layer}, n_head={config.n_head}, ...)"
    names = ("float32", "float16", "bfloat16")
    if spec.cache_dtype not in names or any(t.dtype not in (*names, "int64") for t in (*spec.inputs, *spec.outputs)):
        return f"io_spec dtypes must be int64 or one of {', '.join(names)}"
    return None


def _tokenizer_problem(tokenizer: object, config: GPTConfig) -> str | None:
    """The tokenizer must fit the model, as convert checked (tokenizer.vocab_mismatch)."""
    from .tokenizer import GPT2_VOCAB_SIZE, vocab_mismatch

    if not isinstance(tokenizer, dict):
        return None  # None: raw token ids; anything else malformed is tokenizer_from_json's to report
    if tokenizer.get("type") == "char" and isinstance(tokenizer.get("itos"), list):
        return vocab_mismatch("char", len(tokenizer["itos"]), config.vocab_size)
    if tokenizer.get("type") == "gpt2":
        return vocab_mismatch("gpt2", GPT2_VOCAB_SIZE, config.vocab_size)
    return None


def _files_problem(files: dict, manifest: dict) -> str | None:
    for name, info in files.items():
        if not (isinstance(name, str) and name and isinstance(info, dict)
                and isinstance(info.get("sha256"), str) and type(info.get("bytes")) is int):
            return f"files entry {name!r} must map a file name to {{'sha256': str, 'bytes': int}}"
    onnx = manifest.get("onnx", ONNX_FILE)
    if not isinstance(onnx, str) or onnx not in files:
        return f"onnx {onnx!r} is not one of the listed files"
    return None


def verify_files(root: Path, files: dict) -> None:
    for name, info in files.items():
        f = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
            raise ModelDirError(f"{root / MANIFEST}: file entry {name!r} points outside the directory")
        if not f.is_file():
            raise ModelDirError(f"{f}: missing (listed in {MANIFEST})")
        try:
            size = f.stat().st_size
            if size != info["bytes"]:
                raise ModelDirError(f"{f}: {size} bytes, manifest says {info['bytes']} (truncated or replaced)")
            if sha256_file(f) != info["sha256"]:
                raise ModelDirError(f"{f}: sha256 does not match {MANIFEST} (file modified after export)")
        except OSError as e:
            raise ModelDirError(f"{f}: cannot read ({e.strerror or e})") from e


def file_records(root: Path) -> dict:
    """sha256 and size of every file under root except the manifest itself."""
    records = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        records[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return records


def add_files_to_manifest(model_dir: ModelDir, names: list[str], extra: dict | None = None) -> None:
    """Record new files (an engine, say) in the manifest after writing them into the directory."""
    manifest = dict(model_dir.manifest)
    files = dict(manifest["files"])
    for name in names:
        f = model_dir.path / name
        files[name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest["files"] = files
    manifest.update(extra or {})
    write_json_atomic(model_dir.path / MANIFEST, manifest)
    model_dir.manifest = manifest

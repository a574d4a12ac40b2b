"""The model directory: model.onnx (+ external data), gptexport.json, tokenizer files, engines.

gptexport.json describes everything the runtime needs (config, I/O spec, dtype, tokenizer) and
the sha256 of every file, checked on load so a tampered or truncated file is caught before use.
Never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import GPTConfig, IOSpec
from .errors import ModelDirError, UsageError

MANIFEST = "gptexport.json"
FORMAT = "gptexport-model"
FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        """The tokenizer the model was exported with, or None (raw token ids only)."""
        from .tokenizer import tokenizer_from_json

        d = self.manifest.get("tokenizer")
        return None if d is None else tokenizer_from_json(d, self.path)


def load_model_dir(path: str | Path, verify: bool = True) -> ModelDir:
    """Read and check OUTDIR/gptexport.json; with `verify`, check every file's sha256."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{path}: not a model directory (run `gptexport convert CKPT -o {path}` first)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelDirError(f"{mpath}: missing; {path} is not a gptexport model directory")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{mpath}: not a gptexport manifest (format must be {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelDirError(f"{mpath}: format_version {version!r} is not supported (this gptexport reads {FORMAT_VERSION})")
    try:
        config = GPTConfig(**manifest["config"])
        spec = IOSpec.from_dict(manifest["io_spec"])
        files = dict(manifest["files"])
        manifest["dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelDirError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
    if verify:
        verify_files(path, files)
    return ModelDir(path, manifest, config, spec)


def verify_files(root: Path, files: dict) -> None:
    for name, info in files.items():
        f = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelDirError(f"{root / MANIFEST}: file entry {name!r} points outside the directory")
        if not f.is_file():
            raise ModelDirError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != info["bytes"]:
            raise ModelDirError(f"{f}: {f.stat().st_size} bytes, manifest says {info['bytes']} (truncated or replaced)")
        if sha256_file(f) != info["sha256"]:
            raise ModelDirError(f"{f}: sha256 does not match {MANIFEST} (file modified after export)")


def file_records(root: Path) -> dict:
    """sha256 and size of every file under root except the manifest itself."""
    records = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        records[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return records


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


@contextmanager
def staging_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside out_dir, renamed onto it only if the block succeeds.

    An existing out_dir is refused unless `force`; with force it is replaced only at the end, so an
    interrupted run leaves either the old directory or none, never a half-written one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir}: already exists; pass --force to replace it")
    parent = out_dir.parent.resolve()
    if not parent.is_dir():
        raise ModelDirError(f"{out_dir}: parent directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as e:
        raise ModelDirError(f"{out_dir}: cannot write in {parent} ({e.strerror})") from None
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / "d")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

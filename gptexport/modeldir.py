"""The model directory: model.onnx (+ external data), gptexport.json, tokenizer files, engines.

gptexport.json describes everything the runtime needs (config, I/O spec, dtype, tokenizer) and
the sha256 of every file, checked on load so a tampered or truncated file is caught before use.
Never imports torch.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import GPTConfig, IOSpec, io_spec
from .errors import ModelDirError, UsageError, check_format

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
    check_format(manifest, mpath, "manifest", FORMAT, FORMAT_VERSION, ModelDirError)
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


# A hand-edited or fuzzed manifest must fail here, with its name, not deep inside a backend.

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


def _make_parents(out_dir: Path, parent: Path) -> list[Path]:
    """Create out_dir's missing parents, as `mkdir -p` would; return those created, outermost first."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()][::-1]
    for p in missing:
        try:
            p.mkdir()
        except OSError as e:
            _remove_empty(missing[:missing.index(p)])
            raise ModelDirError(f"{out_dir}: cannot create directory {p} ({e.strerror})") from None
    if not parent.is_dir():
        raise ModelDirError(f"{out_dir}: parent directory {parent} is not a directory")
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or already gone: leave it


@contextmanager
def staging_dir(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside out_dir, renamed onto it only if the block succeeds.

    An existing out_dir is refused unless `force`; with force it is swapped for the new one in
    one atomic rename at the end, so an interrupted run (even SIGKILL) leaves either the old
    directory or none, never a half-written one. A failed write (a full disk, say) is a
    ModelDirError naming out_dir. Temp dirs left by a killed run are removed by the next one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UsageError(f"{out_dir}: already exists; pass --force to replace it")
    parent = out_dir.parent.resolve()
    created = _make_parents(out_dir, parent)
    remove_stale_staging(out_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir, "partial"), dir=parent))
    except OSError as e:
        _remove_empty(created)
        raise ModelDirError(f"{out_dir}: cannot write in {parent} ({e.strerror})") from None
    try:
        yield tmp
        _make_public(tmp)
        if force and out_dir.exists():
            _replace_dir(tmp, out_dir)
        else:  # fails (ENOTEMPTY) if a concurrent convert created out_dir meanwhile: never clobber it
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # a failed convert leaves no trace, not even the parents it made
        if not isinstance(e, OSError):
            raise
        # ENOSPC, EFBIG, EACCES, EROFS... while writing: nothing is kept
        where = f" ({e.filename})" if e.filename else ""
        raise ModelDirError(f"{out_dir}: write failed: {e.strerror or e}{where}; "
                            f"{'the old directory is unchanged' if out_dir.exists() else 'nothing was written'}"
                            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Staging dirs are named .OUT.partial-PID-XXXX (and .OUT.old-PID-XXXX while swapping): the pid
# tells a leftover of a killed convert, safe to delete, from the live one of a concurrent convert.
_STAGING_RE = r"\.{name}\.(?:partial|old)-(\d+)-[^/]+"


def _staging_prefix(out_dir: Path, kind: str) -> str:
    return f".{out_dir.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process, alive
        return True
    return True


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete the staging dirs beside out_dir whose process is gone (killed mid-convert)."""
    pattern = re.compile(_STAGING_RE.format(name=re.escape(out_dir.name)))
    removed = []
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _make_public(path: Path) -> None:
    """mkdtemp makes the directory 0700; give the finished one mkdir's usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _replace_dir(new: Path, out_dir: Path) -> None:
    """Put `new` at out_dir and delete the old out_dir, without a moment where neither exists."""
    if not _exchange(new, out_dir):  # no renameat2: two renames, the old dir kept aside between them
        old = Path(tempfile.mkdtemp(prefix=_staging_prefix(out_dir, "old"), dir=out_dir.parent))
        os.replace(out_dir, old / "d")
        os.replace(new, out_dir)
        new = old
    shutil.rmtree(new, ignore_errors=True)  # after the swap, `new` holds the old directory


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the filesystem or kernel cannot exchange
    raise OSError(err, os.strerror(err), str(b))

"""File helpers every stage uses: hashing, atomic writes (fsync'd, then renamed), JSON read with a
one-line error, and the staging directory every writer of a directory goes through.

A reader never sees half a file or half a directory: a file is written beside its path, flushed to
disk and renamed onto it; a directory is built in a staging directory beside it and renamed at the
end (staging_dir). Never imports torch.
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
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import GptExportError, ModelDirError, UsageError, first_line


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into: beside it, flushed to disk, then renamed onto
    it, so a reader (or a crash) sees the old file or the new one, never half. OSError propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json(path: Path, what: str, error: type = GptExportError) -> dict:
    """A JSON object from `path` (a manifest, a record: `what`), or a one-line `error` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} is not a JSON object (got {type(data).__name__})")
    return data


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

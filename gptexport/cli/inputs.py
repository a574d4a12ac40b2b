"""Flags, files and standard input turned into library arguments; library errors into the CLI's words.

Everything here speaks the command line's language: its errors name the option (`--prompt-file
notes.txt`, `--prompt-tokens`), and `flag_error` rewords a library ParameterError (`top_k must
be ...`) as the flag the user typed (`--top-k must be ...`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..artifacts.tokenizer import check_token_ids, listed
from ..errors import GptExportError, ParameterError, TokenizerError, UsageError

STDIN = "-"  # a file argument that means standard input, as in Unix tools
# API parameter -> the flag that sets it, where the flag is not simply --the-parameter
FLAGS = {"prompt_ids": "--prompt-tokens", "max_new_tokens": "--max-new-tokens", "bad_words": "--bad-word",
         "stop_words": "--stop-word"}


def flag_error(e: ParameterError) -> UsageError:
    """A library ParameterError worded as the command line's flag."""
    return UsageError(e.worded(FLAGS.get(e.param, "--" + e.param.replace("_", "-"))))


def prompt_ids(prompt: str | None, prompt_file: Path | None, prompt_tokens: str | None, tokenizer,
               vocab_size: int) -> list[int]:
    """The prompt as token ids, from exactly one of --prompt, --prompt-file and --prompt-tokens
    (default: a newline, as nanoGPT's sample.py). Errors name the option (and file); typed ids
    are checked here, before the model loads, in the option's words."""
    given = [x is not None for x in (prompt, prompt_file, prompt_tokens)]
    if sum(given) > 1:
        raise UsageError("give only one of --prompt, --prompt-file and --prompt-tokens")
    if prompt_tokens is not None:
        ids = parse_token_ids(prompt_tokens)
        try:
            check_token_ids(ids, vocab_size)
        except UsageError as e:
            raise UsageError(f"--prompt-tokens: {e}") from None
        return ids
    from_file = prompt_file is not None
    source = f"--prompt-file {prompt_file}" if from_file else "--prompt"
    text = read_text_file(Path(prompt_file)) if from_file else prompt
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
    return ids  # the model's own tokenizer: its ids are the model's (load_model_dir checked the vocabularies)


def parse_token_ids(s: str) -> list[int]:
    """`--prompt-tokens 1,2,3` as [1, 2, 3]; ids must be non-negative integers (range: check_token_ids)."""
    parts = [p.strip() for p in s.split(",")]
    if not s.strip():
        raise UsageError("--prompt-tokens is empty; expected comma-separated token ids, e.g. 1,2,3")
    bad = [p for p in parts if not (p.isascii() and p.isdigit())]
    if bad:
        raise UsageError(f"--prompt-tokens: not token ids: {listed(bad)}; "
                         "expected comma-separated non-negative integers, e.g. 1,2,3")
    return [int(p) for p in parts]


def read_text_file(path: Path, what: str = "prompt file") -> str:
    """A user's UTF-8 text file, or standard input for `-`; any problem is one line naming it (exit 1)."""
    stdin = str(path) == STDIN
    if stdin:
        path = Path("<stdin>")
    try:
        return _stdin_bytes().decode("utf-8") if stdin else path.read_text(encoding="utf-8")
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


# ---- gptexport parity --------------------------------------------------------------------------

def parity_paths(paths: tuple[Path, ...], golden: Path | None) -> tuple[Path | None, Path]:
    """(CKPT, OUTDIR) from the command line: `CKPT OUTDIR`, or only `OUTDIR` with --golden."""
    usage = "--golden FILE OUTDIR" if golden is not None else "CKPT OUTDIR"
    if len(paths) != (1 if golden is not None else 2):
        raise UsageError(f"expected `gptexport parity {usage}`, got {len(paths)} path(s)")
    return (None, paths[0]) if golden is not None else (paths[0], paths[1])


def prompt_sources(texts: tuple[str, ...], file: Path | None, token_lists: tuple[str, ...]) -> list | None:
    """Prompts from exactly one of --prompt (texts), --prompts FILE and --prompt-tokens; None: defaults."""
    if sum([bool(texts), file is not None, bool(token_lists)]) > 1:
        raise UsageError("give prompts with only one of --prompt, --prompts and --prompt-tokens")
    if file is not None:
        return read_prompts_file(file)
    if token_lists:
        return [parse_token_ids(t) for t in token_lists]
    return list(texts) or None


def read_prompts_file(path: str | Path) -> list[str]:
    """--prompts FILE: one prompt per line, blank lines skipped, a literal \\n stands for a newline."""
    path = Path(path)
    lines = read_text_file(path, "prompts file").splitlines()
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise GptExportError(f"{path}: prompts file has no prompts (one per line)")
    return prompts


def read_eval_text(path: Path) -> str:
    """--eval-text FILE of `gptexport quantize`."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read --eval-text ({getattr(e, 'strerror', None) or e})") from None


# ---- gptexport generate --prompts FILE ------------------------------------------------------------

def read_batch_file(path: Path):
    """--prompts FILE as BatchItems: one prompt per line (blank lines skipped, a literal \\n is a
    newline), or JSON Lines, when every non-blank line is a JSON object: {"prompt": ... or
    "prompt_tokens": [...], and any of the settings ("max_new_tokens", "temperature", "top_k",
    "stop_words", "logprobs", ...: params.SETTINGS)}. What a line does not set, the command's flags
    do. Errors name the file and line."""
    import json

    from ..runtime.batch import BatchItem

    lines = [(n, line) for n, line in enumerate(read_text_file(Path(path), "prompts file").splitlines(), 1)
             if line.strip()]
    if not lines:
        raise GptExportError(f"{path}: prompts file has no prompts (one per line, or JSON Lines)")
    records = []
    for _n, line in lines:
        try:
            record = json.loads(line) if line.lstrip().startswith("{") else None
        except json.JSONDecodeError:
            record = None
        records.append(record if isinstance(record, dict) else None)
    if all(r is not None for r in records):  # JSON Lines
        items = []
        for (n, _), record in zip(lines, records):
            try:
                items.append(BatchItem.from_dict(record))
            except ParameterError as e:
                raise GptExportError(f"{path} line {n}: {e}") from None
        return items, [n for n, _ in lines]
    if any(r is not None for r in records):
        n = next(n for (n, _), r in zip(lines, records) if r is None)
        raise GptExportError(f"{path} line {n}: not a JSON object, but other lines are: give JSON Lines or "
                             f"plain prompts, one per line")
    return [BatchItem(prompt=line.replace("\\n", "\n")) for _, line in lines], [n for n, _ in lines]

"""Shared fixtures: tiny real checkpoints in nanoGPT's format and their exported model directories; the
CLI run as a user runs it, with the checks every error case makes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

# ---- the CLI as a user runs it: exit code, one `error:` line, nothing left on disk ----


def cli(*args, input: str | bytes | None = None) -> Result:
    """The real `gptexport` command, in-process; `input` is its standard input."""
    from gptexport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_error(result: Result, code: int, *named: object) -> str:
    """Exit `code`, one `error:` line on stderr naming each of `named`, no traceback; returns the line."""
    # CliRunner turns an escaped exception into exit code 1 too: make sure it was a clean exit
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.output
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def staging_leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert staging_leftovers(out) == []


TINY_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ\n.,;:!?'-"))


def skip_unless_strict(reason: str) -> None:
    """Skip a test whose server or wheel is missing; with GPTEXPORT_TEST_STRICT=1 (CI), fail it instead."""
    if os.environ.get("GPTEXPORT_TEST_STRICT") == "1":
        pytest.fail(f"GPTEXPORT_TEST_STRICT=1 but this test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def library():
    """gptexport's kernel library (runtime/kernels), built or found built; skipped (failed under
    GPTEXPORT_TEST_STRICT=1) without a compiler or ONNX Runtime's headers."""
    from gptexport.runtime.kernels import build

    try:
        return build.ensure_library()
    except build.KernelsUnavailable as e:
        skip_unless_strict(f"the kernel library is unavailable: {e}")


def write_tiny_checkpoint(path: Path, seed: int = 0, meta: bool = True, **overrides) -> Path:
    """A randomly initialised GPT saved exactly as nanoGPT's train.py saves it (+ meta.pkl)."""
    import torch

    from gptexport.config import GPTConfig
    from gptexport.convert.model import GPT

    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=len(TINY_CHARS), dropout=0.0)
    args.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": args, "optimizer": None, "iter_num": 0,
                "best_val_loss": 9.9, "config": {"dataset": "tiny"}}, path)
    if meta:
        itos = dict(enumerate(TINY_CHARS))
        with open(path.parent / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(itos), "itos": itos, "stoi": {c: i for i, c in itos.items()}}, f)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt.pt")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_ckpt, tmp_path_factory) -> Path:
    from gptexport.convert.export import convert

    out = tmp_path_factory.mktemp("export") / "tiny"
    return convert(tiny_ckpt, out, progress=lambda msg: None)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    """The tiny model on ONNX Runtime's CPU provider, one thread, activated (the runtime tests')."""
    from gptexport.artifacts.modeldir import load_model_dir
    from gptexport.runtime.backends.ort import OrtRunner

    r = OrtRunner(load_model_dir(tiny_model_dir), threads=1)
    r.activate()
    yield r
    r.deactivate()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """The served model in-process (tests/serve)."""
    from gptexport.serve.model import open_served_model

    model = open_served_model(tiny_model_dir, "onnxruntime", max_tokens_limit=64)
    yield model
    model.close()


def full_forward(runner, ids: np.ndarray, all_positions: bool = True) -> dict:
    """Every output of one forward of `ids` (B, T) from an empty past (`runner.infer`, no cache): logits
    at every position, or with all_positions False at the last one only."""
    B, T, c = ids.shape[0], ids.shape[1], runner.config
    positions = np.arange(T, dtype=np.int64) if all_positions else np.array([T - 1], np.int64)
    feeds = {"input_ids": ids, "past_length": np.zeros(B, np.int64), "logit_positions": positions}
    feeds.update({n: np.zeros((B, c.n_head, 0, c.head_dim), runner.cache_dtype()) for n in runner.spec.past_names})
    return runner.infer(feeds)


def nanogpt_generate(runner, prompt, max_new_tokens: int, params, rng, notice=None, on_token=None,
                     record: list | None = None) -> np.ndarray:
    """nanoGPT's `generate`, the reference the engine is tested against: every token from a full forward
    of the context cropped to block_size (`runner.infer`, no KV cache), all rows of `prompt` (B, T)
    sampled together from one generator. `record` collects each step's (B, V) logits; `on_token(tokens)`
    returning True ends it there (B, steps so far)."""
    from gptexport.runtime.sampling import check_finite, next_token

    idx = np.asarray(prompt, np.int64)
    B, block = idx.shape[0], runner.config.block_size
    if idx.shape[1] > block and notice is not None:
        notice(f"notice: prompt has {idx.shape[1]} tokens, more than block_size {block}")
    out = []
    for _ in range(max_new_tokens):
        logits = full_forward(runner, idx[:, -block:], all_positions=False)["logits"][:, -1]
        check_finite(logits, runner.name)
        if record is not None:
            record.append(np.array(logits, np.float64))
        token = next_token(logits, params, rng)
        out.append(token)
        idx = np.concatenate([idx, token[:, None]], axis=1)
        if on_token is not None and on_token(token):
            break
    return np.stack(out, axis=1) if out else np.empty((B, 0), np.int64)


def engine_generate(runner, prompt, max_new_tokens: int, params, seed: int = 0, max_batch: int | None = None):
    """Each row of `prompt` (B, T) as a sequence of the generation engine (the scheduler), seeded `seed`:
    (B, max_new_tokens) tokens."""
    from gptexport.runtime.params import GenerationParams
    from gptexport.runtime.scheduler import Sequence, run_to_end

    seqs = [Sequence(row.tolist(), GenerationParams(max_new_tokens, params, seed), notice=lambda m: None)
            for row in np.asarray(prompt, np.int64)]
    return np.array([seq.tokens for seq in run_to_end(runner, seqs, max_batch)], np.int64).reshape(len(seqs), -1)

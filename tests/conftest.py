"""Shared fixtures: tiny real checkpoints in nanoGPT's format and their exported model directories; the
CLI run as a user runs it, with the checks every error case makes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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
def served(tiny_model_dir):
    """The served model in-process (tests/serve)."""
    from gptexport.serve.model import open_served_model

    model = open_served_model(tiny_model_dir, "onnxruntime", max_tokens_limit=64)
    yield model
    model.close()

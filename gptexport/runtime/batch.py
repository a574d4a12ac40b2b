"""Offline batch generation: many prompts through the scheduler at once, results in input order.

`gptexport generate OUTDIR --prompts FILE` and `generate_batch` from Python. Each item is exactly
one `gptexport generate` run, its own prompt and settings (the defaults are the command's flags,
or the library's): the scheduler runs up to max_batch of them in one forward per step, so the
batch takes far less time than the items one after another, and each item's tokens are those it
gets alone with the same seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..artifacts.modeldir import ModelDir
from ..errors import ParameterError
from .params import SETTINGS, GenerationParams
from .session import DEFAULT_MAX_BATCH, GenerationSession, Sample, opened, outcome_of

PROMPT_KEYS = ("prompt", "prompt_ids", "prompt_tokens")  # prompt_tokens: prompt_ids' name in a JSON line


@dataclass(frozen=True)
class BatchItem:
    """One prompt (text, encoded by the model's tokenizer, or token ids) and the settings it sets
    (params.SETTINGS' names); what it leaves unset, the batch's params say."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    settings: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, record: dict) -> "BatchItem":
        """A JSON Lines record ({"prompt": ..., "temperature": ...})."""
        known = (*PROMPT_KEYS, *SETTINGS)
        unknown = sorted(set(record) - set(known))
        if unknown:
            raise ParameterError(unknown[0], f"is not a setting of an item; valid: {', '.join(sorted(known))}")
        ids = record.get("prompt_tokens", record.get("prompt_ids"))
        return cls(record.get("prompt"), ids, {k: v for k, v in record.items() if k not in PROMPT_KEYS})

    def ids(self, session: GenerationSession) -> list[int]:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ParameterError("prompt", "or prompt_tokens: give exactly one")
        if self.prompt_ids is not None:
            if not isinstance(self.prompt_ids, list) or not all(type(i) is int for i in self.prompt_ids):
                raise ParameterError("prompt_tokens", f"must be a list of token ids, got {self.prompt_ids!r}")
            return list(self.prompt_ids)
        if not isinstance(self.prompt, str):
            raise ParameterError("prompt", f"must be a string, got {self.prompt!r}")
        return session.encode(self.prompt)


@dataclass
class BatchProgress:
    """What a progress display shows: sequences done of all, tokens generated, seconds so far."""

    done: int
    total: int
    tokens: int
    seconds: float


def generate_batch(model: str | Path | ModelDir | GenerationSession, items: list[BatchItem], *,
                   params: GenerationParams = GenerationParams(), max_batch: int = DEFAULT_MAX_BATCH,
                   backend: str = "onnxruntime", threads: int | None = None,
                   on_result: Callable[[int, Sample], None] | None = None,
                   progress: Callable[[BatchProgress], None] | None = None) -> list[Sample]:
    """Generate every item, up to `max_batch` at once; returns the samples in input order.

    Each item runs with `params` and its own settings set on top. `model`: a model directory,
    or a GenerationSession already open (its own max_batch and backend then). `on_result(i,
    sample)` is called for each item in input order as soon as it and every item before it are
    done (so results can be written out while the rest still run). An item whose settings are
    invalid raises a ParameterError naming `items[i].setting` before anything runs.
    """
    with opened(model, backend, threads, max_batch) as session:
        prepared = []
        for i, item in enumerate(items):
            try:
                prepared.append((item.ids(session), session.params(item.settings, params)))
            except ParameterError as e:
                raise ParameterError(f"items[{i}].{e.param}", e.problem) from None
        sequences = [session.submit(ids, item_params) for ids, item_params in prepared]
        return _collect(session, sequences, on_result, progress)


def _collect(session: GenerationSession, sequences: list, on_result, progress) -> list[Sample]:
    """Step the scheduler until every sequence is done, reporting results in input order."""
    samples: list[Sample | None] = [None] * len(sequences)
    t0, reported, tokens = time.perf_counter(), 0, 0
    while reported < len(sequences):
        if session.scheduler.busy:
            session.scheduler.step()
        while reported < len(sequences) and sequences[reported].done.is_set():
            seq = sequences[reported]
            outcome = outcome_of(seq)
            samples[reported] = Sample(outcome.tokens, session.decode(outcome.tokens), outcome.finish,
                                       outcome.logprobs if seq.params.logprobs else None)
            tokens += len(outcome.tokens)
            if on_result is not None:
                on_result(reported, samples[reported])
            reported += 1
        if progress is not None:
            done = sum(s.done.is_set() for s in sequences)
            progress(BatchProgress(done, len(sequences), tokens + sum(len(s.tokens) for s in sequences[reported:]),
                                   time.perf_counter() - t0))
    return samples

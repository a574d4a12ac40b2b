"""Offline batch generation: many prompts through the scheduler at once, results in input order.

`gptexport generate OUTDIR --prompts FILE` and `generate_batch` from Python. Each item is exactly
one `gptexport generate` run, its own prompt and settings (the defaults are the command's flags,
or the library's): the scheduler runs up to max_batch of them in one forward per step, so the
batch takes far less time than the items one after another, and each item's tokens are those it
gets alone with the same seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from ..artifacts.modeldir import ModelDir
from ..errors import ParameterError
from .sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, DEFAULT_SEED, SamplingParams
from .params import GenerationParams
from .session import DEFAULT_MAX_BATCH, GenerationSession, Sample, outcome_of


@dataclass(frozen=True)
class BatchItem:
    """One prompt and the settings it runs with; text items are encoded by the model's tokenizer."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_SAMPLING.temperature
    top_k: int | None = DEFAULT_SAMPLING.top_k
    top_p: float | None = DEFAULT_SAMPLING.top_p
    seed: int = DEFAULT_SEED
    stop_words: tuple[str, ...] = field(default=())
    min_tokens: int = 0
    end_id: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bad_words: tuple[str, ...] = field(default=())
    logprobs: bool = False

    @classmethod
    def from_dict(cls, record: dict, defaults: "BatchItem | None" = None) -> "BatchItem":
        """A JSON Lines record ({"prompt": ..., "temperature": ...}); unset keys take `defaults`'."""
        known = {f.name for f in fields(cls)} | {"prompt_tokens"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ParameterError(unknown[0], f"is not a setting of an item; valid: {', '.join(sorted(known))}")
        record = dict(record)
        if "prompt_tokens" in record:
            record["prompt_ids"] = record.pop("prompt_tokens")
        base = {f.name: getattr(defaults or cls(), f.name) for f in fields(cls)}
        if "prompt" in record or "prompt_ids" in record:  # an item's prompt replaces the default's
            base["prompt"] = base["prompt_ids"] = None
        base.update(record)
        base["stop_words"] = tuple(base["stop_words"] or ())
        base["bad_words"] = tuple(base["bad_words"] or ())
        return cls(**base)

    def params(self, session: GenerationSession) -> GenerationParams:
        return GenerationParams(self.max_new_tokens, SamplingParams(self.temperature, self.top_k, self.top_p),
                                self.seed, self.stop_words, self.min_tokens, self.end_id, self.repetition_penalty,
                                self.presence_penalty, self.frequency_penalty, session.encode_words(self.bad_words),
                                logprobs=self.logprobs)

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


def generate_batch(model_dir: str | Path | ModelDir, items: list[BatchItem], *, max_batch: int = DEFAULT_MAX_BATCH,
                   backend: str = "onnxruntime", threads: int | None = None,
                   on_result: Callable[[int, Sample], None] | None = None,
                   progress: Callable[[BatchProgress], None] | None = None, **runner_options) -> list[Sample]:
    """Generate every item, up to `max_batch` at once; returns the samples in input order.

    `on_result(i, sample)` is called for each item in input order as soon as it and every item
    before it are done (so results can be written out while the rest still run). An item whose
    settings are invalid raises a ParameterError naming `items[i].setting` before anything runs.
    """
    with GenerationSession.open(model_dir, backend, threads, max_batch, **runner_options) as session:
        prepared = []
        for i, item in enumerate(items):
            try:
                prepared.append((item.ids(session), item.params(session)))
            except ParameterError as e:
                raise ParameterError(f"items[{i}].{e.param}", e.problem) from None
        sequences = [session.submit(ids, params) for ids, params in prepared]
        samples: list[Sample | None] = [None] * len(items)
        t0, reported, tokens = time.perf_counter(), 0, 0
        while reported < len(items):
            if session.scheduler.busy:
                session.scheduler.step()
            while reported < len(items) and sequences[reported].done.is_set():
                outcome = outcome_of(sequences[reported])
                samples[reported] = Sample(outcome.tokens, session.decode(outcome.tokens), outcome.finish,
                                           outcome.logprobs if items[reported].logprobs else None)
                tokens += len(outcome.tokens)
                if on_result is not None:
                    on_result(reported, samples[reported])
                reported += 1
            if progress is not None:
                done = sum(s.done.is_set() for s in sequences)
                progress(BatchProgress(done, len(items), tokens + sum(len(s.tokens) for s in sequences[reported:]),
                                       time.perf_counter() - t0))
    return samples

"""Prompts of every length beside running sequences: chunked prefill, the cache that follows the
lengths there are, and admission bounded by the KV cache's bytes (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest
from test_scheduler import alone, assert_same_as_alone

from gptexport.errors import ParameterError
from gptexport.runtime.backends.batchcache import BatchCache
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.scheduler import Scheduler, Sequence, StepBudget

GREEDY = SamplingParams(0.0)


def first_token_steps(s: Scheduler, seqs: list[Sequence], limit: int = 200) -> dict[int, int]:
    """Step until all are done; the step at which each sequence had its first token."""
    first: dict[int, int] = {}
    for step in range(limit):
        if not s.busy:
            break
        s.step()
        for i, seq in enumerate(seqs):
            if seq.tokens and i not in first:
                first[i] = step
    assert not s.busy
    return first


def test_a_long_prompt_fills_in_chunks_while_the_others_decode(runner):
    """A 14-token prompt at 4 tokens a step takes 4 steps to fill; the running sequence gets a token
    at every one of them (no step waits for the whole prompt), and both keep their lone tokens."""
    s = Scheduler(runner, 2, prefill_chunk=4)
    running = s.submit(Sequence([1, 2], GenerationParams(12, GREEDY, 0)))
    s.step()
    long_prompt = list(range(3, 17))
    arriving = s.submit(Sequence(long_prompt, GenerationParams(2, GREEDY, 0)))
    counts = []
    for _ in range(4):
        before = len(running.tokens)
        s.step()
        counts.append((len(running.tokens) - before, arriving.filled))
    assert counts == [(1, 4), (1, 8), (1, 12), (1, 14)]
    # its first token as it filled; with separate forwards, its second in that step's decode (with
    # the mixed step the decode was the same forward: it decodes from the next step on)
    assert len(arriving.tokens) == (1 if s.cache.mixes else 2)
    s.run()
    assert_same_as_alone(runner, [1, 2], GenerationParams(12, GREEDY, 0), running.tokens)
    assert_same_as_alone(runner, long_prompt, GenerationParams(2, GREEDY, 0), arriving.tokens)


def test_a_step_that_fills_and_decodes_is_one_forward(runner, monkeypatch):
    """With our attention the graph takes a flat batch: the running sequence's token and the next
    chunk of a prompt go through one forward per step (not a chunk's and a decode's), each row at
    its own length, and every sequence keeps its lone tokens."""
    s = Scheduler(runner, 3, prefill_chunk=4)
    running = [s.submit(Sequence([1, 2], GenerationParams(12, GREEDY, 0))),
               s.submit(Sequence([5], GenerationParams(12, GREEDY, 0)))]
    s.step()
    assert s.cache.mixes
    forwards = []
    real_run = runner._run
    monkeypatch.setattr(runner, "_run", lambda *a: (forwards.append(1), real_run(*a)))
    arriving = s.submit(Sequence(list(range(3, 17)), GenerationParams(3, GREEDY, 0)))
    for _ in range(4):
        s.step()
    assert len(forwards) == 4 and arriving.filled == 14 and [len(r.tokens) for r in running] == [6, 6]
    s.run()
    for seq in (*running, arriving):
        assert_same_as_alone(runner, seq.prompt_ids, seq.params, seq.tokens)


def test_the_prompts_share_of_a_mixed_step_shrinks_as_rows_decode_and_grows_for_a_wave(runner):
    """A step of 12 tokens, each decode row counting 2: beside 1 row a prompt gets 10 tokens, beside 3
    rows 6; with a step of 8, three prompts filling at once beside one row (a wave) get prefill_chunk
    (10) a step between them, not the 8 - 2 beside one row; beside three rows, 8 - 6, the quarter."""
    budget = StepBudget(tokens=12, row_tokens=2, burst=3)
    for rows, want in ((1, 10), (3, 6)):
        s = Scheduler(runner, 4, prefill_chunk=10, budget=budget)
        running = [s.submit(Sequence([r + 1], GenerationParams(6, GREEDY, 0))) for r in range(rows)]
        s.step()
        assert s.cache.mixes and len(s.rows) == rows
        arriving = s.submit(Sequence(list(range(1, 15)), GenerationParams(2, GREEDY, 0)))
        s.step()
        assert arriving.filled == want
        s.run()
        for seq in (*running, arriving):
            assert_same_as_alone(runner, seq.prompt_ids, seq.params, seq.tokens)
    s = Scheduler(runner, 4, prefill_chunk=10, budget=StepBudget(tokens=8, row_tokens=2, burst=3))
    s.submit(Sequence([1], GenerationParams(6, GREEDY, 0)))
    s.step()
    wave = [s.submit(Sequence(list(range(2, 8)), GenerationParams(2, GREEDY, 0))) for _ in range(3)]
    s.step()
    assert [seq.filled for seq in wave] == [6, 4, 0]
    s = Scheduler(runner, 6, prefill_chunk=10, budget=StepBudget(tokens=8, row_tokens=2, burst=3))
    for r in range(3):
        s.submit(Sequence([r + 1], GenerationParams(6, GREEDY, 0)))
    s.step()
    wave = [s.submit(Sequence(list(range(2, 8)), GenerationParams(2, GREEDY, 0))) for _ in range(3)]
    s.step()
    assert len(s.rows) == 3 and [seq.filled for seq in wave] == [2, 0, 0]
    with pytest.raises(ParameterError, match="budget.row_tokens"):
        StepBudget(row_tokens=-1)


def test_first_tokens_come_in_arrival_order_in_a_burst(runner):
    """Eight prompts of 1 to 15 tokens at once, 6 prompt tokens a step shared first come first
    served: each has its first token no later than any that came after it."""
    s = Scheduler(runner, 8, prefill_chunk=6)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50, n).tolist() for n in (15, 3, 9, 1, 12, 5, 15, 2)]
    seqs = [s.submit(Sequence(p, GenerationParams(4, GREEDY, 0))) for p in prompts]
    first = first_token_steps(s, seqs)
    steps = [first[i] for i in range(len(seqs))]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    for prompt, seq in zip(prompts, seqs):
        assert_same_as_alone(runner, prompt, GenerationParams(4, GREEDY, 0), seq.tokens)


def test_the_cache_shrinks_once_the_long_rows_leave(runner):
    """Capacity follows the longest row there is: a long row's leaving shrinks it for the short ones
    (room_step 4 on the tiny model's block_size 16)."""
    s = Scheduler(runner, 2)
    s.cache = BatchCache(runner.memory, runner.spec, runner.config, 2, 1, runner._execute, runner._decode, room_step=4)
    short = s.submit(Sequence([1], GenerationParams(10, GREEDY, 0)))
    long = s.submit(Sequence(list(range(1, 12)), GenerationParams(4, GREEDY, 0)))
    capacities = []
    while s.busy:
        s.step()
        capacities.append(s.cache.capacity if s.cache is not None else None)
    assert capacities[0] == 12 and min(c for c in capacities if c) == 8, capacities
    assert short.tokens == alone(runner, [1], GenerationParams(10, GREEDY, 0))[0] and long.finish == "length"


def test_rows_that_trade_places_keep_their_caches(runner):
    cache = runner.new_batch_cache(3, 16)
    cache.prefill(0, np.array([1, 2, 3]))
    cache.prefill(1, np.array([4, 5]))
    want = np.array(cache.decode(np.array([6, 7])))
    cache.close()
    cache = runner.new_batch_cache(3, 16)
    cache.prefill(0, np.array([4, 5]))
    cache.prefill(1, np.array([1, 2, 3]))
    cache.swap(0, 1)
    assert cache.lengths[:2].tolist() == [3, 2]
    np.testing.assert_allclose(np.array(cache.decode(np.array([6, 7]))), want, atol=1e-5)
    cache.close()


def test_admission_keeps_the_cache_under_its_limit(runner):
    """--max-cache-mb: the rows of the admitted sequences, at the capacity of their longest, never pass
    the limit; the others wait (first come, first served) and all finish with their lone tokens; one
    that could never fit is refused by name."""
    c = runner.config
    position = 2 * c.n_layer * c.n_head * c.head_dim * 4  # keys and values, every layer, fp32
    limit_mb = 3 * 16 * position / 2**20  # three rows of block_size 16
    s = Scheduler(runner, 8, max_cache_mb=limit_mb)
    params = GenerationParams(10, GREEDY, 0)
    seqs = [s.submit(Sequence([i + 1, i + 2], params)) for i in range(7)]
    most = 0
    while s.busy:
        s.step()
        if s.cache is not None:
            held = len(s.rows) + len(s.filling) + len(s.cropping)
            assert held * s.cache.capacity * position <= limit_mb * 2**20
            most = max(most, held)
    assert most == 3
    for i, seq in enumerate(seqs):
        assert seq.finish == "length" and seq.tokens == alone(runner, [i + 1, i + 2], params)[0]
    tight = Scheduler(runner, 8, max_cache_mb=8 * position / 2**20)
    with pytest.raises(ParameterError, match="max_new_tokens.*--max-cache-mb"):
        tight.submit(Sequence([1, 2], params))  # 12 positions, rounded up to 16, in a limit of 8


def test_a_prompt_cancelled_while_it_fills_stops_costing(runner):
    """A client gone after the first chunk of its long prompt: no more chunks are run for it, its
    row is free, the others go on."""
    import threading

    s = Scheduler(runner, 2, prefill_chunk=4)
    gone = threading.Event()
    other = s.submit(Sequence([3, 4], GenerationParams(8, GREEDY, 0)))
    s.step()
    dropped = s.submit(Sequence(list(range(1, 15)), GenerationParams(4, GREEDY, 0), cancelled=gone.is_set))
    s.step()
    assert dropped.filled == 4 and not dropped.done.is_set()
    gone.set()
    s.step()
    assert dropped.finish == "cancelled" and dropped.filled == 4 and dropped.tokens == []
    assert dropped not in s.filling and int(s.cache.lengths[1:].max()) == 0
    s.run()
    assert other.tokens == alone(runner, [3, 4], GenerationParams(8, GREEDY, 0))[0]

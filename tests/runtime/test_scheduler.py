"""The scheduler: sequences in flight share forwards, and each keeps exactly its own tokens.

Every sequence's tokens must equal nanoGPT's generate alone (conftest.nanogpt_generate: a full
recompute of the cropped context per token, no cache) with its seed and settings. The batched forward may round
differently from a forward of one sequence; a divergence is accepted only where the lone run's
logits make the choice a near-tie, and it is reported, never silent.
"""

from __future__ import annotations

import re
import sys
import threading
import warnings

import numpy as np
import pytest
from conftest import nanogpt_generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.errors import ParameterError
from gptexport.runtime.backends.base import Runner
from gptexport.runtime.backends.device import HostMemory
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams, logits_to_probs
from gptexport.runtime.scheduler import Scheduler, Sequence
from gptexport.runtime.textstream import TextStream

NEAR_TIE = 1e-4  # logits this close can swap under a batched forward's rounding


def alone(runner, prompt, params: GenerationParams, stop_at: int | None = None):
    """The sequence alone in nanoGPT's loop: its tokens and the logits of every step (to tell a
    near-tie from a bug)."""
    logits = []
    n = params.max_new_tokens if stop_at is None else stop_at
    tokens = nanogpt_generate(runner, np.array([prompt]), n, params.sampling, np.random.default_rng(params.seed),
                              record=logits)[0].tolist()
    return tokens, [row[0] for row in logits]


def near_tie(logits: np.ndarray, params: GenerationParams, rng_state, step: int) -> bool:
    """Whether the lone run's choice at `step` could flip under rounding of ~NEAR_TIE."""
    if params.sampling.greedy:
        top2 = np.sort(logits)[-2:]
        return top2[1] - top2[0] < NEAR_TIE
    rng = np.random.default_rng(params.seed)
    for _ in range(step):
        rng.random(1)
    u = rng.random(1)[0]
    cdf = np.cumsum(logits_to_probs(logits[None], *astuple(params.sampling))[0])
    return np.abs(cdf - u * cdf[-1]).min() < NEAR_TIE


def astuple(p: SamplingParams):
    return p.temperature, p.top_k, p.top_p


def assert_same_as_alone(runner, prompt, params, got: list[int], expected_len: int | None = None):
    want, logits = alone(runner, prompt, params)
    if expected_len is not None:
        want = want[:expected_len]
    if got == want:
        return
    step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    assert near_tie(logits[step], params, None, step), (
        f"sequence diverged from its lone run at step {step} without a near-tie: {got} vs {want}")
    warnings.warn(f"near-tie divergence at step {step} (allowed): {got[step]} vs {want[step]}", stacklevel=2)


sampling = st.sampled_from([SamplingParams(0.0), SamplingParams(0.9, 10), SamplingParams(1.3, None, 0.9),
                            SamplingParams(0.7, 3)])
request = st.tuples(st.lists(st.integers(0, 50), min_size=1, max_size=20),  # prompts past block_size 16 too
                    st.integers(1, 30), sampling, st.integers(0, 2**32), st.integers(0, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request, min_size=1, max_size=9), max_batch=st.integers(1, 4),
       prefill_chunk=st.sampled_from([None, 1, 3, 7, 128]),
       cancel_after=st.lists(st.integers(0, 12), max_size=3), data=st.data())
def test_every_sequence_gets_its_lone_tokens_whatever_the_interleaving(runner, requests, max_batch, prefill_chunk,
                                                                      cancel_after, data):
    """Ragged prompts (1 to 20 tokens, past block_size 16 too) arriving between any steps, prefilled in
    chunks of any size shared first come first served, cancelled at any step."""
    s = Scheduler(runner, max_batch, prefill_chunk)
    submitted, pending = [], list(requests)
    cancelled = {data.draw(st.integers(0, len(requests) - 1)): k for k in cancel_after}
    step = 0
    while pending or s.busy:
        for _ in range(data.draw(st.integers(0 if s.busy else 1, len(pending)))):  # arrivals between steps
            prompt, n, sp, seed, _ = pending.pop(0)
            i = len(submitted)
            flag = threading.Event()
            params = GenerationParams(n, sp, seed)
            submitted.append((prompt, params, s.submit(Sequence(prompt, params, cancelled=flag.is_set)), flag, i))
        if s.busy:
            s.step()
        step += 1
        for _prompt, _params, _seq, flag, i in submitted:
            if cancelled.get(i) == step:
                flag.set()
    for prompt, params, seq, flag, _i in submitted:
        assert seq.done.is_set()
        if seq.finish == "cancelled":
            assert flag.is_set() and len(seq.tokens) <= params.max_new_tokens
            assert_same_as_alone(runner, prompt, params, seq.tokens, len(seq.tokens))  # a prefix of its own
        else:
            assert seq.finish == "length" and len(seq.tokens) == params.max_new_tokens, (seq.finish, seq.error)
            assert_same_as_alone(runner, prompt, params, seq.tokens)


def test_stop_words_end_only_their_sequence(runner, tiny_model_dir):
    md = load_model_dir(tiny_model_dir)
    tok = md.tokenizer()
    params = GenerationParams(30, SamplingParams(0.0), 1)
    full, _ = alone(runner, tok.encode("To be"), params)
    word = tok.decode(full)[5:7]  # a stop word the greedy text reaches at character 7
    s = Scheduler(runner, 4)
    stopped = s.submit(Sequence(tok.encode("To be"), GenerationParams(30, SamplingParams(0.0), 1, (word,)),
                                text=TextStream(tok, (word,))))
    other = s.submit(Sequence(tok.encode("To be"), params, text=TextStream(tok)))
    s.run()
    assert stopped.finish == "stop" and word in tok.decode(stopped.tokens)
    assert stopped.tokens == full[:len(stopped.tokens)] and len(stopped.tokens) < 30
    assert other.finish == "length" and other.tokens == full


class CountingMemory(HostMemory):
    """The host twin, counting the copies the memory core is asked for."""

    def __init__(self):
        super().__init__()
        self.calls = {"upload": 0, "download": 0, "copy3d": 0}

    def upload(self, dst, array):
        self.calls["upload"] += 1
        super().upload(dst, array)

    def download(self, array, src):
        self.calls["download"] += 1
        super().download(array, src)

    def copy3d(self, dst, src, plan):
        self.calls["copy3d"] += 1
        super().copy3d(dst, src, plan)


@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("kernels", ["off", "on"])
def test_a_decode_step_of_n_rows_makes_n_copies_in_host_memory(tiny_model_dir, rows, kernels):
    """One append per row (every layer at once), none where our attention appends in the forward
    itself; in host memory the token ids and lengths are written into the bound buffers and the
    logits read where the graph wrote them (a device adds 3 copies: ids and lengths up, logits down).
    A prompt's prefill copies nothing either with our attention."""
    r = OrtRunner(load_model_dir(tiny_model_dir), threads=1, kernels=kernels)
    r.memory = memory = CountingMemory()
    appends = rows if kernels == "off" else 0
    with r:
        cache = r.new_batch_cache(rows, 12)
        for row in range(rows):
            cache.prefill(row, np.arange(row + 2))
        assert memory.calls["copy3d"] == appends
        cache.decode(np.arange(rows))  # the bucket's first step also allocates and uploads its positions
        before = dict(memory.calls)
        cache.decode(np.arange(rows))
        made = {k: memory.calls[k] - before[k] for k in memory.calls}
        assert made == {"upload": 0, "download": 0, "copy3d": appends}
        assert cache.lengths[:rows].tolist() == [row + 4 for row in range(rows)]
        assert cache.capacity == 16  # 12 asked for, rounded up to ROOM_STEP 64, at most block_size 16
        assert cache.bytes_per_row == 2 * 2 * 2 * 16 * 16 * 4  # (k, v) x layers x heads x capacity x head_dim x fp32
        cache.close()


def test_the_batch_cache_grows_with_the_longest_row(runner):
    """A cache that grows (in steps of room_step) while its rows decode: every step's logits equal
    those of a cache allocated at full size from the start."""
    from gptexport.runtime.backends.batchcache import BatchCache

    grown = BatchCache(runner.memory, runner.spec, runner.config, 3, 1, runner._execute, runner._decode, room_step=4)
    full = runner.new_batch_cache(3, 16)
    for cache in (grown, full):
        cache.prefill(0, np.array([1, 2]))
        cache.prefill(1, np.array([3, 4, 5]))
    assert grown.capacity == 4
    capacities = []
    for step in range(10):
        ids = np.array([step % 7, (step + 3) % 7])
        grown.ensure_capacity(int(grown.lengths[:2].max()) + 1)
        np.testing.assert_allclose(np.array(grown.decode(ids)), np.array(full.decode(ids)), atol=1e-5)
        capacities.append(grown.capacity)
    assert capacities == [4, 8, 8, 8, 8, 12, 12, 12, 12, 16]
    grown.close()
    full.close()


def test_with_our_attention_rows_are_laid_out_once_at_block_size(library, runner):
    """CachedAttention reads only each row's own length, so the cache takes block_size positions per row
    at once (host pages are committed only as they are written) and never copies itself to grow: the
    same logits as a cache that grows, at one address throughout."""
    from gptexport.runtime.backends.batchcache import BatchCache

    assert runner.live_attention  # the tiny fp32 model runs our attention (kernels auto)
    fixed = runner.new_batch_cache(3, 1)
    grown = BatchCache(runner.memory, runner.spec, runner.config, 3, 1, runner._execute, runner._decode, room_step=4)
    assert fixed.at_block_size and fixed.capacity == runner.config.block_size and grown.capacity == 4
    block = fixed.block
    for cache in (fixed, grown):
        cache.prefill(0, np.array([1, 2]))
        cache.prefill(1, np.array([3, 4, 5]))
    for step in range(runner.config.block_size - 4):
        ids = np.array([step % 7, (step + 3) % 7])
        np.testing.assert_allclose(np.array(fixed.decode(ids)), np.array(grown.decode(ids)), atol=1e-5)
    fixed.fit(1)
    assert fixed.block == block and fixed.capacity == runner.config.block_size and grown.capacity == 16
    fixed.close()
    grown.close()


class PlanMemory(HostMemory):
    """The host twin, keeping the copy plans and discarded ranges the batch cache asks for."""

    def __init__(self):
        super().__init__()
        self.plans, self.discarded = [], []

    def copy3d(self, dst, src, plan):
        self.plans.append(plan)
        super().copy3d(dst, src, plan)

    def discard(self, ptr, nbytes):
        self.discarded.append((ptr, nbytes))
        super().discard(ptr, nbytes)


def test_rows_move_with_the_positions_they_hold_and_released_rows_give_their_bytes_back(library, tiny_model_dir):
    r = OrtRunner(load_model_dir(tiny_model_dir), threads=1)
    r.memory = memory = PlanMemory()
    with r:
        cache = r.new_batch_cache(3, 4)
        nh, hd, head = r.config.n_head, r.config.head_dim, r.config.head_dim * 4

        def row(ptr: int, i: int) -> np.ndarray:  # row i of one past tensor, (n_head, capacity, head_dim)
            return memory.view(ptr + i * nh * cache.pitch, (nh, cache.capacity, hd), np.float32)

        cache.prefill(2, np.array([1, 2, 3]))
        cache.prefill(1, np.array([4, 5, 6, 7, 1]))
        held = {name: row(ptr, 2)[:, :3].copy() for name, ptr in cache.past.items()}
        memory.plans.clear()
        cache.move(2, 0)
        assert [p.width for p in memory.plans] == [3 * head]  # its 3 positions, not the row's 16
        for name, ptr in cache.past.items():
            np.testing.assert_array_equal(row(ptr, 0)[:, :3], held[name])
        memory.plans.clear()
        cache.swap(0, 1)
        assert [p.width for p in memory.plans] == [3 * head, 5 * head, 3 * head]  # each row's own positions
        assert cache.lengths.tolist() == [5, 3, 0]
        cache.release(1)
        row_bytes = nh * cache.pitch
        assert memory.discarded == [(cache.block + i * cache.stride + row_bytes, row_bytes)
                                    for i in range(len(r.spec.past_names))]
        cache.close()


@pytest.mark.parametrize("max_batch, trades", [(4, False), (3, True)])
def test_a_prompt_done_filling_takes_its_decode_row_from_one_still_filling(runner, max_batch, trades):
    """A, admitted while two rows decode, is still filling when one of them leaves; B, admitted next,
    takes the lower row. When A is whole its decode row is B's: B moves to a free row (two copies in
    all), or with none free the two trade places. Everyone's tokens are their own either way."""
    greedy = SamplingParams(0.0)
    s = Scheduler(runner, max_batch, prefill_chunk=2)
    d0 = s.submit(Sequence([1], GenerationParams(12, greedy, 0)))
    d1 = s.submit(Sequence([2], GenerationParams(3, greedy, 0)))
    s.step()
    a = s.submit(Sequence([3, 4, 5, 6, 7, 1, 2, 3], GenerationParams(6, greedy, 0)))
    while d1.finish is None:
        s.step()
    assert a.row == 2 and len(s.rows) == 1
    b = s.submit(Sequence([5, 6], GenerationParams(6, greedy, 0)))
    s.step()
    assert b.row == 1 and a in s.filling
    calls = []
    s.cache.swap = lambda x, y, swap=s.cache.swap: calls.append(("swap", x, y)) or swap(x, y)
    s.cache.move = lambda x, y, move=s.cache.move: calls.append(("move", x, y)) or move(x, y)
    while a in s.filling:
        s.step()
    assert calls[:2] == ([("swap", 2, 1)] if trades else [("move", 1, 3), ("move", 2, 1)])
    assert b.row == (2 if trades else 3)
    s.run()
    for seq in (d0, d1, a, b):
        assert seq.finish == "length"
        assert seq.tokens == alone(runner, seq.prompt_ids, seq.params)[0]


def test_host_memory_gives_whole_pages_back_and_keeps_the_rest():
    import mmap
    import sys

    memory = HostMemory()
    page = mmap.PAGESIZE
    ptr = memory.allocate(6 * page)
    data = memory.view(ptr, (6 * page,), np.uint8)
    data[:] = 7
    memory.discard(ptr + page // 2, 3 * page)  # whole pages 1 and 2 inside the range, halves of 0 and 3
    if sys.platform == "linux":
        aligned = -(-ptr // page) * page - ptr  # where the first whole page starts in the buffer
        first = aligned + (page if aligned < page // 2 else 0)
        whole = slice(first, (ptr + page // 2 + 3 * page) // page * page - ptr)
        assert (data[whole] == 0).all() and whole.stop - whole.start >= page
        assert (data[:page // 2] == 7).all() and (data[page // 2 + 3 * page:] == 7).all()
    with pytest.raises(Exception, match="outside a buffer"):
        memory.discard(ptr, 7 * page)
    memory.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_cache_laid_out_at_block_size_asks_for_base_pages():
    """numpy asks for huge pages on large arrays; a cache laid out at block_size must not get them (a
    write would commit 2 MB around it: a GPT-2 row whole at its first position)."""
    memory = HostMemory()
    ptr = memory.allocate_zeroed(16 << 20, small_pages=True)
    inside = ptr + (4 << 20)
    flags = None
    with open("/proc/self/smaps") as f:
        mappings = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", f.read())
    for block in mappings:
        start, end = (int(x, 16) for x in block.split()[0].split("-"))
        if start <= inside < end:
            flags = re.search(r"VmFlags:(.*)", block).group(1).split()
    assert flags is not None and "nh" in flags
    memory.close()


def test_an_idle_scheduler_frees_its_cache(runner):
    s = Scheduler(runner, 4)
    short = s.submit(Sequence([1, 2], GenerationParams(3, SamplingParams(0.0), 0)))
    s.step()
    long = s.submit(Sequence([3], GenerationParams(12, SamplingParams(0.0), 0)))
    s.run()
    assert short.finish == long.finish == "length" and s.cache is None
    assert long.tokens == alone(runner, [3], GenerationParams(12, SamplingParams(0.0), 0))[0]


class PoisonedRunner(Runner):
    """Returns NaN logits for the rows whose new token is POISON (a broken backend, for one sequence);
    its batch cache is the base Runner's, on host memory through infer()."""

    POISON = 7

    def __init__(self, inner):
        self.inner, self.name, self.config, self.spec = inner, "poisoned", inner.config, inner.spec

    def infer(self, feeds):
        out = self.inner.infer(feeds)
        bad = feeds["input_ids"][:, -1] == self.POISON
        out["logits"][bad] = np.nan
        return out


def test_one_sequence_failing_leaves_the_others_alone(tiny_model_dir, runner):
    r = PoisonedRunner(runner)
    s = Scheduler(r, 4)
    good = [s.submit(Sequence([1, 2, 3], GenerationParams(10, SamplingParams(0.0), 0))),
            s.submit(Sequence([4, 5], GenerationParams(10, SamplingParams(0.9, 5), 3)))]
    bad = s.submit(Sequence([3, PoisonedRunner.POISON], GenerationParams(10, SamplingParams(0.0), 0)))
    s.run()
    assert bad.finish == "error" and "NaN" in str(bad.error)
    for seq, (prompt, params) in zip(good, [([1, 2, 3], GenerationParams(10, SamplingParams(0.0), 0)),
                                            ([4, 5], GenerationParams(10, SamplingParams(0.9, 5), 3))]):
        if PoisonedRunner.POISON not in seq.tokens[:-1]:
            assert seq.finish == "length"
            assert_same_as_alone(runner, prompt, params, seq.tokens)


class PoisonedCacheRunner(PoisonedRunner):
    """As PoisonedRunner, and the poisoned rows' new keys and values are NaN too (an overflow in the
    forward): what a failed sequence leaves in its cache row."""

    def infer(self, feeds):
        out = super().infer(feeds)
        bad = feeds["input_ids"][:, -1] == self.POISON
        for name in self.spec.new_names:
            out[name][bad] = np.nan
        return out


def test_a_failed_sequence_leaves_no_nan_in_the_row_another_takes(tiny_model_dir):
    """On the exported mask graph (kernels off) every slot of a row is multiplied by its probability,
    0 past the row's length: a NaN left there by a failed sequence would fail the next one in the row.
    `bad` fails with NaN keys and values at its 8th position; `tail` (shorter) moves into its row."""
    from gptexport.runtime.sequence import Probe

    inner = OrtRunner(load_model_dir(tiny_model_dir), threads=1, kernels="off")
    with inner:
        r = PoisonedCacheRunner(inner)
        s = Scheduler(r, 3)
        head = s.submit(Sequence([1, 2], GenerationParams(12, SamplingParams(0.0), 0)))
        bad = s.submit(Sequence([3, 4, 5, 6, 1, 2, 3], GenerationParams(6, SamplingParams(0.0), 0),
                                probe=Probe(forced=[PoisonedRunner.POISON] * 6)))
        tail = s.submit(Sequence([5], GenerationParams(10, SamplingParams(0.0), 0)))
        s.run()
        assert bad.finish == "error" and "NaN" in str(bad.error)
        for seq in (head, tail):
            assert seq.finish == "length", seq.error
            assert seq.tokens == alone(inner, seq.prompt_ids, seq.params)[0]


def test_max_batch_one_runs_them_one_after_another(runner):
    s = Scheduler(runner, 1)
    a = s.submit(Sequence([1], GenerationParams(5, SamplingParams(0.0), 0)))
    b = s.submit(Sequence([2], GenerationParams(5, SamplingParams(0.0), 0)))
    s.step()
    assert len(s.rows) == 1 and len(s.queue) == 1
    s.run()
    assert a.tokens == alone(runner, [1], GenerationParams(5, SamplingParams(0.0), 0))[0] and b.finish == "length"


def test_a_loop_thread_serves_sequences_submitted_from_other_threads(runner):
    s = Scheduler(runner, 4)
    stop = threading.Event()
    loop = threading.Thread(target=s.loop, args=(stop,), daemon=True)
    loop.start()
    params = [GenerationParams(8, SamplingParams(0.8, 20), seed) for seed in range(6)]
    seqs = [None] * 6

    def submit(i):
        seqs[i] = s.submit(Sequence([1 + i, 2], params[i]))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seq in seqs:
        assert seq.done.wait(60)
    stop.set()
    loop.join(10)
    assert not loop.is_alive()
    for i, seq in enumerate(seqs):
        assert_same_as_alone(runner, [1 + i, 2], params[i], seq.tokens)


def test_bad_settings_are_refused_by_name(runner):
    s = Scheduler(runner, 2)
    with pytest.raises(ParameterError, match="prompt_ids is empty"):
        s.submit(Sequence([], GenerationParams()))
    with pytest.raises(ParameterError, match="prompt_ids has token ids out of range: 999"):
        s.submit(Sequence([999], GenerationParams()))
    with pytest.raises(ParameterError, match="max_batch must be an integer >= 1"):
        Scheduler(runner, 0)


def test_power_of_two_buckets_give_the_same_logits_as_exact_ones(tiny_model_dir):
    """What CUDA graphs run: a decode of n rows at the next power of two, the extra rows idle."""
    from gptexport.runtime.backends.batchcache import BatchCache
    from gptexport.runtime.backends.buckets import GraphArenas, graph_bucket

    r = OrtRunner(load_model_dir(tiny_model_dir), threads=1)
    with r:
        exact = r.new_batch_cache(8, 14)
        padded = BatchCache(r.memory, r.spec, r.config, 8, 14, r._execute, r._decode, graphs=GraphArenas())
        for cache in (exact, padded):
            for row in range(5):
                cache.prefill(row, np.arange(1, row + 3))
        for step in range(3):
            ids = np.arange(5) + step
            a, b = np.array(exact.decode(ids)), np.array(padded.decode(ids))
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert sorted(padded.arena.buckets) == [(8, 16)] and sorted(exact.buckets) == [5]  # capacity 14 -> 16
        assert [graph_bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
        exact.close()
        padded.close()

"""The generation engine against nanoGPT's `generate`: greedy past block_size, seeded sampling, the crop
notice, streaming."""

import numpy as np
import torch
from conftest import engine_generate, nanogpt_generate

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.params import GenerationParams
from gptexport.runtime.sampling import SamplingParams
from gptexport.runtime.session import GenerationSession
from gptexport.verify.reference import TorchRunner


def test_greedy_past_block_size_matches_nanogpt_generate(tiny_ckpt, tiny_model_dir):
    """40 new tokens on a block_size-16 model: the window crops and slides, as in nanoGPT."""
    torch_runner = TorchRunner(tiny_ckpt)
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.no_grad():
        want = torch_runner.model.generate(torch.from_numpy(prompt), 40, temperature=1.0, top_k=1)[:, 5:].numpy()
    for runner in (torch_runner, OrtRunner(load_model_dir(tiny_model_dir))):
        got = engine_generate(runner, prompt, 40, SamplingParams(temperature=0.0))
        np.testing.assert_array_equal(got, want, err_msg=runner.name)


def test_sampled_tokens_match_a_full_recompute_loop(tiny_ckpt, tiny_model_dir):
    """The engine (cached decode, crop) equals nanoGPT's loop (full recompute) drawing with the same sampler."""
    params = SamplingParams(0.9, top_k=10)
    want = nanogpt_generate(TorchRunner(tiny_ckpt), np.array([[7, 8, 9]]), 30, params, np.random.default_rng(42))
    got = engine_generate(OrtRunner(load_model_dir(tiny_model_dir)), np.array([[7, 8, 9]]), 30, params, seed=42)
    np.testing.assert_array_equal(got, want)


def test_long_prompt_is_cropped_with_a_notice(tiny_model_dir):
    notices = []
    with GenerationSession.open(tiny_model_dir) as session:
        prompt = (np.arange(40) % 20).tolist()
        got = session.generate(prompt, GenerationParams(3, SamplingParams(0.0)), notice=notices.append).tokens
        same = session.generate(prompt[-16:], GenerationParams(3, SamplingParams(0.0))).tokens
    assert len(notices) == 1 and "40 tokens" in notices[0]
    assert got == same


def test_streams_each_token(tiny_model_dir):
    seen = []
    with GenerationSession.open(tiny_model_dir) as session:
        out = session.generate([1], GenerationParams(5, SamplingParams(1.0)), lambda seq, ids, text: seen.extend(ids))
    assert seen == out.tokens and len(seen) == 5

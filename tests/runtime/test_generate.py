import numpy as np
import torch

from gptexport.artifacts.modeldir import load_model_dir
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.loop import generate
from gptexport.runtime.sampling import SamplingParams
from gptexport.verify.reference import TorchRunner


def test_greedy_past_block_size_matches_nanogpt_generate(tiny_ckpt, tiny_model_dir):
    """40 new tokens on a block_size-16 model: the window crops and slides, as in nanoGPT."""
    torch_runner = TorchRunner(tiny_ckpt)
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    with torch.no_grad():
        want = torch_runner.model.generate(torch.from_numpy(prompt), 40, temperature=1.0, top_k=1)[:, 5:].numpy()
    for runner in (torch_runner, OrtRunner(load_model_dir(tiny_model_dir))):
        got = generate(runner, prompt, 40, SamplingParams(temperature=0.0), np.random.default_rng(0))
        np.testing.assert_array_equal(got, want, err_msg=runner.name)


def test_sampled_tokens_match_a_full_recompute_loop(tiny_ckpt, tiny_model_dir):
    """Cached generation equals nanoGPT's loop (full recompute, crop) drawing with the same sampler."""
    from gptexport.runtime.sampling import next_token

    model, params = TorchRunner(tiny_ckpt).model, SamplingParams(0.9, top_k=10)
    prompt = np.array([[7, 8, 9]])
    rng = np.random.default_rng(42)
    idx = prompt.copy()
    for _ in range(30):
        with torch.no_grad():
            logits = model(torch.from_numpy(idx[:, -16:]))[0][:, -1].numpy()
        idx = np.concatenate([idx, next_token(logits, params, rng)[:, None]], axis=1)
    got = generate(OrtRunner(load_model_dir(tiny_model_dir)), prompt, 30, params, np.random.default_rng(42))
    np.testing.assert_array_equal(got, idx[:, 3:])


def test_long_prompt_is_cropped_with_a_notice(tiny_model_dir):
    notices = []
    runner = OrtRunner(load_model_dir(tiny_model_dir))
    prompt = np.arange(40)[None] % 20
    got = generate(runner, prompt, 3, SamplingParams(0.0), np.random.default_rng(0), notice=notices.append)
    same = generate(runner, prompt[:, -16:], 3, SamplingParams(0.0), np.random.default_rng(0))
    assert len(notices) == 1 and "40 tokens" in notices[0]
    np.testing.assert_array_equal(got, same)


def test_streams_each_token(tiny_model_dir):
    seen = []
    out = generate(OrtRunner(load_model_dir(tiny_model_dir)), np.array([[1]]), 5, SamplingParams(1.0),
                   np.random.default_rng(0), on_token=lambda t: seen.append(int(t[0])))
    assert seen == out[0].tolist()

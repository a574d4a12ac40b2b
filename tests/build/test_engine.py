"""TensorRT engines: the plain logic on real model directories (CPU), the engine itself on a GPU.

Profiles, the device cache's copy arithmetic, engine records and the compatibility refusal are
tested here with the tiny exported model; tests marked `gpu` build and run engines and are
skipped unless TensorRT imports and a CUDA device answers (scripts/gpu_check.py runs them).
"""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import engine_generate

from gptexport.artifacts.engine_record import (
    ENGINE_FILE,
    RECORD_FILE,
    DeviceInfo,
    EngineRecord,
    check_compatible,
    compatibility_problems,
    engine_io_problems,
    load_record,
)
from gptexport.artifacts.modeldir import MANIFEST, load_model_dir
from gptexport.build.engine import BuildOptions, install_engine
from gptexport.cli import main
from gptexport.config import io_spec, numpy_dtype
from gptexport.errors import BackendUnavailable, GptExportError, ModelDirError, UsageError
from gptexport.profiles import (
    ProfileShapes,
    ort_profile_options,
    profile_problems,
    profile_shapes,
    select_profile,
    step_shapes,
    union_profile,
)
from gptexport.runtime.backends import open_runner
from gptexport.runtime.backends.base import Runner
from gptexport.runtime.backends.batchcache import BatchCache
from gptexport.runtime.backends.device import HostMemory
from gptexport.runtime.backends.ort import OrtRunner
from gptexport.runtime.backends.ort_session import provider_options
from gptexport.runtime.sampling import SamplingParams
from gptexport.verify.measure import teacher_forced

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0")


def _trt_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401

        from gptexport.runtime.backends.device import import_cudart

        cudart = import_cudart()
        return cudart.cudaGetDeviceCount()[1] > 0
    except Exception:
        return False


def gpu_test(f):
    """Marked `gpu`, and skipped unless TensorRT imports and a CUDA device answers."""
    return pytest.mark.gpu(pytest.mark.skipif(not _trt_gpu(), reason="needs TensorRT, cuda-python and a GPU")(f))


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A private copy of the tiny model directory, free to get an engine."""
    return load_model_dir(shutil.copytree(tiny_model_dir, tmp_path / "m"))


def _installed(md, plan=b"serialized engine bytes", version="10.8.0.43", device=H100, **options):
    """A model directory with an engine record, written by the code `gptexport build` ends with."""
    opts = BuildOptions(**options)
    profs = profile_shapes(md.config, md.spec, opts.max_batch, opts.opt_seq)
    record = install_engine(md, plan, version, device, opts, profs, tf32=False)
    return load_model_dir(md.path), record


# ---- profiles ----------------------------------------------------------------------------------

def test_profiles_cover_prefill_and_decode(model_dir):
    c = model_dir.config  # block_size 16, n_head 2, head_dim 16
    prefill, decode = profile_shapes(c, model_dir.spec, max_batch=4, opt_seq=8)
    assert prefill.shapes["input_ids"] == ((1, 1), (4, 8), (4, 16))
    assert prefill.shapes["past_key.0"] == ((1, 2, 0, 16), (4, 2, 0, 16), (4, 2, 0, 16))
    assert prefill.shapes["logit_positions"] == ((1,), (1,), (16,))
    assert decode.shapes["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode.shapes["past_value.1"] == ((1, 2, 1, 16), (4, 2, 8, 16), (4, 2, 16, 16))
    assert prefill.shapes["past_length"] == ((1,), (4,), (4,))  # one length per sequence: the batch's range
    for p in (prefill, decode):  # every cache input consistent with the others
        assert len({p.shapes[n] for n in model_dir.spec.past_names}) == 1
    assert profile_problems(c, model_dir.spec, [prefill, decode]) == []


def test_profile_arguments_are_checked(model_dir):
    with pytest.raises(UsageError, match="--max-batch"):
        profile_shapes(model_dir.config, model_dir.spec, max_batch=0)
    with pytest.raises(UsageError, match=r"--opt-seq must be in 1\.\.16"):
        profile_shapes(model_dir.config, model_dir.spec, opt_seq=17)


def test_inconsistent_profiles_are_named(model_dir):
    c, spec = model_dir.config, model_dir.spec
    prefill, decode = profile_shapes(c, spec, 2)
    shapes = dict(decode.shapes)
    shapes["past_key.1"] = ((1, 2, 1, 16), (2, 2, 8, 16), (2, 2, 32, 16))  # past beyond block_size, unlike the others
    shapes["input_ids"] = ((1, 1), (1, 1), (3, 1))  # batch range differs from the cache's
    problems = profile_problems(c, spec, [prefill, ProfileShapes("decode", shapes)])
    assert any("different ranges" in p for p in problems)
    assert any("different batch ranges" in p for p in problems)
    del shapes["logit_positions"]
    assert profile_problems(c, spec, [ProfileShapes("decode", shapes)]) == [
        "decode: no range for dynamic input logit_positions"]


class RecordingRunner(Runner):
    """The base Runner's batch cache (host memory, infer) over ONNX Runtime, noting every forward's input shapes."""

    def __init__(self, md):
        self.ort, self.config, self.spec, self.shapes = OrtRunner(md), md.config, md.spec, []

    def infer(self, feeds):
        self.shapes.append({k: v.shape for k, v in feeds.items()})
        return self.ort.infer(feeds)


def test_every_forward_of_generation_falls_in_a_profile(model_dir):
    """Prefill, decode, and past block_size the recomputed window: all within prefill or decode."""
    runner = RecordingRunner(model_dir)
    engine_generate(runner, np.array([[3, 1, 4, 1, 5]]), 40, SamplingParams(0.0))
    profs = profile_shapes(model_dir.config, model_dir.spec)
    chosen = [select_profile(profs, s) for s in runner.shapes]
    assert None not in chosen and set(chosen) == {0, 1} and len(chosen) == 40
    # what the profiles exclude: several new tokens after a past (chunked prefill), batch > max
    assert select_profile(profs, step_shapes(model_dir.spec, 1, 3, 9, 3)) is None
    assert select_profile(profs, step_shapes(model_dir.spec, 2, 1, 9, 1)) is None


def test_step_shapes_are_the_feeds_shapes(model_dir):
    runner = RecordingRunner(model_dir)
    cache = runner.new_batch_cache(2, 12)
    cache.prefill(0, np.zeros((2, 5), np.int64))
    cache.decode(np.zeros(2, np.int64))
    cache.prefill(0, np.zeros((1, 3), np.int64), all_positions=True)
    capacity = cache.capacity  # 12 rounded up to the room step, at most block_size
    assert runner.shapes == [step_shapes(model_dir.spec, 2, 5, 0, 1), step_shapes(model_dir.spec, 2, 1, capacity, 1),
                             step_shapes(model_dir.spec, 1, 3, 0, 3)]


def test_onnxruntime_tensorrt_provider_gets_one_profile_spanning_both(model_dir):
    profs = profile_shapes(model_dir.config, model_dir.spec, 8)
    union = union_profile(profs, opt_from=profile_shapes(model_dir.config, model_dir.spec, 1)[1])
    assert union.shapes["past_key.0"] == ((1, 2, 0, 16), (1, 2, 8, 16), (8, 2, 16, 16))
    assert union.shapes["input_ids"] == ((1, 1), (1, 1), (8, 16))
    opts = ort_profile_options(union)
    assert opts["trt_profile_min_shapes"].startswith(
        "input_ids:1x1,past_length:1,logit_positions:1,past_key.0:1x2x0x16,")
    assert "past_length:8" in opts["trt_profile_max_shapes"]  # one length per sequence
    assert opts["trt_profile_max_shapes"].split(",")[0] == "input_ids:8x16"
    got = provider_options("tensorrt", model_dir)
    assert got["trt_fp16_enable"] is False and got["trt_engine_cache_enable"] is True
    assert got["trt_engine_cache_path"] == str(model_dir.path / "ort_trt_cache")
    assert got["trt_profile_opt_shapes"] == opts["trt_profile_opt_shapes"]
    # CUDA provider: TF32 off unless asked, the memory core's stream, graphs when asked
    assert provider_options("cuda", model_dir) == {"device_id": "0", "use_tf32": "0", "enable_cuda_graph": "0"}
    cuda = provider_options("cuda", model_dir, stream=0x7F00, tf32=True, cuda_graphs=True)
    assert cuda == {"device_id": "0", "use_tf32": "1", "enable_cuda_graph": "1", "user_compute_stream": str(0x7F00)}
    assert provider_options("tensorrt", model_dir, stream=5)["user_compute_stream"] == "5"


# ---- the device cache's layout -----------------------------------------------------------------

class WritingRun:
    """A stand-in forward for the batch cache's copy plans: writes random new keys/values into the step's
    outputs and keeps what each row's cache should then hold (the plans are what is under test here;
    the graph's own numbers are tested against session.run in tests/runtime/test_ort_runner.py)."""

    def __init__(self, memory, spec, dtype):
        self.memory, self.spec, self.dtype, self.rng = memory, spec, dtype, np.random.default_rng(0)

    def __call__(self, _, ins: dict, outs: dict, addresses: dict) -> None:
        new = [self.rng.standard_normal(outs[name]).astype(self.dtype) for name in self.spec.new_names]
        for name, value in zip(self.spec.new_names, new):
            self.memory.view(addresses[name], outs[name], self.dtype)[...] = value
        self.last = np.stack(new, axis=1)  # (n, tensors, nh, steps, hd)

    def decode(self, bucket) -> None:
        d = bucket.decode_buffers()
        self(None, d.input_shapes, d.output_shapes, d.addresses)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_strided_copies_put_each_rows_keys_at_its_positions(model_dir, dtype):
    """The batch cache's 3-D copy plans, run by the host memory core, append every row's new keys and
    values at its own length in every layer tensor, across prefills, decodes, a growth and a row move
    (the CUDA core runs the same plans with cudaMemcpy3DAsync)."""
    c = model_dir.config
    spec = io_spec(c, {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype])
    np_dtype = numpy_dtype(spec.cache_dtype)
    memory, rows = HostMemory(), 3
    run = WritingRun(memory, spec, np_dtype)
    cache = BatchCache(memory, spec, c, rows, 4, run, run.decode, room_step=4)
    want = [np.zeros((len(spec.past_names), c.n_head, 0, c.head_dim), np_dtype) for _ in range(rows)]

    def check() -> None:
        for r in range(rows):
            n = int(cache.lengths[r])
            for t, name in enumerate(spec.past_names):
                past = memory.view(cache.past[name], (rows, c.n_head, cache.capacity, c.head_dim), np_dtype)
                np.testing.assert_array_equal(past[r, :, :n].view(np.uint8), want[r][t].view(np.uint8))

    for r, T in enumerate((3, 1, 2)):
        cache.prefill(r, np.zeros(T, np.int64))
        want[r] = run.last[0]
    check()
    for _step in range(6):  # grows 4 -> 8 on the way
        cache.ensure_capacity(int(cache.lengths.max()) + 1)
        cache.decode(np.zeros(rows, np.int64))
        for r in range(rows):
            want[r] = np.concatenate([want[r], run.last[r]], axis=2)
        check()
    assert cache.capacity == 12
    cache.move(2, 0)  # the last row fills a row that leaves
    want[0], want[2] = want[2], want[2][:, :, :0]
    assert cache.lengths[2] == 0
    check()
    with pytest.raises(GptExportError, match="overflow"):
        cache._append_plan(0, cache.capacity, 0, 1, 0)
    cache.close()


def test_copy_plan_numbers(model_dir):
    """Row 1 of a (2, nh=2, capacity 16, hd=16) fp32 cache gets one new position at 5: in each of the
    (k, v) x layers tensors, nh rows of one position, a row pitch apart."""
    spec, c = model_dir.spec, model_dir.config
    cache = BatchCache(HostMemory(), spec, c, 2, 16, None, None)
    plan = cache._append_plan(1, 5, 1, 1, 4096)
    head = c.head_dim * 4
    assert (plan.dst_offset, plan.dpitch, plan.width, plan.height, plan.depth) == (
        c.n_head * 16 * head + 5 * head, 16 * head, head, c.n_head, len(spec.past_names))
    assert (plan.src_offset, plan.spitch, plan.sslice, plan.dslice) == (c.n_head * head, head, 4096, cache.stride)
    cache.close()


def test_engine_io_is_compared_with_the_spec(model_dir):
    spec = io_spec(model_dir.config, "fp16")
    names = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}
    io = {t.name: ("INPUT", names[t.dtype]) for t in spec.inputs}
    io.update({t.name: ("OUTPUT", names[t.dtype]) for t in spec.outputs})
    assert engine_io_problems(spec, io) == []
    io["logits"] = ("OUTPUT", "HALF")
    del io["new_key.1"]
    assert engine_io_problems(spec, io) == ["new_key.1: missing from the engine",
                                            "logits: engine has output HALF, spec says output FLOAT"]


# ---- engine records and refusing a foreign engine ----------------------------------------------

def test_install_writes_engine_and_record_into_the_manifest(model_dir):
    md, record = _installed(model_dir, max_batch=2, opt_seq=8)
    manifest = json.loads((md.path / MANIFEST).read_text())
    assert {ENGINE_FILE, RECORD_FILE} <= set(manifest["files"])
    assert manifest["tensorrt"] == {"engine": ENGINE_FILE, "record": RECORD_FILE}
    assert (md.path / ENGINE_FILE).read_bytes() == b"serialized engine bytes"
    assert not [p for p in md.path.iterdir() if p.name.startswith(".")]  # no temporary files left
    on_disk = json.loads((md.path / RECORD_FILE).read_text())
    assert on_disk["tensorrt_version"] == "10.8.0.43" and on_disk["compute_capability"] == "9.0"
    assert on_disk["onnx_sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert on_disk["precision"] == "fp32" and on_disk["strongly_typed"] and on_disk["opt_seq"] == 8
    assert [p["name"] for p in on_disk["profiles"]] == ["prefill", "decode"]
    assert load_record(md) == record and record.profiles[0].shapes["input_ids"][2] == (2, 16)


def test_a_tampered_engine_fails_verification(model_dir):
    md, _ = _installed(model_dir)
    (md.path / ENGINE_FILE).write_bytes(b"something else")
    with pytest.raises(ModelDirError, match="model.engine"):
        load_model_dir(md.path)


def test_compatibility_is_checked_before_deserializing(model_dir):
    md, record = _installed(model_dir)
    assert compatibility_problems(record, md, "10.8.0.43", H100) == []
    problems = compatibility_problems(record, md, "10.9.0.34", DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0"))
    assert problems == ["it was built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.34",
                        "it was built for NVIDIA H100 80GB HBM3 (compute capability 9.0), "
                        "this GPU is NVIDIA A100-SXM4-80GB (8.0)"]
    with pytest.raises(ModelDirError, match=r"cannot run here: .*; rebuild it with `gptexport build"):
        check_compatible(record, md, "11.0.0.1", H100)


def test_an_engine_from_another_onnx_is_refused(model_dir, tiny_ckpt):
    md, record = _installed(model_dir)
    manifest = json.loads((md.path / MANIFEST).read_text())
    manifest["files"]["model.onnx"]["sha256"] = "0" * 64  # as if model.onnx were re-exported
    manifest["dtype"] = "fp16"
    md.manifest = manifest
    problems = compatibility_problems(record, md, "10.8.0.43", H100)
    assert problems == ["it was built from another model.onnx (sha256 differs)",
                        "it is fp32, the model directory is fp16"]


def test_records_are_validated(model_dir):
    md, record = _installed(model_dir)
    d = record.to_dict()
    assert EngineRecord.from_dict(json.loads(json.dumps(d)), "engine.json") == record
    with pytest.raises(ModelDirError, match="format_version 2 is not supported"):
        EngineRecord.from_dict(dict(d, format_version=2), "engine.json")
    with pytest.raises(ModelDirError, match="malformed engine record"):
        EngineRecord.from_dict({k: v for k, v in d.items() if k != "gpu_name"}, "engine.json")
    with pytest.raises(ModelDirError, match="not a gptexport engine record"):
        EngineRecord.from_dict([], "engine.json")


# ---- without TensorRT ----------------------------------------------------------------------------

def test_runner_without_an_engine_says_to_build_one(model_dir):
    with pytest.raises(ModelDirError, match=r"has no TensorRT engine; build one with `gptexport build"):
        open_runner("tensorrt", model_dir)


@pytest.mark.skipif(_trt_gpu(), reason="TensorRT is installed here")
def test_runner_without_tensorrt_says_how_to_install_it(model_dir):
    md, _ = _installed(model_dir)
    runner = open_runner("tensorrt", md)  # the record loads without TensorRT
    with pytest.raises(BackendUnavailable, match=r"^TensorRT is not installed: pip install tensorrt cuda-python"):
        runner.activate()


@pytest.mark.skipif(_trt_gpu(), reason="TensorRT is installed here")
def test_build_command_without_tensorrt(model_dir):
    result = CliRunner().invoke(main, ["build", str(model_dir.path), "--max-batch", "2"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: TensorRT is not installed: pip install tensorrt cuda-python "
        "(needs an NVIDIA GPU and driver; see docs/tensorrt.md)"]
    assert not (model_dir.path / ENGINE_FILE).exists()


@pytest.mark.parametrize("command", [[], ["build"], ["check"], ["generate"], ["convert"]])
def test_help_works_without_tensorrt(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_build_arguments_are_checked_before_tensorrt(model_dir):
    result = CliRunner().invoke(main, ["build", str(model_dir.path), "--opt-seq", "99"])
    assert result.exit_code == 2 and "--opt-seq must be in 1..16" in result.output


# ---- on a GPU ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tiny_ckpt, tmp_path_factory):
    """The tiny model in fp32 and fp16, each with an engine (max batch 2)."""
    from gptexport.build.engine import build_engine
    from gptexport.convert.export import convert

    dirs = {}
    for dtype in ("fp32", "fp16"):
        out = convert(tiny_ckpt, tmp_path_factory.mktemp("trt") / dtype, dtype=dtype, progress=lambda m: None)
        build_engine(out, BuildOptions(max_batch=2), progress=lambda m: None)
        dirs[dtype] = load_model_dir(out)
    return dirs


@gpu_test
@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-4), ("fp16", 5e-2)])
@pytest.mark.parametrize("batch,seq,past,capacity", [(1, 1, 0, 0), (2, 16, 0, 0), (2, 1, 9, 12), (1, 1, 15, 16)])
def test_engine_matches_onnxruntime(built, dtype, atol, batch, seq, past, capacity):
    from gptexport.convert.export import validation_feeds

    md = built[dtype]
    feeds = validation_feeds(md.config, md.spec, batch, seq, past, capacity, np.random.default_rng(seq),
                             OrtRunner(md).cache_dtype())
    with open_runner("tensorrt", md) as trt_runner:
        got = trt_runner.infer(feeds)
    want = OrtRunner(md).infer(feeds)
    for name in want:
        np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=atol, err_msg=name)


@gpu_test
def test_generation_on_the_device_cache_matches_onnxruntime(built):
    md = built["fp32"]
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    want = engine_generate(OrtRunner(md), prompt, 40, SamplingParams(0.0))
    with open_runner("tensorrt", md) as runner:
        got = engine_generate(runner, prompt, 40, SamplingParams(0.0))
        forced = teacher_forced(runner, prompt[0], prompt[1])
        np.testing.assert_allclose(forced, teacher_forced(OrtRunner(md), prompt[0], prompt[1]), atol=1e-4)
    np.testing.assert_array_equal(got, want)


@gpu_test
def test_engine_for_another_gpu_is_refused(built, tmp_path):
    md = load_model_dir(shutil.copytree(built["fp32"].path, tmp_path / "m"))
    record = json.loads((md.path / RECORD_FILE).read_text())
    record["compute_capability"] = "1.0"
    (md.path / RECORD_FILE).write_text(json.dumps(record))
    from gptexport.artifacts.modeldir import add_files_to_manifest

    add_files_to_manifest(md, [RECORD_FILE])
    with pytest.raises(ModelDirError, match="compute capability 1.0"):
        open_runner("tensorrt", load_model_dir(md.path)).activate()


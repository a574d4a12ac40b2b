"""Issue #6, end to end: every bad input to the `gptexport` CLI gives one clear line and the right exit code.

Each case runs the real CLI (in-process through click's CliRunner; in a subprocess where a process
must be killed) and checks: the exit code (1 bad input, 2 usage), stderr is exactly one line
`error: ...` naming the file or argument, no traceback, and nothing half-written on disk.
The loaders' own behaviour is tested in test_checkpoint.py and test_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_error, assert_nothing_written, cli, staging_leftovers

from gptexport.artifacts.modeldir import MANIFEST, file_records, load_model_dir
from gptexport.cli import main

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Helpers


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def reseal(model_dir: Path) -> Path:
    """Rewrite the manifest's hashes, as if the exporter itself had produced the files."""
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest["files"] = file_records(model_dir)
    (model_dir / MANIFEST).write_text(json.dumps(manifest))
    return model_dir


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_manifest(model_dir: Path, **changes) -> Path:
    manifest = json.loads((model_dir / MANIFEST).read_text())
    manifest.update(changes)
    (model_dir / MANIFEST).write_text(json.dumps(manifest))
    return model_dir


# ---------------------------------------------------------------------------------------------
# Checkpoints: `gptexport convert BAD -o OUT` fails before writing anything


class MkdirOnLoad:
    """A pickle payload: a plain unpickler would call os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _ckpt_dict(tiny_ckpt: Path) -> dict:
    import torch

    return torch.load(tiny_ckpt, weights_only=True)


def _save(obj, path: Path) -> Path:
    import torch

    torch.save(obj, path)
    return path


def _edit_ckpt(edit):
    """A builder: the tiny checkpoint's dict, edited by `edit(ckpt)`, saved as DIR/ckpt.pt."""
    def build(d: Path, tiny_ckpt: Path) -> Path:
        ckpt = _ckpt_dict(tiny_ckpt)
        edit(ckpt)
        return _save(ckpt, d / "ckpt.pt")
    return build


def _write(data: bytes | str):
    def build(d: Path, tiny_ckpt: Path) -> Path:
        path = d / "ckpt.pt"
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path
    return build


def _truncated(d: Path, tiny_ckpt: Path) -> Path:
    data = tiny_ckpt.read_bytes()
    return _write(data[: len(data) // 2])(d, tiny_ckpt)


def _directory(d: Path, tiny_ckpt: Path) -> Path:
    (d / "run").mkdir()
    return d / "run"


def _drop_weight(ckpt):
    del ckpt["model"]["transformer.h.1.mlp.c_fc.weight"]


def _extra_weight(ckpt):
    import torch

    ckpt["model"]["transformer.h.9.ln_1.weight"] = torch.ones(32)


def _misshape_weight(ckpt):
    import torch

    ckpt["model"]["transformer.ln_f.weight"] = torch.ones(33)


CHECKPOINT_CASES = {
    # name: (builder, words the message must contain)
    "missing path": (lambda d, t: d / "nope.pt", "no such file"),
    "a directory": (_directory, "is a directory"),
    "empty file": (_write(b""), "empty"),
    "truncated file": (_truncated, "truncated"),
    "text file": (_write("hello, world\n"), "text"),
    "json file": (_write('{"model": {}, "model_args": {}}'), "text/JSON"),
    "pickle not a dict": (lambda d, t: _save([1, 2, 3], d / "ckpt.pt"), "is a list, expected"),
    "no model key": (_edit_ckpt(lambda c: c.pop("model")), "no 'model' key"),
    "no model_args key": (_edit_ckpt(lambda c: c.pop("model_args")), "no 'model_args' key"),
    "missing weights": (_edit_ckpt(_drop_weight), "missing weights: transformer.h.1.mlp.c_fc.weight"),
    "unexpected weights": (_edit_ckpt(_extra_weight), "unexpected weights: transformer.h.9.ln_1.weight"),
    "mis-shaped weights": (_edit_ckpt(_misshape_weight), "transformer.ln_f.weight expected (32,) got (33,)"),
    "n_embd not divisible by n_head": (_edit_ckpt(lambda c: c["model_args"].update(n_head=3)),
                                       "n_embd=32 is not divisible by n_head=3"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint(case, tiny_ckpt, tmp_path):
    build, words = CHECKPOINT_CASES[case]
    ckpt = build(tmp_path, tiny_ckpt)
    out = tmp_path / "out"
    line = assert_error(cli("convert", ckpt, "-o", out), 1, ckpt)
    assert words in line
    assert_nothing_written(out)


def test_checkpoint_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _save({"model": MkdirOnLoad(marker), "model_args": {}}, tmp_path / "ckpt.pt")
    line = assert_error(cli("convert", ckpt, "-o", tmp_path / "out"), 1, ckpt)
    assert "refused to unpickle" in line
    assert not marker.exists()  # the payload's side effect never happened
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("explicit", [False, True], ids=["beside-checkpoint", "--tokenizer"])
def test_meta_pkl_payload_never_runs(tiny_ckpt, tmp_path, explicit):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    ckpt = Path(shutil.copy(tiny_ckpt, run / "ckpt.pt"))
    meta = run / "meta.pkl"
    meta.write_bytes(pickle.dumps({"vocab_size": 1, "itos": {0: "a"}, "stoi": MkdirOnLoad(marker)}))
    args = ["--tokenizer", meta] if explicit else []
    line = assert_error(cli("convert", ckpt, "-o", tmp_path / "out", *args), 1, meta)
    assert "refused to load posix.mkdir" in line
    assert not marker.exists()
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Model directories: `gptexport generate DIR` refuses anything it did not write


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


def _overwrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


MODEL_DIR_CASES = {
    # name: (edit the copy -> the path the message names, words)
    "missing directory": (lambda m: shutil.rmtree(m) or m, "not a model directory"),
    "missing gptexport.json": (lambda m: (m / MANIFEST).unlink() or m / MANIFEST, "missing"),
    "manifest not JSON": (lambda m: _overwrite(m / MANIFEST, b"{oops"), "not valid JSON"),
    "unknown format version": (lambda m: edit_manifest(m, format_version=99) / MANIFEST,
                               "format_version 99 is not supported (this gptexport reads 2)"),
    "tampered onnx": (lambda m: _flip_byte(m / "model.onnx") or m / "model.onnx", "sha256 does not match"),
    "truncated onnx": (lambda m: _truncate(m / "model.onnx") or m / "model.onnx", "truncated or replaced"),
    "manifest config edited": (lambda m: edit_manifest(m, config={**json.loads((m / MANIFEST).read_text())["config"],
                                                                   "n_head": 4}) / MANIFEST,
                               "io_spec inputs do not match config"),
}


@pytest.mark.parametrize("case", MODEL_DIR_CASES)
def test_bad_model_dir(case, model_copy):
    edit, words = MODEL_DIR_CASES[case]
    named = edit(model_copy)
    line = assert_error(cli("generate", model_copy, "--max-new-tokens", 2), 1, named)
    assert words in line


@pytest.fixture
def external_data_dir(model_copy) -> Path:
    """The tiny model with its weights in model.onnx.data, as export writes models over 2 GB."""
    import onnx

    model = onnx.load(str(model_copy / "model.onnx"))
    onnx.save_model(model, str(model_copy / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    return reseal(model_copy)


def test_external_data_dir_runs(external_data_dir):
    result = cli("generate", external_data_dir, "--prompt", "To be", "--max-new-tokens", 3, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["samples"][0]["tokens"]) == 3


@pytest.mark.parametrize("damage,words", [(lambda p: p.unlink(), "missing (listed in gptexport.json)"),
                                          (_flip_byte, "sha256 does not match"),
                                          (_truncate, "truncated or replaced")],
                         ids=["missing", "tampered", "truncated"])
def test_bad_external_data(external_data_dir, damage, words):
    data = external_data_dir / "model.onnx.data"
    damage(data)
    line = assert_error(cli("generate", external_data_dir, "--max-new-tokens", 2), 1, data)
    assert words in line


def test_resealed_garbage_onnx(model_copy):
    """Hashes that match but a file ONNX Runtime cannot parse: still one line, naming the file."""
    (model_copy / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    reseal(model_copy)
    line = assert_error(cli("generate", model_copy, "--max-new-tokens", 2), 1, model_copy / "model.onnx")
    assert "ONNX Runtime cannot load it" in line


@pytest.mark.parametrize("trt_version,gpu,words", [
    ("10.8.0", ("NVIDIA H100", "9.0"), "built with TensorRT 10.3.0, this is TensorRT 10.8.0"),
    ("10.3.0", ("NVIDIA A100", "8.0"), "built for NVIDIA H100 (compute capability 9.0), this GPU is NVIDIA A100 (8.0)"),
], ids=["other-tensorrt", "other-gpu"])
def test_engine_from_another_tensorrt_or_gpu(model_copy, trt_version, gpu, words):
    """An engine runs only where it was built: checked from engine_record.json before TensorRT sees it."""
    from gptexport.artifacts import engine_record
    from gptexport.artifacts.files import sha256_file
    from gptexport.artifacts.modeldir import add_files_to_manifest
    from gptexport.errors import ModelDirError

    (model_copy / engine_record.ENGINE_FILE).write_bytes(b"serialized engine")
    md = load_model_dir(model_copy)
    add_files_to_manifest(md, [engine_record.ENGINE_FILE])
    record = engine_record.EngineRecord(
        engine=engine_record.ENGINE_FILE, engine_sha256=sha256_file(model_copy / engine_record.ENGINE_FILE),
        onnx_sha256=sha256_file(md.onnx_path), precision=md.dtype, tensorrt_version="10.3.0",
        gpu_name="NVIDIA H100", compute_capability="9.0", max_batch=1, opt_seq=8, profiles=[])
    # where it was built
    engine_record.check_compatible(record, md, "10.3.0", engine_record.DeviceInfo("NVIDIA H100", "9.0"))
    with pytest.raises(ModelDirError) as info:
        engine_record.check_compatible(record, md, trt_version, engine_record.DeviceInfo(*gpu))
    message = str(info.value)
    assert "\n" not in message and str(model_copy / engine_record.ENGINE_FILE) in message
    assert words in message and "rebuild it with `gptexport build" in message


# ---------------------------------------------------------------------------------------------
# Generation inputs


GENERATE_CASES = [
    # (args, exit code, what the line names, what it says)
    (["--prompt", ""], 2, "--prompt is empty", "at least one character"),
    (["--prompt", "héllo€"], 1, "--prompt: ", "characters not in the model's vocabulary: 'é', '€'"),
    (["--prompt-tokens", "1,62"], 2, "--prompt-tokens: ", "out of range: 62 (valid: 0..61)"),
    (["--prompt-tokens", "1,-1"], 2, "--prompt-tokens", "not token ids: '-1'"),
    (["--prompt-tokens", "-1"], 2, "--prompt-tokens", "'-1'"),
    (["--prompt-tokens", "1,,2"], 2, "--prompt-tokens", "comma-separated"),
    (["--prompt", "a", "--prompt-tokens", "1"], 2, "--prompt", "only one of"),
    (["--temperature", "-0.5"], 2, "--temperature", ">= 0"),
    (["--temperature", "nan"], 2, "--temperature", "finite"),
    (["--top-k", "-1"], 2, "--top-k", ">= 0"),
    (["--top-p", "0"], 2, "--top-p", "(0, 1]"),
    (["--top-p", "1.5"], 2, "--top-p", "(0, 1]"),
    (["--max-new-tokens", "-1"], 2, "--max-new-tokens", ">= 0"),
    (["--num-samples", "0"], 2, "--num-samples", ">= 1"),
    (["--threads", "0"], 2, "--threads", "x>=1"),
    (["--max-new-tokens", "many"], 2, "--max-new-tokens", "not a valid integer"),
    (["--backend", "cuda-magic"], 2, "cuda-magic", "valid: onnxruntime"),
    (["--prompt-file", "{tmp}/nope.txt"], 1, "nope.txt", "not found"),
    (["--prompt-file", "{tmp}"], 1, "{tmp}", "cannot read"),
    (["--prompt-file", "{tmp}/latin1.txt"], 1, "latin1.txt", "not UTF-8"),
    (["--prompt-file", "{tmp}/empty.txt"], 1, "--prompt-file {tmp}/empty.txt", "is empty"),
    (["--bogus"], 2, "--bogus", "No such option"),
]


@pytest.mark.parametrize("args,code,named,words", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_bad_generate_input(tiny_model_dir, tmp_path, args, code, named, words):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    line = assert_error(cli("generate", tiny_model_dir, "--max-new-tokens", 2, *args), code,
                        named.format(tmp=tmp_path))
    assert words in line


def test_long_prompt_is_cropped_with_a_notice(tiny_model_dir):
    result = cli("generate", tiny_model_dir, "--prompt", "To be or not to be, that is the question",
                 "--max-new-tokens", 3, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["notice: prompt has 40 tokens, more than block_size 16; "
                                          "using its last 16 tokens, as nanoGPT does"]
    assert len(json.loads(result.stdout)["samples"][0]["tokens"]) == 3


def test_nan_logits(model_copy):
    """A graph whose weights are NaN (resealed, so it loads): generation stops with one clear line."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_copy / "model.onnx"))
    for init in model.graph.initializer:
        if init.name.endswith("wpe.weight"):
            init.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(init), np.nan), init.name))
    onnx.save(model, str(model_copy / "model.onnx"))
    reseal(model_copy)
    line = assert_error(cli("generate", model_copy, "--max-new-tokens", 2, "--json"), 1, "onnxruntime")
    assert "NaN/inf logits" in line


def test_debug_shows_the_traceback(tiny_model_dir):
    result = CliRunner().invoke(main, ["--debug", "generate", str(tiny_model_dir), "--top-k", "-1"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith("error: --top-k")


# ---------------------------------------------------------------------------------------------
# Outputs: OUTDIR is complete, or absent, or the old one untouched


def fake_export(tiny_model_dir: Path):
    """Stands in for torch.onnx.export (seconds on a small machine): writes the already-exported graph.

    Everything else in convert (loading, validation against PyTorch, the manifest, staging) is real.
    """
    def export_onnx(model, spec, path):
        shutil.copyfile(tiny_model_dir / "model.onnx", path)
    return export_onnx


@pytest.fixture
def quick_export(monkeypatch, tiny_model_dir):
    import gptexport.convert.export

    monkeypatch.setattr(gptexport.convert.export, "export_onnx", fake_export(tiny_model_dir))


def test_missing_parents_are_created_and_removed_on_failure(tiny_ckpt, tmp_path, quick_export, file_size_limit):
    out = tmp_path / "new" / "dirs" / "out"
    assert cli("convert", tiny_ckpt, "-o", out).exit_code == 0 and load_model_dir(out)
    failing = tmp_path / "other" / "dirs" / "out"
    file_size_limit()
    assert_error(cli("convert", tiny_ckpt, "-o", failing), 1, failing)
    assert not (tmp_path / "other").exists()


def test_existing_outdir_refused_untouched(tiny_ckpt, tiny_model_dir):
    before = snapshot(tiny_model_dir)
    line = assert_error(cli("convert", tiny_ckpt, "-o", tiny_model_dir), 2, tiny_model_dir)
    assert "--force" in line
    assert snapshot(tiny_model_dir) == before and staging_leftovers(tiny_model_dir) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_replaces_atomically(tiny_ckpt, tmp_path, quick_export, monkeypatch, exchange):
    if not exchange:  # systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr("gptexport.artifacts.files._exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli("convert", tiny_ckpt, "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and load_model_dir(out).config.block_size == 16
    assert staging_leftovers(out) == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("out,words", [("/proc/gptexport-out", "cannot write in /proc"),
                                       ("/sys/gptexport-out", "cannot write in /sys"),
                                       ("{ckpt}/out", "is not a directory"),
                                       ("{ckpt}/sub/out", "cannot create directory")])
def test_unwritable_location(tiny_ckpt, tmp_path, out, words):
    out = Path(out.format(ckpt=tiny_ckpt, tmp=tmp_path))
    line = assert_error(cli("convert", tiny_ckpt, "-o", out), 1, out)
    assert words in line
    assert not out.exists()


@pytest.fixture
def file_size_limit():
    """Writes past 64 KiB fail with EFBIG, as on a full disk (no root needed, unlike a tiny tmpfs)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("force", [False, True], ids=["new", "--force"])
def test_full_disk(tiny_ckpt, tmp_path, quick_export, file_size_limit, force):
    out = tmp_path / "out"
    if force:
        out.mkdir()
        (out / "old.txt").write_text("old")
    file_size_limit()
    result = cli("convert", tiny_ckpt, "-o", out, *(["--force"] if force else []))
    line = assert_error(result, 1, out)
    assert "write failed: File too large" in line
    if force:
        assert snapshot(out) == {"old.txt": b"old"} and staging_leftovers(out) == []
        assert "the old directory is unchanged" in line
    else:
        assert_nothing_written(out)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs: a real ENOSPC. Needs root (mount); skipped elsewhere."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_tmpfs(tiny_ckpt, tiny_tmpfs, quick_export):
    out = tiny_tmpfs / "out"
    line = assert_error(cli("convert", tiny_ckpt, "-o", out), 1, out)
    assert "write failed: No space left on device" in line
    assert_nothing_written(out)


def _kill_mid_convert(ckpt: Path, out: Path, *extra: str) -> None:
    """Start a real `gptexport convert` and SIGKILL it once its staging directory exists."""
    proc = subprocess.Popen([sys.executable, "-m", "gptexport", "convert", str(ckpt), "-o", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(".partial-" in name for name in staging_leftovers(out)):
            assert proc.poll() is None, "convert ended before it could be killed"
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.05)
        time.sleep(0.2)  # into the export proper
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_nan_weights_fail_validation(tiny_ckpt, tmp_path, quick_export):
    """A checkpoint with NaN weights: PyTorch's logits are NaN, the convert refuses to keep the graph."""
    import torch

    ckpt = _ckpt_dict(tiny_ckpt)
    ckpt["model"]["transformer.ln_f.weight"] = torch.full((32,), float("nan"))
    path = _save(ckpt, tmp_path / "ckpt.pt")
    (tmp_path / "meta.pkl").write_bytes((tiny_ckpt.parent / "meta.pkl").read_bytes())
    line = assert_error(cli("convert", path, "-o", tmp_path / "out"), 1, "model.onnx")
    assert "differ from PyTorch by nan" in line
    assert_nothing_written(tmp_path / "out")


def test_only_dead_processes_staging_dirs_are_removed(tmp_path):
    from gptexport.artifacts.files import remove_stale_staging

    out = tmp_path / "out"
    live = tmp_path / f".out.partial-{os.getpid()}-abc"  # a concurrent convert's: left alone
    dead = tmp_path / ".out.old-999999999-xyz"  # no such pid (above any pid_max)
    other = tmp_path / ".other.partial-999999999-xyz"  # another OUTDIR's
    for d in (live, dead, other):
        d.mkdir()
    assert remove_stale_staging(out) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def test_killed_mid_convert(tiny_ckpt, tmp_path, quick_export):
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    (old / "old.txt").write_text("old")
    _kill_mid_convert(tiny_ckpt, new)
    _kill_mid_convert(tiny_ckpt, old, "--force")
    assert not new.exists()
    assert snapshot(old) == {"old.txt": b"old"}  # --force replaces only at the very end
    # a SIGKILLed process cannot clean up: its staging dir stays until the next convert there
    assert staging_leftovers(new) and staging_leftovers(old)
    assert cli("convert", tiny_ckpt, "-o", new).exit_code == 0
    assert staging_leftovers(new) == [] and load_model_dir(new)


# ---------------------------------------------------------------------------------------------
# One loaded model shared by threads; python -m gptexport; the soak script


def test_threads_sharing_a_runner_match_sequential(tiny_model_dir):
    from conftest import engine_generate

    from gptexport.runtime.backends.ort import OrtRunner
    from gptexport.runtime.sampling import SamplingParams

    params = SamplingParams(0.9, top_k=20)
    prompts = [np.array([[i % 60, (3 * i) % 60]]) for i in range(6)]

    def generate(runner, prompt, n: int, params: SamplingParams, i: int) -> np.ndarray:
        return engine_generate(runner, prompt, n, params, seed=i)

    with OrtRunner(load_model_dir(tiny_model_dir)) as runner:
        # 40 tokens on block_size 16: prefill, decode and the sliding window, each thread an engine of
        # its own on one runner, all concurrently
        want = [generate(runner, p, 40, params, i) for i, p in enumerate(prompts)]
        got: list = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts))

        def work(i: int) -> None:
            barrier.wait()
            got[i] = generate(runner, prompts[i], 40, params, i)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i in range(len(prompts)):
        np.testing.assert_array_equal(got[i], want[i], err_msg=f"thread {i}")


def test_python_dash_m_and_no_traceback_in_a_real_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptexport", "generate", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'missing'}: not a model directory "
                                          f"(run `gptexport convert CKPT -o {tmp_path / 'missing'}` first)"]


def test_soak_script_quick(tiny_model_dir):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), str(tiny_model_dir),
                             "--tokens", "300", "--every", "100", "--warmup", "100"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RSS" in result.stdout

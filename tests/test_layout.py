"""The house rules of the package layout, checked on the code itself.

- The runtime side (runtime/, serve/, artifacts/ and the shared modules at the root) never imports
  convert/, build/ or verify/, not even lazily inside a function: a serving box loads the least code.
- It imports where torch, onnx, TensorRT (and safetensors, transformers, matplotlib) cannot be.
- No import circle anywhere in the package, lazy imports included.
- No module over 500 lines.
And the runtime path works end to end in a process where `import torch` fails.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import gptexport

PACKAGE = Path(gptexport.__file__).parent
RUNTIME_SIDE = ("runtime", "serve", "artifacts")
SHARED = ("gptexport", "gptexport.errors", "gptexport.config", "gptexport.profiles")
BUILD_SIDE = ("convert", "build", "verify")
HEAVY = ("torch", "onnx", "tensorrt", "safetensors", "transformers", "matplotlib")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every gptexport module `name` imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def is_runtime_side(name: str) -> bool:
    return name in SHARED or name.split(".")[1] in RUNTIME_SIDE


def test_runtime_side_never_imports_the_build_side():
    bad = [f"{name} imports {dep}" for name in MODULES if is_runtime_side(name)
           for dep in sorted(imports(name)) if dep.split(".")[1:2] and dep.split(".")[1] in BUILD_SIDE]
    assert not bad, "the runtime side imports convert/, build/ or verify/:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = {name: imports(name) for name in MODULES}
    circles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_runtime_side_imports_without_heavy_libraries(tmp_path):
    runtime = sorted(n for n in MODULES if is_runtime_side(n))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HEAVY))  # any import of them fails
    code = ("import importlib, sys\n"
            f"for name in {runtime!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in {HEAVY!r} if sys.modules.get(m) is not None))\n")
    env = {"PYTHONPATH": f"{site}:{':'.join(sys.path[1:])}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert len(runtime) > 20  # the walk found the modules it should


def test_every_stage_has_its_folder():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {"artifacts", "convert", "build", "runtime", "verify", "serve", "bench", "cli"} <= stages


def test_no_module_is_over_500_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


# ---- the runtime path, run where torch cannot be imported ----

BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def run_without_torch(tmp_path, code: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": f"{site}:{':'.join(sys.path[1:])}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def test_generate_cli_without_torch(tiny_model_dir, tmp_path):
    code = ("import importlib.util, sys\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    sys.exit('torch importable')\n"
            "from gptexport.cli import main\n"
            f"main(['generate', {str(tiny_model_dir)!r}, '--prompt', 'To be', '--max-new-tokens', '20', '--json'])\n")
    result = run_without_torch(tmp_path, code)
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)["samples"]
    assert len(samples[0]["tokens"]) == 20 and isinstance(samples[0]["text"], str)


def test_serving_code_without_torch(tiny_model_dir, tmp_path):
    """Everything the Triton model and `gptexport serve` import runs where torch cannot be imported."""
    code = ("import numpy as np\n"
            "import gptexport.serve.model, gptexport.serve.server\n"
            "from gptexport.serve.repository import write_repository\n"
            "from gptexport.serve.model import open_served_model\n"
            f"write_repository({str(tiny_model_dir)!r}, {str(tmp_path / 'repo')!r})\n"
            f"m = open_served_model({str(tiny_model_dir)!r}, 'onnxruntime', 64)\n"
            "req = m.parse({'text_input': np.array([[b'To be']], dtype=object)}, {})\n"
            "out = []\n"
            "print(len(m.run(req, lambda seq, ids, text: out.append(text)).tokens), len(out))\n")
    result = run_without_torch(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "64"]


# The one generation engine: only the scheduler makes a batch cache and runs its forwards; a runner's
# `infer` is the host runner's way to run the graph (and the export's validation runs its own session).
FORWARD_CALLS = {"new_batch_cache": {"gptexport.runtime.scheduler"},
                 "prefill": {"gptexport.runtime.scheduler"},
                 "infer": {"gptexport.runtime.backends.base"},
                 "forward": set(), "new_cache": set()}


def test_only_the_engine_drives_a_runners_forward():
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                allowed = FORWARD_CALLS.get(node.func.attr)
                if allowed is not None and name not in allowed:
                    bad.append(f"{name}:{node.lineno} calls .{node.func.attr}()")
    assert not bad, "only runtime/scheduler.py runs a model forward for generation:\n" + "\n".join(bad)


def test_one_cache_family():
    """The batch cache is the only KV cache: no runner defines another."""
    runners = [p for p in PACKAGE.rglob("*.py") if p.parent.name in ("runtime", "backends", "verify")]
    defined = {node.name for path in runners for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert not defined & {"HostCache", "OrtCache", "DeviceCache", "Slot", "SlotPool", "new_cache", "forward"}

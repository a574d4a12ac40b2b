"""The runtime path works in a process where `import torch` fails."""

import json
import subprocess
import sys

BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def run_without_torch(tmp_path, code: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {"PYTHONPATH": f"{site}:{':'.join(sys.path[1:])}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


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
            "from gptexport.serve.session import open_served_model\n"
            f"write_repository({str(tiny_model_dir)!r}, {str(tmp_path / 'repo')!r})\n"
            f"m = open_served_model({str(tiny_model_dir)!r}, 'onnxruntime', 64)\n"
            "req = m.parse({'text_input': np.array([[b'To be']], dtype=object)}, {})\n"
            "out = []\n"
            "print(len(m.run(req, lambda ids, text: out.append(text)).tokens), len(out))\n")
    result = run_without_torch(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "64"]

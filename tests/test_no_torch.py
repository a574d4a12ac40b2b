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

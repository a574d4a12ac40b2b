"""Stage 4, verify: `gptexport parity`, every backend against the checkpoint in PyTorch fp32 (or a
golden file of it): tolerances, comparison math, the runs, the checks, the report."""

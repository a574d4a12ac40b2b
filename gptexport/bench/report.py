"""The benchmark report as a table and a plot: ratios against the baselines measured in the same run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MB = 1e6


def _find(report: dict, runtime: str, weights: str = "fp32") -> dict | None:
    return next((r for r in report["results"] if r["runtime"] == runtime and r["weights"] == weights), None)


def _transformers_for(report: dict, result: dict) -> dict | None:
    """The transformers row to compare a row with: on the same GPU in the same dtype for GPU rows,
    else transformers on the CPU in fp32."""
    if result.get("device", "cpu") != "cpu":
        return _find(report, "transformers-cuda", result["weights"])
    return _find(report, "transformers")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}×" if a and b and a == a and b == b else "–"


def floor_tok_s(report: dict, result: dict, stream: str = "copy") -> float | None:
    """The decode rate memory bandwidth allows at most: bandwidth / weight bytes read per token."""
    wb = result.get("weight_bytes_per_token")
    if result.get("device", "cpu") != "cpu":
        return None  # the bandwidth measured is the CPU's
    return report["memory_bandwidth_bytes_s"][stream] / wb if wb else None


def table(report: dict) -> str:
    """The report as a markdown table plus the bandwidth floor, ratios against the baselines."""
    b1 = lambda r, k: r["by_batch"].get("1", {}).get(k)
    nano = _find(report, "nanoGPT")
    bmax = str(max(report["config"]["batches"]))
    c_lo, c_hi = (str(c) for c in (list(report["config"]["contexts"]) + [None, None])[:2])
    rows = ["| runtime | weights | decode tok/s (B=1) | × nanoGPT | × transformers | ÷ floor (copy) | ÷ floor (read) "
            f"| prefill tok/s | TTFT ms | decode tok/s (B={bmax}) | peak RSS MB (B=1) | ms/token @{c_lo} | @{c_hi} | ratio |",
            "|" + "---|" * 14]
    for r in report["results"]:
        d = b1(r, "decode_tok_s")
        lo, hi = r["ms_per_token_at"].get(c_lo), r["ms_per_token_at"].get(c_hi)
        hf = _transformers_for(report, r)
        label = r["runtime"] + (f" ({r['variant']})" if r.get("variant") else "")
        rows.append("| " + " | ".join([
            label, r["weights"], _fmt(d), _ratio(d, nano and b1(nano, "decode_tok_s")),
            _ratio(d, hf and b1(hf, "decode_tok_s")),
            *(_ratio_plain(d, floor_tok_s(report, r, k)).rstrip("×") for k in ("copy", "read")),
            _fmt(b1(r, "prefill_tok_s")), _fmt(b1(r, "ttft_ms")), _fmt(r["by_batch"].get(bmax, {}).get("decode_tok_s")),
            _fmt(b1(r, "peak_rss_mb")),
            _fmt(lo), _fmt(hi), f"{hi / lo:.2f}" if lo and hi else "–"]) + " |")
    bw = report["memory_bandwidth_bytes_s"]
    lines = [f"memory bandwidth ({report['config']['threads']} threads): copy {bw['copy'] / 1e9:.1f} GB/s "
             f"(read + write), read {bw['read'] / 1e9:.1f} GB/s; decode floor = bandwidth / weight bytes "
             f"read per token:"]
    for r in report["results"]:
        if floor_tok_s(report, r):
            rss = r["by_batch"].get("1", {}).get("peak_rss_mb")
            lines.append(f"  {r['weights']}: {r['weight_bytes_per_token'] / MB:.0f} MB/token -> "
                         f"{floor_tok_s(report, r, 'copy'):.0f} tok/s (copy), "
                         f"{floor_tok_s(report, r, 'read'):.0f} tok/s (read); peak RSS at batch 1 = "
                         f"{_ratio_plain(rss and rss * MB, r.get('weight_bytes'))} the {r['weight_bytes'] / MB:.0f} MB of weights")
    return "\n".join(rows + [""] + lines + [f"note: {n}" for n in report["notes"]])


def _ratio_plain(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _fmt(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def plot(report: dict, path: str | Path) -> None:
    """Decode tok/s per runtime and batch (with the bandwidth floors), and ms/token per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = [f"{r['runtime']}\n{r['weights']}" for r in results]
    x = np.arange(len(results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    batches = report["config"]["batches"]
    w = 0.8 / max(len(batches), 1)
    for i, b in enumerate(batches):
        vals = [r["by_batch"].get(str(b), {}).get("decode_tok_s", 0) for r in results]
        ax1.bar(x + (i - (len(batches) - 1) / 2) * w, vals, w, label=f"batch {b}")
    for i, r in enumerate(results):  # each precision's floor, over its own bars
        for stream, style in (("copy", ":"), ("read", "--")):
            f = floor_tok_s(report, r, stream)
            if f:
                ax1.hlines(f, i - 0.45, i + 0.45, ls=style, lw=1.2, color="black",
                           label=f"bandwidth floor, B=1 ({stream})" if i == 0 else None)
    ax1.set(yscale="log", ylabel="decode tokens/s (all sequences)", title="Decode throughput")
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.legend(fontsize=8)
    contexts = report["config"]["contexts"]
    w = 0.8 / max(len(contexts), 1)
    for i, c in enumerate(contexts):
        vals = [r["ms_per_token_at"].get(str(c), 0) for r in results]
        ax2.bar(x + (i - (len(contexts) - 1) / 2) * w, vals, w, label=f"context {c}")
    ax2.set(yscale="log", ylabel="ms per decoded token (batch 1)", title="Decode cost as the context grows")
    ax2.set_xticks(x, labels, fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{report['model']['n_layer']}-layer, {report['model']['n_embd']}-wide GPT; "
                 f"{report['config']['threads']} threads; {report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The benchmark report as a table and a plot: ratios against the baselines measured in the same run.

Medians over the rounds, with their min-max bands where the report has them; a ratio against a peer
(llama.cpp, CTranslate2: same weights, same precision) is the median of the per-round ratios (both
measured in the same round), with their min-max band.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from .peers import NAMES as PEERS
from .peers import SAME_PRECISION

# what a model directory runs on in ONNX Runtime without our kernels (the bench's rows of each
# precision with `--kernels off`, beside ours with `on`): the quantized matmuls, and for every float32
# cache the attention as its mask graph (our CachedAttention with the kernels on)
ONNX_RUNTIME_OPS = {"fp32": "mask-graph attention", "int4": "MatMulNBits", "int8": "MatMulInteger"}

MB = 1e6


def _find(report: dict, runtime: str, weights: str = "fp32") -> dict | None:
    return next((r for r in report["results"] if r["runtime"] == runtime and r["weights"] == weights), None)


def _transformers_for(report: dict, result: dict) -> dict | None:
    """The transformers row to compare a row with: on the same GPU in the same dtype for GPU rows,
    else transformers on the CPU in fp32."""
    if result.get("device", "cpu") != "cpu":
        return _find(report, "transformers-cuda", result["weights"])
    return _find(report, "transformers")


def _peer_for(report: dict, result: dict, peer: str) -> dict | None:
    """The peer's row at our row's precision (CPU rows of our runtime only)."""
    if not result["runtime"].startswith("gptexport-") or result.get("device", "cpu") != "cpu":
        return None
    weights = SAME_PRECISION[peer].get(result["weights"])
    return _find(report, peer, weights) if weights else None


def _per_round(report: dict, result: dict) -> list[dict]:
    """The row in every round (the rounds list the rows in the order of report["results"])."""
    i = next(i for i, r in enumerate(report["results"]) if r is result)
    rounds = [r["results"][i] for r in report.get("rounds", []) if i < len(r["results"])]
    return rounds or [result]


def _get(r: dict, key: tuple) -> float | None:
    """A figure of a row: ("by_batch", "1", "decode_tok_s"), or ("ms_per_token_at", "900") (as a rate)."""
    if key[0] == "ms_per_token_at":
        ms = r["ms_per_token_at"].get(key[1])
        return 1e3 / ms if ms else None
    return r["by_batch"].get(key[1], {}).get(key[2])


def peer_ratio(report: dict, ours: dict, peer: dict, key: tuple) -> tuple[float, float, float] | None:
    """(median, min, max) over the rounds of ours / peer for one figure (a rate: higher is faster)."""
    ratios = [a / b for a, b in zip((_get(r, key) for r in _per_round(report, ours)),
                                    (_get(r, key) for r in _per_round(report, peer))) if a and b and a == a and b == b]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else None


def _fmt_ratio(r: tuple[float, float, float] | None) -> str:
    if r is None:
        return "–"
    med, lo, hi = r
    return f"{med:.2f}×" + (f" ({lo:.2f}–{hi:.2f})" if hi > lo else "")


def _banded(r: dict, key: tuple) -> str:
    """A median with its min-max band over the rounds, e.g. "43.0 (41.2–44.1)"."""
    value = _get(r, key)
    band = r.get("bands") or {}
    for k in key:
        band = band.get(k) if isinstance(band, dict) else None
    if value is None or not isinstance(band, list) or band[1] <= band[0]:
        return _fmt(value)
    return f"{_fmt(value)} ({_fmt(band[0])}–{_fmt(band[1])})"


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
    def b1(r: dict, k: str):
        return r["by_batch"].get("1", {}).get(k)

    nano = _find(report, "nanoGPT")
    bmax = str(max(report["config"]["batches"]))
    c_lo, c_hi = (str(c) for c in (list(report["config"]["contexts"]) + [None, None])[:2])
    rows = ["| runtime | weights | decode tok/s (B=1) | × nanoGPT | × transformers | × llama.cpp same precision "
            "| × CTranslate2 | ÷ floor (copy) | ÷ floor (read) "
            f"| prefill tok/s | TTFT ms | decode tok/s (B={bmax}) | peak RSS MB (B=1) | ms/token @{c_lo} "
            f"| @{c_hi if c_hi != 'None' else '–'} | ratio |",
            "|" + "---|" * 16]
    for r in report["results"]:
        d = b1(r, "decode_tok_s")
        lo, hi = r["ms_per_token_at"].get(c_lo), r["ms_per_token_at"].get(c_hi)
        hf = _transformers_for(report, r)
        label = r["runtime"] + (f" ({r['variant']})" if r.get("variant") else "")
        peers = [_peer_for(report, r, p) for p in PEERS]
        rows.append("| " + " | ".join([
            label, r["weights"], _banded(r, ("by_batch", "1", "decode_tok_s")),
            _ratio(d, nano and b1(nano, "decode_tok_s")), _ratio(d, hf and b1(hf, "decode_tok_s")),
            *(_fmt_ratio(p and peer_ratio(report, r, p, ("by_batch", "1", "decode_tok_s"))) for p in peers),
            *(_ratio_plain(d, floor_tok_s(report, r, k)).rstrip("×") for k in ("copy", "read")),
            _banded(r, ("by_batch", "1", "prefill_tok_s")), _fmt(b1(r, "ttft_ms")),
            _banded(r, ("by_batch", bmax, "decode_tok_s")),
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
                         f"{_ratio_plain(rss and rss * MB, r.get('weight_bytes'))} "
                         f"the {r['weight_bytes'] / MB:.0f} MB of weights")
    lines += [f"  {r['runtime']} {r['weights']}: {r['note']}" for r in report["results"] if r.get("note")]
    lines += kernel_lines(report)
    return "\n".join(rows + [""] + peer_table(report) + lines + [f"note: {n}" for n in report["notes"]])


def kernel_lines(report: dict) -> list[str]:
    """Each precision with our kernels ÷ with ONNX Runtime's own ops, per batch size (both rows
    measured in this run)."""
    lines, flags = [], report.get("machine", {}).get("cpu_flags", "")
    for weights, op in ONNX_RUNTIME_OPS.items():
        rows = [r for r in report["results"] if r.get("weights") == weights]
        ours = next((r for r in rows if r.get("variant") == "our kernels"), None)
        theirs = next((r for r in rows if r.get("variant") == op), None)
        if not ours or not theirs:
            continue
        ratios = [f"B={b} {_ratio_plain(ours['by_batch'][b]['decode_tok_s'], theirs['by_batch'][b]['decode_tok_s'])}"
                  for b in ours["by_batch"] if b in theirs["by_batch"]]
        lines.append(f"{weights} decode, our kernels ÷ {op}: {', '.join(ratios)} (CPU flags: {flags or 'unknown'})")
    return lines


def peer_table(report: dict) -> list[str]:
    """Our rows against each peer at the same precision: ours / the peer's, per figure (empty: no peers)."""
    bmax = str(max(report["config"]["batches"]))
    contexts = [str(c) for c in report["config"].get("contexts", [])]
    keys = [("decode tok/s (B=1)", ("by_batch", "1", "decode_tok_s")),
            (f"decode tok/s (B={bmax})", ("by_batch", bmax, "decode_tok_s")),
            ("prefill tok/s (B=1)", ("by_batch", "1", "prefill_tok_s"))]
    keys += [(f"decode tok/s @{c}", ("ms_per_token_at", c)) for c in contexts[-1:]]
    rows = []
    for r in report["results"]:
        for p in PEERS:
            peer = _peer_for(report, r, p)
            if peer is None:
                continue
            cells = []
            for _, key in keys:
                a, b, q = _get(r, key), _get(peer, key), peer_ratio(report, r, peer, key)
                cells.append(f"{_fmt(a)} / {_fmt(b)} = {_fmt_ratio(q)}" if q else "–")
            ours = r["runtime"] + (f" ({r['variant']})" if r.get("variant") else "")
            rows.append(f"| {ours} {r['weights']} | {p} {peer['weights']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    rounds = len(report.get("rounds", [])) or 1
    head = ["against the peers, same weights and precision: ours / the peer's = the median of the per-round "
            f"ratios ({rounds} round{'s' if rounds != 1 else ''}) and their min–max:", "",
            "| ours | peer | " + " | ".join(k for k, _ in keys) + " |", "|" + "---|" * (2 + len(keys))]
    return head + rows + [""]


def _ratio_plain(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _fmt(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def plot(report: dict, path: str | Path) -> None:
    """Decode tok/s per runtime and batch (with the bandwidth floors), ms/token per context and, when
    the peers were measured, our decode rate ÷ each peer's at the same precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    labels = [f"{r['runtime']}\n{r['weights']}" for r in results]
    x = np.arange(len(results))
    pairs = [(r, p) for r in results for p in (_peer_for(report, r, name) for name in PEERS) if p]
    widths = [len(results), len(results)] + ([max(len(pairs), 3)] if pairs else [])
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(max(13, 1.6 * len(results)) + (5 if pairs else 0), 5.2),
                             gridspec_kw={"width_ratios": widths})
    ax1, ax2 = axes[:2]
    batches = report["config"]["batches"]
    w = 0.8 / max(len(batches), 1)
    hatch = ["//" if r["runtime"] in PEERS else None for r in results]  # the peers' bars hatched
    for i, b in enumerate(batches):
        vals = [r["by_batch"].get(str(b), {}).get("decode_tok_s", 0) for r in results]
        bands = [((r.get("bands") or {}).get("by_batch") or {}).get(str(b), {}).get("decode_tok_s") for r in results]
        err = np.array([[v - band[0], band[1] - v] if band and v else [0, 0] for v, band in zip(vals, bands)]).T
        bars = ax1.bar(x + (i - (len(batches) - 1) / 2) * w, vals, w, yerr=err, capsize=2,
                       error_kw={"lw": 0.8}, label=f"batch {b}")
        for bar, h in zip(bars, hatch):
            bar.set_hatch(h)
    for i, r in enumerate(results):  # each precision's floor, over its own bars
        for stream, style in (("copy", ":"), ("read", "--")):
            f = floor_tok_s(report, r, stream)
            if f:
                ax1.hlines(f, i - 0.45, i + 0.45, ls=style, lw=1.2, color="black",
                           label=f"bandwidth floor, B=1 ({stream})" if i == 0 else None)
    ax1.set(yscale="log", ylabel="decode tokens/s (all sequences)",
            title="Decode throughput (median, min–max over rounds; peers hatched)")
    ax1.set_xticks(x, labels, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax1.legend(fontsize=8)
    contexts = report["config"]["contexts"]
    w = 0.8 / max(len(contexts), 1)
    for i, c in enumerate(contexts):
        vals = [r["ms_per_token_at"].get(str(c), 0) for r in results]
        ax2.bar(x + (i - (len(contexts) - 1) / 2) * w, vals, w, label=f"context {c}")
    ax2.set(yscale="log", ylabel="ms per decoded token (batch 1)", title="Decode cost as the context grows")
    ax2.set_xticks(x, labels, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax2.legend(fontsize=8)
    if pairs:
        _plot_peer_ratios(axes[2], report, pairs)
    fig.suptitle(f"{report['model']['n_layer']}-layer, {report['model']['n_embd']}-wide GPT; "
                 f"{report['config']['threads']} threads; {report['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_peer_ratios(ax, report: dict, pairs: list[tuple[dict, dict]]) -> None:
    """Our decode rate ÷ the peer's at the same precision, per batch: median and min–max over the rounds."""
    batches = report["config"]["batches"]
    x = np.arange(len(pairs))
    w = 0.8 / max(len(batches), 1)
    for i, b in enumerate(batches):
        stats = [peer_ratio(report, ours, peer, ("by_batch", str(b), "decode_tok_s")) or (0, 0, 0)
                 for ours, peer in pairs]
        med = np.array([m for m, _, _ in stats])
        err = np.array([[m - lo, hi - m] for m, lo, hi in stats]).T
        ax.bar(x + (i - (len(batches) - 1) / 2) * w, med, w, yerr=err, capsize=2, error_kw={"lw": 0.8},
               label=f"batch {b}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set(ylabel="our decode tok/s ÷ the peer's", title="Against the peers, same weights and precision")
    ax.set_xticks(x, [f"{o['weights']} ÷\n{p['runtime']} {p['weights']}" for o, p in pairs], fontsize=8,
                  rotation=30, ha="right", rotation_mode="anchor")
    ax.legend(fontsize=8)

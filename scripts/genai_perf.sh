#!/usr/bin/env bash
# genai_perf.sh -- NVIDIA GenAI-Perf (the standard LLM load client for Triton) against `gptexport serve`.
#
#   bash scripts/genai_perf.sh OUTDIR [--concurrency "1 4 16"] [--max-batch "1 16"] [--requests N]
#                              [--input-tokens 64] [--output-tokens 128] [--threads N] [--peers DIR]
#                              [--input-tokens-stddev 0] [--output-tokens-stddev 0] [--llama-gguf FILE.gguf]
#
# For each --max-batch value it writes a Triton repository (`gptexport triton --max-batch`), starts
# `gptexport serve` on 127.0.0.1 (free ports), and for each --concurrency value runs
#   genai-perf profile --backend tensorrtllm --endpoint-type kserve --streaming
#                      --output-tokens-mean-deterministic ...
# i.e. TensorRT-LLM's request (text_input, max_tokens, min_length = max_tokens, stream) over gRPC,
# so every request makes exactly --output-tokens tokens. With --llama-gguf (the same weights converted by
# llama.cpp's convert_hf_to_gguf.py, see prepare_peers.sh) the same client, in the same run, also loads
# llama.cpp's `llama-server -np 16 -cb -t 2` through its OpenAI completions endpoint (--endpoint-type
# completions; GenAI-Perf's deterministic mode is Triton-only, so max_tokens with ignore_eos and
# min_tokens make every token there). It prints one markdown table (output
# tokens/s, requests/s, time to first token p50/p99, inter-token latency p50/p99) and keeps every
# GenAI-Perf artifact under WORK (default: a temporary directory, printed).
#
# --input-tokens-stddev / --output-tokens-stddev (GenAI-Perf's --synthetic-input-tokens-stddev and
# --output-tokens-stddev) make the prompt and output lengths ragged: GenAI-Perf draws each request's
# from a normal distribution around the means (its own generator, --random-seed 0, so the same
# requests for both servers). llama-server then gets no min_tokens (ignore_eos alone makes every token
# of each request's max_tokens) and slots long enough for mean + 3 stddev. For wide, skewed lengths
# (log-uniform prompts, 10 to 400 tokens) see scripts/serve_load.py --load ragged.
#
# The client comes from `bash scripts/prepare_peers.sh --only genai-perf` (a venv of its own with
# genai-perf 0.0.16 and tritonclient[all] 2.51.0, whose perf_analyzer runs on this glibc with
# Debian's libb64-0d and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel). GenAI-Perf needs a
# Hugging Face tokenizer to make prompts and count tokens and cannot download one here: this script
# writes one for the model directory (GPT-2 BPE: its encoder.json / vocab.bpe as GPT2Tokenizer files;
# a character vocabulary: a WordLevel tokenizer.json of its characters).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
CONCURRENCY="1 4 16"; MAX_BATCH="1 16"; REQUESTS=""; ISL=64; OSL=128; THREADS=0; ISL_SD=0; OSL_SD=0
PEERS="${GPTEXPORT_PEERS:-$HOME/.cache/gptexport-peers}"; WORK=""; MODEL_DIR=""; GGUF=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --max-batch) MAX_BATCH="$2"; shift 2 ;;
    --requests) REQUESTS="$2"; shift 2 ;;
    --input-tokens) ISL="$2"; shift 2 ;;
    --output-tokens) OSL="$2"; shift 2 ;;
    --input-tokens-stddev) ISL_SD="$2"; shift 2 ;;
    --output-tokens-stddev) OSL_SD="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --peers) PEERS="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --llama-gguf) GGUF="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    *) MODEL_DIR="$1"; shift ;;
  esac
done
[[ -n "$MODEL_DIR" ]] || { usage >&2; exit 2; }
GENAI_PERF="$PEERS/bin/genai-perf"
[[ -x "$GENAI_PERF" ]] || { echo "error: $GENAI_PERF not found: run bash scripts/prepare_peers.sh --only genai-perf" >&2; exit 1; }
PY="$(dirname "$(readlink -f "$0")")/../.venv/bin/python"; [[ -x "$PY" ]] || PY=python3
GP_PY="$PEERS/venvs/genai-perf/bin/python"
WORK="${WORK:-$(mktemp -d -t gptexport-genai-perf-XXXX)}"; mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing may be downloaded: the tokenizer is local

# ---- a local tokenizer directory for the model ------------------------------------------------------
"$GP_PY" - "$MODEL_DIR" "$WORK/tokenizer" <<'EOF'
import json, shutil, sys
from pathlib import Path
model, out = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((model / "gptexport.json").read_text())
tok = manifest.get("tokenizer") or {}
out.mkdir(parents=True, exist_ok=True)
if tok.get("type") == "gpt2":
    files = tok["files"]
    shutil.copyfile(model / files["encoder.json"], out / "vocab.json")
    shutil.copyfile(model / files["vocab.bpe"], out / "merges.txt")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
        "model_max_length": manifest["config"]["block_size"], "eos_token": "<|endoftext|>"}))
elif tok.get("type") == "char":
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(tok["itos"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token=tok["itos"][0]))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    t.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=t, model_max_length=manifest["config"]["block_size"]).save_pretrained(out)
else:
    sys.exit(f"error: {model}: no tokenizer in its manifest: GenAI-Perf needs one (give a model with text)")
print(f"tokenizer for GenAI-Perf: {out} ({tok['type']})", file=sys.stderr)
EOF

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
SERVE_PID=""
stop_server() { [[ -z "$SERVE_PID" ]] || { kill -INT "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; SERVE_PID=""; }; }
trap stop_server EXIT

ROWS="$WORK/rows.jsonl"; : > "$ROWS"

profile() {  # profile NAME DIR CONCURRENCY REQUESTS ARGS...: one GenAI-Perf run, its figures as a JSON row
  local name="$1" dir="$2" c="$3" n="$4"; shift 4
  local attempt
  for attempt in 1 2; do  # GenAI-Perf 0.0.16 now and then reads perf_analyzer's export half-written: once more
    echo "==> $name, concurrency $c, $n requests" >&2
    rm -rf "$dir"
    "$GENAI_PERF" profile --concurrency "$c" --request-count "$n" --warmup-request-count "$c" \
      --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev "$ISL_SD" \
      --output-tokens-mean "$OSL" --output-tokens-stddev "$OSL_SD" \
      --tokenizer "$WORK/tokenizer" --random-seed 0 --artifact-dir "$dir" "$@" > "$dir.log" 2>&1 && break
    tail -5 "$dir.log" >&2
    [[ $attempt == 2 ]] && { echo "error: genai-perf failed (log: $dir.log)" >&2; exit 1; }
  done
  "$PY" - "$dir" "$name" "$c" >> "$ROWS" <<'PYEOF'
import json, sys
from pathlib import Path
d, name, c = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
r = json.loads(next(d.rglob("profile_export_genai_perf.json")).read_text())
g = lambda k, s: r[k][s]
print(json.dumps({"server": name, "concurrency": c, "tok_s": g("output_token_throughput", "avg"),
                  "req_s": g("request_throughput", "avg"), "ttft_p50": g("time_to_first_token", "p50"),
                  "ttft_p99": g("time_to_first_token", "p99"), "itl_p50": g("inter_token_latency", "p50"),
                  "itl_p99": g("inter_token_latency", "p99"), "osl": g("output_sequence_length", "avg")}))
PYEOF
}
for mb in $MAX_BATCH; do
  repo="$WORK/repo-mb$mb"
  "$PY" -m gptexport triton "$MODEL_DIR" -o "$repo" --name m --max-batch "$mb" --max-tokens $(( OSL + 4 * OSL_SD )) --force >&2
  if [[ "$THREADS" != 0 ]]; then
    sed -i "s/key: \"threads\" value: { string_value: \"0\" }/key: \"threads\" value: { string_value: \"$THREADS\" }/" "$repo/m/config.pbtxt"
  fi
  http=$(free_port); grpc=$(free_port)
  "$PY" -m gptexport serve "$repo" --http-port "$http" --grpc-port "$grpc" > "$WORK/serve-mb$mb.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 300); do grep -q "Ctrl-C to stop" "$WORK/serve-mb$mb.log" && break; sleep 0.5; done
  grep -q "Ctrl-C to stop" "$WORK/serve-mb$mb.log" || { cat "$WORK/serve-mb$mb.log" >&2; echo "error: the server did not start" >&2; exit 1; }
  for c in $CONCURRENCY; do
    profile "gptexport serve --max-batch $mb" "$WORK/mb$mb-c$c" "$c" "${REQUESTS:-$(( c * 2 > 8 ? c * 2 : 8 ))}" \
      -m m --backend tensorrtllm --endpoint-type kserve --streaming -u "127.0.0.1:$grpc" \
      --output-tokens-mean-deterministic
  done
  stop_server
done

if [[ -n "$GGUF" ]]; then
  port=$(free_port)
  MIN_TOKENS=(--extra-inputs "min_tokens:$OSL")  # (deterministic is Triton-only in GenAI-Perf)
  [[ "$OSL_SD" == 0 ]] || MIN_TOKENS=()           # ragged outputs: each request's own max_tokens
  "$PEERS/bin/llama-server" -m "$GGUF" -np 16 -cb -t 2 -c $(( 16 * (ISL + 3 * ISL_SD + OSL + 3 * OSL_SD + 64) )) --host 127.0.0.1 \
    --port "$port" > "$WORK/llama-server.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 240); do "$PY" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" \
    2>/dev/null && break; sleep 0.5; done
  for c in $CONCURRENCY; do
    profile "llama-server -np 16" "$WORK/llama-c$c" "$c" "${REQUESTS:-$(( c * 2 > 8 ? c * 2 : 8 ))}" \
      -m gpt2 --endpoint-type completions --streaming -u "127.0.0.1:$port" \
      --extra-inputs ignore_eos:true "${MIN_TOKENS[@]}"
  done
  stop_server
fi

"$PY" - "$ROWS" "$MODEL_DIR" "$ISL" "$OSL" "$ISL_SD" "$OSL_SD" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
sd = lambda s: f" (stddev {s})" if s != "0" else ""
print(f"GenAI-Perf 0.0.16 against gptexport serve {sys.argv[2]}: {sys.argv[3]}-token prompts{sd(sys.argv[5])}, "
      f"{sys.argv[4]} output tokens{sd(sys.argv[6])} (--output-tokens-mean-deterministic), streamed over gRPC")
print("| server | clients | output tok/s | × max-batch 1 | × llama-server | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
      "| output tokens |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    same = lambda name: next((o for o in rows if o["server"] == name and o["concurrency"] == r["concurrency"]), None)
    ratio = lambda o: f"{r['tok_s'] / o['tok_s']:.2f}×" if o else "–"
    print(f"| {r['server']} | {r['concurrency']} | {r['tok_s']:.1f} | {ratio(same('gptexport serve --max-batch 1'))} | "
          f"{ratio(same('llama-server -np 16'))} | {r['req_s']:.2f} | "
          f"{r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['itl_p50']:.1f} / {r['itl_p99']:.1f} | {r['osl']:.0f} |")
EOF
echo "artifacts: $WORK" >&2

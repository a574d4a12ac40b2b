#!/usr/bin/env bash
# prepare_peers.sh -- install the "peer" runtimes that gptexport's benchmarks compare against,
# from the package registries alone (PyPI via pip, Debian via apt-get). Nothing here fetches
# from GitHub or a model hub, so it works on a machine that reaches only those registries.
#
#   bash scripts/prepare_peers.sh [--only llama|ct2|genai-perf]... [--jobs N] [--force] [PEERS_DIR]
#
# PEERS_DIR defaults to ${GPTEXPORT_PEERS:-$HOME/.cache/gptexport-peers}. It gets:
#
#   llama/      llama.cpp, taken from the llama-cpp-python *sdist* on PyPI (which vendors the
#               whole llama.cpp tree, convert_hf_to_gguf.py and gguf-py included), built with
#               CMake: llama-bench, llama-batched-bench, llama-server, llama-quantize, llama-cli;
#               on a CPU with AMX also build-amx/bin/llama-bench (batch-1 decode with AMX).
#   venvs/llama-convert/   python for convert_hf_to_gguf.py (gguf-py from the same tree).
#   venvs/ct2/             CTranslate2 + ct2-transformers-converter.
#   venvs/genai-perf/      genai-perf + tritonclient's perf_analyzer binary (Triton load tests).
#   bin/        wrappers/links: llama-*, convert_hf_to_gguf, ct2-transformers-converter,
#               genai-perf, perf_analyzer (the last two set LD_LIBRARY_PATH for libcudart).
#   peers.json  {"name": "/absolute/path", ...} for the benchmarks to find all of the above.
#
# Each part is skipped when its marker (PEERS_DIR/.done-PART) exists; --force redoes the parts
# selected. Environment knobs: PYTHON (interpreter for the venvs, >= 3.10; default python3),
# TORCH_SPEC (default torch==2.13.0), LLAMA_NATIVE=OFF (portable build instead of -march=native),
# LLAMA_AMX=ON (keep ggml's AMX kernels, which crash in this llama.cpp: see part_llama),
# JOBS (build parallelism, default 2).
#
# torch: every venv that needs torch gets TORCH_SPEC installed *first* and then keeps it through a
# pip constraints file, so no later install can swap it. On the project's machines torch==2.13.0
# resolves to the CPU build that lies on local disk; an unpinned torch (or any other version)
# would come from PyPI as the multi-GB CUDA build.
set -euo pipefail

# ---- pinned versions (all checked together on Debian 12, Python 3.11, x86_64) -----------------
LLAMA_CPP_PYTHON_VERSION=0.3.36        # vendors llama.cpp with gguf-py 0.19.0
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# convert_hf_to_gguf.py's own requirements file (requirements/requirements-convert_hf_to_gguf.txt)
# pins transformers 4.57.6, numpy ~2.2.6, sentencepiece < 0.3, protobuf < 5 and a torch from the
# PyTorch index (unreachable here): we take all of those except torch.
CONVERT_PKGS=("numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" "transformers==4.57.6" "protobuf>=4.21.0,<5.0.0")
CT2_PKGS=("ctranslate2==4.8.5" "transformers==4.57.6" "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0")
GENAI_PERF_PKGS=("genai-perf==0.0.16" "tritonclient[all]==2.51.0" "nvidia-cuda-runtime-cu12==12.6.77")

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

ONLY=()
FORCE=0
JOBS="${JOBS:-2}"
PEERS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --only) [[ $# -ge 2 ]] || { echo "--only needs llama|ct2|genai-perf" >&2; exit 2; }
            IFS=',' read -r -a _parts <<< "$2"; ONLY+=("${_parts[@]}"); shift 2 ;;
    --only=*) IFS=',' read -r -a _parts <<< "${1#--only=}"; ONLY+=("${_parts[@]}"); shift ;;
    --jobs|-j) JOBS="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z "$PEERS" ]] || { echo "only one PEERS_DIR, got '$PEERS' and '$1'" >&2; exit 2; }
       PEERS="$1"; shift ;;
  esac
done
for p in "${ONLY[@]}"; do
  case "$p" in llama|ct2|genai-perf) ;; *) echo "--only: unknown part '$p' (llama|ct2|genai-perf)" >&2; exit 2 ;; esac
done
[[ ${#ONLY[@]} -gt 0 ]] || ONLY=(llama ct2 genai-perf)

PEERS="${PEERS:-${GPTEXPORT_PEERS:-$HOME/.cache/gptexport-peers}}"
mkdir -p "$PEERS"
PEERS="$(cd "$PEERS" && pwd -P)"          # absolute: peers.json and the wrappers need it
mkdir -p "$PEERS/bin" "$PEERS/venvs" "$PEERS/logs"

PYTHON="${PYTHON:-python3}"
LLAMA_SRC="$PEERS/llama/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
LLAMA_BUILD="$LLAMA_SRC/build"
LLAMA_AMX_BUILD="$LLAMA_SRC/build-amx"
LLAMA_BINS="llama-bench llama-batched-bench llama-server llama-quantize llama-cli"
CONVERT_VENV="$PEERS/venvs/llama-convert"
CT2_VENV="$PEERS/venvs/ct2"
GP_VENV="$PEERS/venvs/genai-perf"
TORCH_CONSTRAINT="$PEERS/constraints-torch.txt"

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'prepare_peers: %s\n' "$*" >&2; exit 1; }
selected() { local x; for x in "${ONLY[@]}"; do [[ "$x" == "$1" ]] && return 0; done; return 1; }
done_already() { [[ $FORCE -eq 0 && -f "$PEERS/.done-$1" ]]; }
mark_done() { date -u +%FT%TZ > "$PEERS/.done-$1"; }

# Debian packages: installed with apt-get when missing (root), else a clear message.
APT_UPDATED=0
need_apt() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || die "need the Debian packages: ${missing[*]} (no apt-get here)"
  [[ $(id -u) -eq 0 ]] || die "need the Debian packages: ${missing[*]}: sudo apt-get install -y ${missing[*]}"
  log "apt-get install -y ${missing[*]}"
  if [[ $APT_UPDATED -eq 0 ]]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

# need_cmd CMD DEBIAN_PKG: a tool that may come from anywhere; apt-get only when it is missing.
need_cmd() { command -v "$1" >/dev/null || need_apt "$2"; }

check_python() {
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
    || die "PYTHON=$PYTHON must be Python >= 3.10"
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_apt python3-venv
  "$PYTHON" -m pip --version >/dev/null 2>&1 || need_apt python3-pip   # for the sdist download
}

# mkvenv DIR [with-torch]: a fresh venv; with torch, TORCH_SPEC goes in first, alone, and stays
# pinned for every later install in that venv (pip -c constraints).
mkvenv() {
  local dir="$1" torch="${2:-}"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  if [[ "$torch" == with-torch ]]; then
    log "$dir: $TORCH_SPEC first"
    "$dir/bin/pip" install -q "$TORCH_SPEC"
  fi
}
pipc() {  # pip install in venv $1 with torch held at TORCH_SPEC
  local dir="$1"; shift
  "$dir/bin/pip" install -q -c "$TORCH_CONSTRAINT" "$@"
}

# ---- a. llama.cpp ---------------------------------------------------------------------------
part_llama() {
  check_python
  need_cmd cmake cmake; need_cmd c++ g++; need_cmd cc gcc
  command -v ninja >/dev/null || need_cmd make make
  local dl="$PEERS/llama"
  mkdir -p "$dl"
  local sdist="$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [[ ! -f "$sdist" ]] || ! echo "$LLAMA_CPP_PYTHON_SHA256  $sdist" | sha256sum -c --status; then
    log "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist, ~77 MB)"
    rm -f "$sdist"
    # --no-binary :all: -> the source tarball (it vendors llama.cpp); --require-hashes pins it
    # byte for byte. pip still prepares its metadata, which pulls scikit-build-core from PyPI
    # into a throwaway build env: harmless, nothing is compiled at this step.
    printf 'llama-cpp-python==%s --hash=sha256:%s\n' "$LLAMA_CPP_PYTHON_VERSION" "$LLAMA_CPP_PYTHON_SHA256" \
      > "$dl/requirements-sdist.txt"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: --require-hashes \
      -r "$dl/requirements-sdist.txt" -d "$dl"
  fi
  if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    log "unpack $sdist"
    rm -rf "$dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
    tar -xzf "$sdist" -C "$dl"
  fi

  # CMake options, as they exist in the llama.cpp that 0.3.36 vendors:
  #  LLAMA_CURL=OFF           deprecated and ignored there (kept for older trees: no libcurl).
  #  LLAMA_USE_PREBUILT_UI=OFF, LLAMA_BUILD_UI=OFF
  #                           the server's web UI would otherwise be downloaded from a Hugging
  #                           Face bucket (or built with npm); without it the server builds with
  #                           no embedded UI (its HTTP API, which is what we bench, is intact).
  #  LLAMA_OPENSSL=OFF        no HTTPS client/server needed for local benchmarks.
  #  LLAMA_BUILD_TESTS/EXAMPLES/APP=OFF   not needed: saves most of the build time.
  #  LLAMA_BUILD_SERVER=ON    gates llama-server *and* llama-cli in this version.
  #  GGML_NATIVE=ON           -march=native (AVX-512 etc.; AMX off, below): the fair peer on this CPU.
  #  BUILD_SHARED_LIBS=OFF    self-contained binaries (no RPATH into the build dir).
  #  GGML_OPENMP=ON           the default; libgomp comes with g++.
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  # AMX: on a CPU with AMX (Sapphire Rapids and later) -march=native compiles ggml's AMX backend,
  # which repacks q8_0/q4_0/... weights into an "AMX" buffer. In this llama.cpp that path
  # segfaults on the first matmul (SIGSEGV at ldtilecfg in ggml_backend_amx_mul_mat; f32 is not
  # affected; upstream ggml-org/llama.cpp#20824, closed unfixed), although AMX itself works here
  # (arch_prctl(ARCH_REQ_XCOMP_PERM) + ldtilecfg in a 10-line probe are fine). So AMX is turned off
  # unless LLAMA_AMX=ON: the rest of -march=native (AVX-512, VNNI, BF16) stays, GCC lets an
  # explicit -mno-amx-* win over -march=native whatever their order.
  # What crashes is the multi-row (tile) path only: one token at a time (llama-bench -p 0 -n N)
  # runs, on the AMX buffer's repacked weights, and is 1.3-1.5x faster at q8_0/q4_0 on this CPU
  # than the build without AMX. So a second llama-bench is built with AMX kept
  # (build-amx/, llama_amx_bench below): the bench takes batch-1 decode from it, llama.cpp's best.
  local cflags=""
  if amx_turned_off; then
    cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    log "CPU has AMX: building without it (LLAMA_AMX=ON to keep it; see the comment)"
  fi
  if [[ $FORCE -eq 1 ]]; then rm -rf "$LLAMA_BUILD"; fi
  log "cmake configure $LLAMA_SRC"
  cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" "${gen[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DGGML_NATIVE="${LLAMA_NATIVE:-ON}" -DGGML_OPENMP=ON -DGGML_CCACHE=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" \
    > "$PEERS/logs/llama-cmake.log" 2>&1 || { tail -40 "$PEERS/logs/llama-cmake.log" >&2; die "cmake configure failed (log: $PEERS/logs/llama-cmake.log)"; }
  # llama-batched-bench: decode of B sequences at once (gptexport bench's batch-8 row); one more
  # target, on the libraries the others build anyway
  log "cmake build -j$JOBS $LLAMA_BINS (~10-15 min on 2 cores; log: $PEERS/logs/llama-build.log)"
  cmake --build "$LLAMA_BUILD" --config Release -j "$JOBS" \
    --target $LLAMA_BINS \
    > "$PEERS/logs/llama-build.log" 2>&1 || { tail -40 "$PEERS/logs/llama-build.log" >&2; die "llama.cpp build failed (log: $PEERS/logs/llama-build.log)"; }
  local b
  for b in $LLAMA_BINS; do
    [[ -x "$LLAMA_BUILD/bin/$b" ]] || die "missing $LLAMA_BUILD/bin/$b after the build"
    ln -sfn "$LLAMA_BUILD/bin/$b" "$PEERS/bin/$b"
  done
  "$LLAMA_BUILD/bin/llama-quantize" --help >/dev/null 2>&1 || true   # exits 1 on --help
  # The AMX opt-out must have held: no tile instruction in the binaries (a stale build dir from an
  # AMX build would otherwise keep crashing on the first q8_0/q4_0 matmul).
  local ntile=0
  if [[ -n "$cflags" ]] && command -v objdump >/dev/null; then
    ntile="$(objdump -d --no-show-raw-insn "$LLAMA_BUILD/bin/llama-bench" | grep -c ldtilecfg || true)"
  fi
  if [[ "${ntile:-0}" -gt 0 ]]; then
    die "llama-bench still contains AMX code although $cflags was set: rm -rf $LLAMA_BUILD and rerun"
  fi
  "$LLAMA_BUILD/bin/llama-bench" --help >/dev/null
  [[ -z "$cflags" ]] || llama_amx_bench

  # Python for convert_hf_to_gguf.py. It imports torch, numpy, gguf (the script puts the tree's
  # gguf-py first on sys.path itself) and, through conversion/, transformers (AutoTokenizer for
  # the vocab) and sentencepiece; gguf-py needs tqdm, pyyaml, requests. Installing the tree's
  # gguf-py (not PyPI's gguf, which lags) brings those and keeps the two in step.
  log "venv for convert_hf_to_gguf.py: $CONVERT_VENV"
  mkvenv "$CONVERT_VENV" with-torch
  pipc "$CONVERT_VENV" "${CONVERT_PKGS[@]}" "$LLAMA_SRC/gguf-py"
  "$CONVERT_VENV/bin/python" "$LLAMA_SRC/convert_hf_to_gguf.py" --help >/dev/null \
    || die "convert_hf_to_gguf.py --help failed in $CONVERT_VENV"
  cat > "$PEERS/bin/convert_hf_to_gguf" <<EOF
#!/usr/bin/env bash
exec "$CONVERT_VENV/bin/python" "$LLAMA_SRC/convert_hf_to_gguf.py" "\$@"
EOF
  chmod +x "$PEERS/bin/convert_hf_to_gguf"
  mark_done llama
}

# Whether the main llama.cpp build leaves AMX out: a CPU with AMX under -march=native, and
# LLAMA_AMX not ON (see the AMX comment in part_llama). (The macros go through a variable: `cc ... |
# grep -q` under pipefail fails at random when grep exits first and cc gets SIGPIPE -- that once
# built AMX in silently.)
amx_turned_off() {
  local native_macros
  native_macros="$("${CC:-cc}" -march=native -dM -E - </dev/null 2>/dev/null || true)"
  [[ "${LLAMA_AMX:-OFF}" != ON && "${LLAMA_NATIVE:-ON}" == ON && "$native_macros" == *__AMX_INT8__* ]]
}

# llama-bench with ggml's AMX backend kept (see the AMX comment in part_llama): only its batch-1
# decode runs, and the bench uses it for that alone. On ggml's own thread pool (GGML_OPENMP=OFF):
# measured here, q8_0/q4_0 decode 115/160 tok/s against 83/122 with OpenMP (without AMX the
# thread pool made no difference: 73/114 against 74/108).
llama_amx_bench() {
  local gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  [[ -x "$LLAMA_AMX_BUILD/bin/llama-bench" ]] && grep -q '^GGML_OPENMP:BOOL=OFF' "$LLAMA_AMX_BUILD/CMakeCache.txt" && return 0
  log "llama: llama-bench with AMX, for batch-1 decode (~5 min; log: $PEERS/logs/llama-amx-build.log)"
  cmake -S "$LLAMA_SRC" -B "$LLAMA_AMX_BUILD" "${gen[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF \
    -DBUILD_SHARED_LIBS=OFF > "$PEERS/logs/llama-amx-build.log" 2>&1 \
    && cmake --build "$LLAMA_AMX_BUILD" --config Release -j "$JOBS" --target llama-bench \
      >> "$PEERS/logs/llama-amx-build.log" 2>&1 \
    || { tail -40 "$PEERS/logs/llama-amx-build.log" >&2; die "llama-bench with AMX failed to build (log: $PEERS/logs/llama-amx-build.log)"; }
  "$LLAMA_AMX_BUILD/bin/llama-bench" --help >/dev/null
}

# A llama part done by an older version of this script lacks the binaries added since (e.g.
# llama-batched-bench): build just those, in the existing build dir (its libraries are reused).
llama_add_missing() {
  local b missing=()
  for b in $LLAMA_BINS; do [[ -x "$LLAMA_BUILD/bin/$b" ]] || missing+=("$b"); done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  [[ -f "$LLAMA_BUILD/CMakeCache.txt" ]] || die "llama: ${missing[*]} missing and no build dir: rerun with --only llama --force"
  log "llama: building the missing ${missing[*]} (log: $PEERS/logs/llama-build.log)"
  cmake --build "$LLAMA_BUILD" --config Release -j "$JOBS" --target "${missing[@]}" \
    >> "$PEERS/logs/llama-build.log" 2>&1 || { tail -40 "$PEERS/logs/llama-build.log" >&2; die "building ${missing[*]} failed"; }
  for b in "${missing[@]}"; do ln -sfn "$LLAMA_BUILD/bin/$b" "$PEERS/bin/$b"; done
}

# the AMX llama-bench, for a llama part done before it was added
llama_add_amx() {
  if amx_turned_off; then llama_amx_bench; fi
}

# ---- b. CTranslate2 -------------------------------------------------------------------------
part_ct2() {
  check_python
  # ct2-transformers-converter loads the HF model with transformers + torch, then writes CT2.
  # Its transformers loaders are written against 4.x: transformers 5 is not used here.
  log "venv for CTranslate2: $CT2_VENV"
  mkvenv "$CT2_VENV" with-torch
  pipc "$CT2_VENV" "${CT2_PKGS[@]}"
  "$CT2_VENV/bin/python" -c 'import ctranslate2, transformers, torch; print("ctranslate2", ctranslate2.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
  "$CT2_VENV/bin/ct2-transformers-converter" --help >/dev/null
  ln -sfn "$CT2_VENV/bin/ct2-transformers-converter" "$PEERS/bin/ct2-transformers-converter"
  mark_done ct2
}

# ---- c. GenAI-Perf + perf_analyzer ----------------------------------------------------------
part_genai_perf() {
  check_python
  # tritonclient's wheel ships a prebuilt perf_analyzer (into the venv's bin/). It links
  # libb64.so.0d (Debian: libb64-0d) and libcudart.so.12 even on a machine with no GPU; the
  # latter comes from the nvidia-cuda-runtime-cu12 wheel and goes on LD_LIBRARY_PATH in the
  # wrappers below. genai-perf's "perf-analyzer" requirement on PyPI is an empty placeholder;
  # genai-perf runs whatever perf_analyzer is first on PATH.
  if ! { ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; }; then need_apt libb64-0d; fi
  log "venv for genai-perf: $GP_VENV"
  mkvenv "$GP_VENV"
  # No torch here: genai-perf uses transformers for tokenizers only.
  "$GP_VENV/bin/pip" install -q "${GENAI_PERF_PKGS[@]}"
  # numpy: tritonclient 2.51 declares numpy<2, so pip resolves numpy 1.26.4 -- but the newest
  # pyarrow (26.x, pulled by genai-perf for its parquet exports; its metadata says nothing)
  # refuses to import under numpy 1.x ("pyarrow requires NumPy 2.0 or newer"). tritonclient 2.51
  # itself works with numpy 2 (no removed numpy aliases; InferInput/serialize checked below), so
  # numpy 2 goes back on top, and pip's complaint that tritonclient wants numpy<2 is expected.
  "$GP_VENV/bin/pip" install -q "numpy>=2,<3" 2>&1 | { grep -v "dependency resolver\|tritonclient .* requires numpy" || true; } >&2
  "$GP_VENV/bin/python" - <<'PY'
import importlib, io, pkgutil, warnings
warnings.simplefilter("ignore")
import numpy as np, pandas as pd
for name in ("pyarrow", "fastparquet", "statsmodels.api", "plotly", "optuna", "transformers",
             "tritonclient.grpc", "tritonclient.grpc.aio", "tritonclient.http", "soundfile", "PIL"):
    importlib.import_module(name)
import genai_perf  # every submodule, so that a lazy import cannot hide a broken dependency
for m in pkgutil.walk_packages(genai_perf.__path__, "genai_perf."):
    importlib.import_module(m.name)
import tritonclient.grpc as g, tritonclient.http as h, tritonclient.utils as u
x = np.array([b"ab", b"cde"], dtype=np.object_)
g.InferInput("T", [2], "BYTES").set_data_from_numpy(x)
h.InferInput("I", [2, 3], "INT64").set_data_from_numpy(np.zeros((2, 3), np.int64))
assert list(u.deserialize_bytes_tensor(u.serialize_byte_tensor(x).item())) == [b"ab", b"cde"]
buf = io.BytesIO(); pd.DataFrame({"a": [1.0, 2.0]}).to_parquet(buf)
print("genai-perf venv ok: numpy", np.__version__, "pandas", pd.__version__)
PY
  local cudart
  cudart="$("$GP_VENV/bin/python" - <<'EOF'
import glob, os, nvidia.cuda_runtime as m
d = os.path.join(list(m.__path__)[0], "lib")
assert glob.glob(os.path.join(d, "libcudart.so.12*")), d
print(d)
EOF
)"
  for tool in perf_analyzer genai-perf; do
    cat > "$PEERS/bin/$tool" <<EOF
#!/usr/bin/env bash
# $tool from $GP_VENV; libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel.
export LD_LIBRARY_PATH="$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PATH="$GP_VENV/bin:\$PATH"
exec "$GP_VENV/bin/$tool" "\$@"
EOF
    chmod +x "$PEERS/bin/$tool"
  done
  "$PEERS/bin/perf_analyzer" --help > "$PEERS/logs/perf_analyzer-help.txt" 2>&1 || true
  grep -q -- "--concurrency-range" "$PEERS/logs/perf_analyzer-help.txt" \
    || { cat "$PEERS/logs/perf_analyzer-help.txt" >&2; die "perf_analyzer --help did not run"; }
  "$PEERS/bin/genai-perf" --help > "$PEERS/logs/genai-perf-help.txt" 2>&1 \
    || { cat "$PEERS/logs/genai-perf-help.txt" >&2; die "genai-perf --help failed"; }
  mark_done genai-perf
}

printf '%s\n' "$TORCH_SPEC" > "$TORCH_CONSTRAINT"
for part in llama ct2 genai-perf; do
  selected "$part" || continue
  if done_already "$part"; then
    log "$part: already done ($PEERS/.done-$part); --force to redo"
    [[ "$part" != llama ]] || { llama_add_missing; llama_add_amx; }
    continue
  fi
  case "$part" in
    llama) part_llama ;;
    ct2) part_ct2 ;;
    genai-perf) part_genai_perf ;;
  esac
done

# ---- e. what is there (every part, not only those run now) -> stdout and peers.json ---------
"$PYTHON" - "$PEERS" \
  llama-bench="$LLAMA_BUILD/bin/llama-bench" \
  llama-batched-bench="$LLAMA_BUILD/bin/llama-batched-bench" \
  llama-bench-amx="$LLAMA_AMX_BUILD/bin/llama-bench" \
  llama-server="$LLAMA_BUILD/bin/llama-server" \
  llama-quantize="$LLAMA_BUILD/bin/llama-quantize" \
  llama-cli="$LLAMA_BUILD/bin/llama-cli" \
  convert_hf_to_gguf.py="$LLAMA_SRC/convert_hf_to_gguf.py" \
  convert_hf_to_gguf-python="$CONVERT_VENV/bin/python" \
  ct2-transformers-converter="$CT2_VENV/bin/ct2-transformers-converter" \
  ct2-python="$CT2_VENV/bin/python" \
  genai-perf="$PEERS/bin/genai-perf" \
  perf_analyzer="$PEERS/bin/perf_analyzer" <<'EOF'
import json, os, sys
peers, pairs = sys.argv[1], sys.argv[2:]
found = {}
for kv in pairs:
    name, path = kv.split("=", 1)
    if os.path.exists(path):
        found[name] = path
for name, path in found.items():
    print(f"{name:28s} {path}")
missing = sorted(set(kv.split("=", 1)[0] for kv in pairs) - set(found))
if missing:
    print("not (yet) made:", ", ".join(missing))
with open(os.path.join(peers, "peers.json"), "w") as f:
    json.dump(found, f, indent=2)
    f.write("\n")
print("wrote", os.path.join(peers, "peers.json"))
EOF

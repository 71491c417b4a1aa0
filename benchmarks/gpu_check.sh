#!/usr/bin/env bash
# The whole GPU check of persimmon-tools in one script: for each preset (tiny, mid, 8b), make a synthetic
# release, convert it, and run `verify --device cuda` in bf16 and fp32 (and once with --rotary adept),
# recording wall time and peak GPU memory of every step.
#
# Needs only what a GPU image with PyTorch, transformers and the toolkit's other dependencies provides: no
# network, no pip install. Runs `python -m persimmon_tools.cli` from this checkout (PYTHONPATH = its root).
#
#   bash benchmarks/gpu_check.sh                      # tiny, mid, 8b (8b: bf16 only)
#   bash benchmarks/gpu_check.sh --presets tiny,mid   # or --skip-8b
#   bash benchmarks/gpu_check.sh --fp32-8b            # also verify 8b in fp32 (~38 GB of GPU memory)
#   bash benchmarks/gpu_check.sh --dry-run            # print the plan (every command), run nothing
#
# Environment: WORK (work dir, default /tmp/gpu_check), OUT (where results.json/results.md/logs go; default
# WORK), PYTHON (interpreter, default python, else python3), TIMEOUT_SCALE (integer factor on every step's
# timeout, default 1), MIN_FREE_GB_8B (default 45), GPU_CHECK_DEVICE (default cuda; cpu only to test this
# script itself on a machine without a GPU: `GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --presets tiny`).
# Exit status: 0 all steps passed, 1 a step failed or timed out (the others still ran), 2 usage error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${WORK:-/tmp/gpu_check}"
RESULTS="${OUT:-$WORK}"
TIMEOUT_SCALE="${TIMEOUT_SCALE:-1}"
MIN_FREE_GB_8B="${MIN_FREE_GB_8B:-45}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then
    PY=python
else
    PY=python3
fi

PRESETS="tiny,mid,8b"
SKIP_8B=0
FP32_8B=0
DRY_RUN=0
KEEP=0
LOADERS="auto"

usage() {
    cat <<'EOF'
Usage: bash benchmarks/gpu_check.sh [--presets tiny,mid,8b] [--skip-8b] [--fp32-8b] [--loaders LIST]
                                    [--keep] [--dry-run] [-h|--help]
  --presets LIST   comma-separated presets among tiny, mid, 8b (default: tiny,mid,8b)
  --skip-8b        leave out the 8b preset
  --fp32-8b        also verify 8b in fp32 (needs ~38 GB of GPU memory; off by default)
  --loaders LIST   loaders for mid and 8b: auto, transformers, persimmon-tools (default: auto);
                   tiny always runs both transformers and persimmon-tools
  --keep           keep the 8b release and converted folder (default: deleted at the end, ~38 GB)
  --dry-run        print the plan (every command) and exit; runs and writes nothing
Env: WORK (default /tmp/gpu_check), OUT (results; default WORK), PYTHON, TIMEOUT_SCALE, MIN_FREE_GB_8B,
     GPU_CHECK_DEVICE (default cuda; cpu only to test this script without a GPU)
EOF
}

die_usage() {
    echo "gpu_check.sh: $1" >&2
    usage >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --presets) [[ $# -ge 2 ]] || die_usage "--presets needs a value"; PRESETS="$2"; shift 2 ;;
        --presets=*) PRESETS="${1#*=}"; shift ;;
        --loaders) [[ $# -ge 2 ]] || die_usage "--loaders needs a value"; LOADERS="$2"; shift 2 ;;
        --loaders=*) LOADERS="${1#*=}"; shift ;;
        --skip-8b) SKIP_8B=1; shift ;;
        --fp32-8b) FP32_8B=1; shift ;;
        --keep) KEEP=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
done

IFS=',' read -r -a PRESET_LIST <<<"$PRESETS"
SELECTED=()
for p in "${PRESET_LIST[@]}"; do
    case "$p" in
        tiny | mid | 8b) ;;
        *) die_usage "unknown preset '$p' (expected tiny, mid, 8b)" ;;
    esac
    if [[ "$p" == 8b && "$SKIP_8B" == 1 ]]; then
        continue
    fi
    SELECTED+=("$p")
done
[[ ${#SELECTED[@]} -gt 0 ]] || die_usage "no presets left to run"
IFS=',' read -r -a LOADER_LIST <<<"$LOADERS"
for l in "${LOADER_LIST[@]}"; do
    case "$l" in
        auto | transformers | persimmon-tools) ;;
        *) die_usage "unknown loader '$l' (expected auto, transformers, persimmon-tools)" ;;
    esac
done
[[ "$DEVICE" == cpu || "$DEVICE" == cuda* ]] || die_usage "GPU_CHECK_DEVICE must be cuda, cuda:N or cpu"
[[ "$TIMEOUT_SCALE" =~ ^[1-9][0-9]*$ ]] || die_usage "TIMEOUT_SCALE must be a positive integer"
[[ "$WORK" == /* ]] || WORK="$PWD/$WORK"
[[ "$RESULTS" == /* ]] || RESULTS="$PWD/$RESULTS"

# The --rotary adept run: once, on the mid preset when selected (else tiny, else 8b), bf16.
ADEPT_PRESET=""
for p in mid tiny 8b; do
    for s in "${SELECTED[@]}"; do
        if [[ -z "$ADEPT_PRESET" && "$s" == "$p" ]]; then ADEPT_PRESET="$p"; fi
    done
done

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
CLI=("$PY" -m persimmon_tools.cli)
STEPS_TSV="$RESULTS/steps.tsv"
LOGS="$RESULTS/logs"
FAILED=0

# Per-step timeout in seconds (before TIMEOUT_SCALE): make-release/convert/verify per preset.
step_timeout() { # STEP PRESET
    local t
    case "$2:$1" in
        tiny:*) t=180 ;;
        mid:verify) t=300 ;;
        mid:*) t=300 ;;
        8b:make-release) t=600 ;;
        8b:convert) t=600 ;;
        8b:verify) t=900 ;;
        *) t=600 ;;
    esac
    echo $((t * TIMEOUT_SCALE))
}

now() { date +%s.%N; }

write_results() {
    [[ "$DRY_RUN" == 1 ]] && return 0
    "$PY" - "$STEPS_TSV" "$RESULTS/results.json" "$RESULTS/results.md" "$RESULTS/environment.txt" <<'PYEOF' ||
import json, sys
from pathlib import Path

tsv, out_json, out_md, env = map(Path, sys.argv[1:])
keys = ["preset", "step", "dtype", "loader", "rotary", "status", "rc", "wall_s", "cuda_peak_gib", "verdict",
        "log", "command"]
rows = []
if tsv.exists():
    for line in tsv.read_text().splitlines():
        row = dict(zip(keys, line.split("\t")))
        for k in ("rc",):
            row[k] = int(row[k]) if row.get(k, "").lstrip("-").isdigit() else None
        for k in ("wall_s", "cuda_peak_gib"):
            try:
                row[k] = float(row[k])
            except (KeyError, ValueError):
                row[k] = None
        rows.append(row)
data = {
    "environment": env.read_text() if env.exists() else "",
    "failed": sum(r["status"] != "ok" for r in rows),
    "steps": rows,
}
out_json.write_text(json.dumps(data, indent=2) + "\n")
cols = ["preset", "step", "dtype", "loader", "rotary", "status", "wall_s", "cuda_peak_gib", "verdict"]
fmt = lambda v: "–" if v in (None, "", "-") else (f"{v:.1f}" if isinstance(v, float) else str(v))
lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
md = "# persimmon-tools GPU check\n\n```\n" + data["environment"].strip() + "\n```\n\n" + "\n".join(lines) + "\n"
md += f"\n{data['failed']} of {len(rows)} steps failed.\n"
out_md.write_text(md)
PYEOF
        echo "gpu_check.sh: could not write results files" >&2
}

record() { # PRESET STEP DTYPE LOADER ROTARY STATUS RC WALL PEAK VERDICT LOG COMMAND
    local IFS=$'\t'
    echo "$*" >>"$STEPS_TSV"
    write_results
}

# run_step PRESET STEP DTYPE LOADER ROTARY REPORT_JSON -- COMMAND...
# Runs COMMAND under `timeout`, logs its output, records wall time, peak CUDA memory and verdict (from
# REPORT_JSON when given); a failing step is recorded and the script goes on.
run_step() {
    local preset="$1" step="$2" dtype="$3" loader="$4" rotary="$5" report="$6"
    shift 7
    local limit
    limit="$(step_timeout "$step" "$preset")"
    local cmd=(timeout --kill-after=30 "$limit" "$@")
    local shown
    shown="$(printf '%q ' "${cmd[@]}")"
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "+ ${shown% }"
        return 0
    fi
    local name="${preset}-${step}${dtype:+-$dtype}${loader:+-$loader}${rotary:+-$rotary}"
    local log="$LOGS/$name.log"
    echo "==> [$preset] $step ${dtype:+dtype=$dtype }${loader:+loader=$loader }${rotary:+rotary=$rotary }(timeout ${limit}s)"
    echo "    ${shown% }"
    local start end rc=0
    start="$(now)"
    "${cmd[@]}" >"$log" 2>&1 || rc=$?
    end="$(now)"
    local wall
    wall="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')"
    local peak="-" verdict="-"
    if [[ -n "$report" && -s "$report" ]]; then
        read -r peak verdict < <("$PY" -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d.get("memory", {}).get("cuda_max_allocated_gib", "-"), d.get("verdict", "-"))
' "$report" 2>/dev/null || echo "- -")
    fi
    local status=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status=timeout
    elif [[ $rc -ne 0 ]]; then
        status=failed
    fi
    if [[ "$status" != ok ]]; then
        FAILED=$((FAILED + 1))
        echo "    !! $status (exit $rc) after ${wall}s; last lines of $log:"
        tail -n 15 "$log" | sed 's/^/       /'
    else
        local extra=""
        [[ "$peak" == - ]] || extra+=", peak CUDA ${peak} GiB"
        [[ "$verdict" == - ]] || extra+=", verdict $verdict"
        echo "    ok in ${wall}s$extra"
    fi
    record "$preset" "$step" "${dtype:--}" "${loader:--}" "${rotary:--}" "$status" "$rc" "$wall" "$peak" \
        "$verdict" "$log" "${shown% }"
}

verify_step() { # PRESET DIR SOURCE DTYPE LOADER ROTARY
    local preset="$1" dir="$2" source="$3" dtype="$4" loader="$5" rotary="$6"
    local report="$RESULTS/reports/${preset}-verify-${dtype}-${loader}-${rotary}.json"
    [[ "$DRY_RUN" == 1 ]] || rm -f "$report"
    run_step "$preset" verify "$dtype" "$loader" "$rotary" "$report" -- \
        "${CLI[@]}" verify "$dir/hf" --reference "$source" --device "$DEVICE" --dtype "$dtype" --loader "$loader" \
        --rotary "$rotary" --json-file "$report"
}

free_gb() { # DIR: free space of its filesystem in GB (10^9 bytes)
    local kb
    kb="$(df -Pk "$1" | awk 'NR == 2 { print $4 }')"
    echo $((kb * 1024 / 1000000000))
}

# ---------------------------------------------------------------------------------------------------- plan
echo "persimmon-tools GPU check: presets ${SELECTED[*]}; loaders (mid/8b) ${LOADER_LIST[*]}; 8b fp32 $([[ $FP32_8B == 1 ]] && echo on || echo off); rotary adept on ${ADEPT_PRESET}"
echo "checkout $ROOT; work dir $WORK; results in $RESULTS; python $PY; device $DEVICE"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "dry run: printing the commands only"
    echo "+ nvidia-smi"
    echo "+ $PY -c 'import torch, transformers; ...'  # versions, torch.cuda.is_available()"
else
    mkdir -p "$WORK" "$RESULTS" "$LOGS" "$RESULTS/reports"
    : >"$STEPS_TSV"
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "host: $(uname -n) $(uname -r)"
        echo "checkout: $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
        if command -v nvidia-smi >/dev/null 2>&1; then
            nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
        else
            echo "nvidia-smi: not found"
        fi
        "$PY" -c '
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"{p.total_memory / 2**30:.1f} GiB", "cudnn", torch.backends.cudnn.version())
' 2>&1 || echo "python/torch/transformers import failed"
        echo "disk free at $WORK: $(free_gb "$WORK") GB"
    } | tee "$RESULTS/environment.txt"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi || true; fi
    if [[ "$DEVICE" == cuda* ]] &&
        ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check.sh: torch sees no CUDA device; nothing to check" >&2
        record all preflight - - - failed 1 0 - - - "torch.cuda.is_available()"
        exit 1
    fi
fi

# ---------------------------------------------------------------------------------------------------- run
for preset in "${SELECTED[@]}"; do
    dir="$WORK/$preset"
    source="$dir/${preset}_release.tar"
    if [[ "$preset" == 8b ]]; then
        if [[ "$DRY_RUN" == 1 ]]; then
            echo "+ df -Pk $WORK  # 8b needs >= ${MIN_FREE_GB_8B} GB free (18.8 GB release + 18.8 GB converted)"
        else
            rm -rf "${dir:?}"
            free="$(free_gb "$WORK")"
            if [[ "$free" -lt "$MIN_FREE_GB_8B" ]]; then
                echo "==> [8b] skipped: only ${free} GB free at $WORK, needs ${MIN_FREE_GB_8B} GB (release 18.8 GB + converted 18.8 GB)"
                record 8b disk-check - - - skipped 0 0 - - - "df: ${free} GB free < ${MIN_FREE_GB_8B} GB"
                continue
            fi
        fi
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "+ rm -rf $dir && mkdir -p $dir"
    else
        rm -rf "${dir:?}"
        mkdir -p "$dir"
    fi
    run_step "$preset" make-release "" "" "" "" -- "${CLI[@]}" make-release "$source" --preset "$preset" --quiet
    run_step "$preset" convert "" "" "" "" -- "${CLI[@]}" convert "$source" "$dir/hf" --no-verify --quiet

    dtypes=(bf16 fp32)
    loaders=("${LOADER_LIST[@]}")
    if [[ "$preset" == 8b && "$FP32_8B" != 1 ]]; then dtypes=(bf16); fi
    if [[ "$preset" == tiny ]]; then loaders=(transformers persimmon-tools); fi
    for dtype in "${dtypes[@]}"; do
        for loader in "${loaders[@]}"; do
            verify_step "$preset" "$dir" "$source" "$dtype" "$loader" hf
        done
    done
    if [[ "$preset" == "$ADEPT_PRESET" ]]; then
        verify_step "$preset" "$dir" "$source" bf16 "${loaders[0]}" adept
    fi
    if [[ "$preset" == 8b && "$KEEP" != 1 ]]; then
        if [[ "$DRY_RUN" == 1 ]]; then echo "+ rm -rf $dir  # --keep to keep it"; else rm -rf "${dir:?}"; fi
    fi
done

# ---------------------------------------------------------------------------------------------------- report
if [[ "$DRY_RUN" == 1 ]]; then
    echo "dry run: results would go to $RESULTS/results.json and $RESULTS/results.md"
    exit 0
fi
write_results
echo
echo "=== results ($RESULTS/results.md, $RESULTS/results.json)"
column -t -s $'\t' <(printf 'preset\tstep\tdtype\tloader\trotary\tstatus\trc\twall_s\tcuda_peak_gib\tverdict\n'
    cut -f1-10 "$STEPS_TSV") 2>/dev/null || cat "$RESULTS/results.md"
if [[ "$FAILED" -gt 0 ]]; then
    echo "gpu_check.sh: $FAILED step(s) failed or timed out" >&2
    exit 1
fi
echo "gpu_check.sh: all steps passed"

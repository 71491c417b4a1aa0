"""Convert/verify an 8B-shaped release on this machine, side by side with baselines, in one run.

    python benchmarks/bench_convert.py                       # 8B preset, builds the release if missing
    python benchmarks/bench_convert.py --preset mid          # ~1 GiB, a quick run
    python benchmarks/bench_convert.py --skip-baseline-converter --skip-verify

Steps (each a subprocess, peak RSS from ``os.wait4``; the tar's page cache is dropped with
``posix_fadvise(DONTNEED)`` before each timed read, so every contender starts cold on the source):

1. ``cp`` of the tar to the same filesystem (and ``cp`` + ``sync``, since convert fsyncs its output), and
2. ``persimmon-tools convert`` (``--dtype auto``, no verify), for ``--rounds`` rounds: median wall time, peak
   RSS. Each round starts after deleting both outputs, ``sync`` and ``--settle`` seconds, and runs both; the
   order flips every round, so each contender follows the deletions and the other's write equally often
   (what was deleted just before a write changes its speed on this disk by up to 50%);
3. bit-identity: every output tensor compared byte for byte with its source bytes in the tar;
4. a straightforward baseline converter (``torch.load`` of the whole checkpoint + ``safetensors`` ``save_file``,
   on the ``.pt`` extracted beforehand) under an address-space limit (``RLIMIT_AS``), so it fails cleanly instead of taking the machine down;
5. ``persimmon-tools verify`` on CPU with a 32-token prompt: wall time and peak RSS.

Prints a table and writes JSON (``--json``, default ``benchmarks/results/convert_<preset>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "persimmon_tools.cli"]

BASELINE = r"""
import resource, sys, torch, safetensors.torch
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
# ADEPT's ModelBackend is needed to unpickle; the baseline fakes it the way the HF script needs ADEPT's repo.
import types, enum
for name in ("tool_use", "tool_use.megatron"):
    sys.modules[name] = types.ModuleType(name)
mod = sys.modules["tool_use.megatron.megatron_utils"] = types.ModuleType("tool_use.megatron.megatron_utils")
class ModelBackend(enum.Enum):
    MEGATRON = "megatron"
mod.ModelBackend = ModelBackend
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
flat = {}
def walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            walk(v, prefix + k + ".")
        elif isinstance(v, torch.Tensor) and "inv_freq" not in k:
            flat[prefix + k] = v.contiguous()
walk(ckpt["model"])
safetensors.torch.save_file(flat, sys.argv[2], metadata={"format": "pt"})
"""


def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (no root needed)."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    elif path.is_dir():
        for p in path.iterdir():
            drop_cache(p)


def run_measured(args: list[str]) -> dict:
    """Run a command through peak_rss.py: wall seconds, exit code and the command's own peak RSS."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "peak_rss.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    err, _, tail = proc.stderr.rpartition("PEAK_RSS_JSON ")
    res = json.loads(tail)
    return {
        "seconds": round(res["seconds"], 2),
        "exit_code": res["exit_code"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "stdout": proc.stdout[-3000:],
        "stderr": err[-3000:],
    }


def bit_identical(tar: Path, out: Path) -> dict:
    """Compare every output tensor's bytes with the source bytes (streamed, bounded memory)."""
    code = r"""
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
from persimmon_tools.conversion.convert import prepare
plan = prepare(Path(sys.argv[1]))
out = Path(sys.argv[2])
index = out / "model.safetensors.index.json"
where = json.loads(index.read_text())["weight_map"] if index.exists() else {p.target: "model.safetensors" for p in plan.tensors}
same = diff = 0
handles = {}
for p in plan.tensors:
    f = handles.setdefault(where[p.target], safe_open(str(out / where[p.target]), framework="pt"))
    sl = f.get_slice(p.target)
    row = 0
    ok = True
    for block in p.source.iter_rows(64 << 20):
        n = block.shape[0] if block.dim() else 1
        got = sl[row:row + n] if block.dim() else f.get_tensor(p.target)
        ok &= torch.equal(got.contiguous().view(-1).view(torch.uint8), block.contiguous().view(-1).view(torch.uint8))
        row += n
    same += ok
    diff += not ok
print(json.dumps({"tensors_identical": same, "tensors_different": diff}))
"""
    res = run_measured([sys.executable, "-c", code, str(tar), str(out)])
    try:
        return {**json.loads(res["stdout"].strip().splitlines()[-1]), "seconds": res["seconds"]}
    except (ValueError, IndexError):
        return {"error": res["stderr"][-500:]}


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="8b", choices=["mid", "8b"])
    ap.add_argument("--workdir", type=Path, default=REPO / ".bench")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--baseline-limit-gib", type=float, default=16.0)
    ap.add_argument("--skip-baseline-converter", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--skip-bitcheck", action="store_true")
    ap.add_argument("--keep-output", action="store_true")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds of cp and convert, order flipped each round (even is fair)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of quiet after deleting and syncing, before each timed step",
    )
    a = ap.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    tar = work / f"{a.preset}_synthetic_release.tar"
    results: dict = {
        "preset": a.preset,
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    if not tar.exists():
        print(f"building {tar} ...", file=sys.stderr)
        results["make_release"] = run_measured([*CLI, "make-release", str(tar), "--preset", a.preset, "-q"])
    size = tar.stat().st_size
    results["release_bytes"] = size

    # cp and convert from the same disk history. On this disk (ext4 with online `discard` on a virtual
    # disk) what was deleted just before a write changes its speed by up to 50%: `cp` took 6.8-7.6 s after
    # nothing was deleted and 10.6 s right after a convert output was deleted, however long the disk was
    # left to settle. So each round starts from the same state (both outputs deleted, `sync`, `--settle`
    # seconds, cold source) and runs both, keeping the first output while the second is written; the order
    # flips every round (cp first, then convert first, ...), so each contender is measured equally often
    # after the deletions and after the other's write. Medians of the rounds are reported.
    copy, out = work / "cp_copy.tar", work / f"{a.preset}-hf"
    keep_both = shutil.disk_usage(work).free + (copy.stat().st_size if copy.exists() else 0) > 2.1 * size

    def clean_slate() -> None:
        copy.unlink(missing_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        time.sleep(a.settle)

    def run_cp() -> dict:
        drop_cache(tar)
        cp = run_measured(["cp", str(tar), str(copy)])
        start = time.perf_counter()
        subprocess.run(["sync"], check=True)
        cp["sync_seconds"] = round(time.perf_counter() - start, 2)
        return cp

    def run_convert() -> dict:
        drop_cache(tar)
        conv = run_measured([*CLI, "convert", str(tar), str(out), "--no-verify", "-q", "--json"])
        subprocess.run(["sync"], check=True)
        return conv

    if not keep_both:
        print(
            "not enough free space for both outputs: each step starts after deleting the other's",
            file=sys.stderr,
        )
    cps, convs = [], []
    for r in range(a.rounds):
        # Without room for both, cp goes first so that convert's output survives for the bit-identity check.
        order = [run_cp, run_convert] if r % 2 == 0 or not keep_both else [run_convert, run_cp]
        clean_slate()
        for step in order:
            if not keep_both and step is not order[0]:
                clean_slate()
            res = step()
            after_deletions = step is order[0] or not keep_both
            (cps if step is run_cp else convs).append({**res, "first_in_round": after_deletions})
        if convs[-1]["exit_code"] != 0:
            print(convs[-1]["stderr"], file=sys.stderr)
            break
    copy.unlink(missing_ok=True)
    conv = convs[-1]
    results["order"] = "counterbalanced" if keep_both else "each after deleting the other's output"

    def median(runs: list[dict]) -> dict:
        """The run nearest the median (its peak RSS etc.), with ``seconds`` the median itself."""
        mid = statistics.median(r["seconds"] for r in runs)
        return {**min(runs, key=lambda r: abs(r["seconds"] - mid)), "seconds": round(mid, 2)}

    for name, runs in (("cp", cps), ("convert", convs)):
        for first in (True, False):
            times = [r["seconds"] for r in runs if r["first_in_round"] is first]
            if times:
                key = "after_deletions" if first else "after_the_other"
                results.setdefault("by_position", {}).setdefault(name, {})[key] = statistics.median(times)
    results["cp_rounds"] = [r["seconds"] for r in cps]
    results["convert_rounds"] = [r["seconds"] for r in convs] or [conv["seconds"]]
    results["cp"] = median(cps)
    results["convert"] = median(convs) if conv["exit_code"] == 0 else conv
    if not a.skip_bitcheck and results["convert"]["exit_code"] == 0:
        results["bit_identity"] = bit_identical(tar, out)

    if not a.skip_verify and results["convert"]["exit_code"] == 0:
        ids = " ".join(str(i) for i in range(3, 35))  # 32 tokens
        drop_cache(tar)
        drop_cache(out)
        results["verify"] = run_measured(
            [
                *CLI,
                "verify",
                str(out),
                "--reference",
                str(tar),
                "--device",
                "cpu",
                "--ids",
                ids,
                "--no-default-prompts",
                "--json-file",
                str(work / f"verify_{a.preset}.json"),
            ]
        )
    if not a.keep_output:
        shutil.rmtree(out, ignore_errors=True)

    if not a.skip_baseline_converter:
        limit = int(a.baseline_limit_gib * 2**30)
        pt = work / "baseline_model_optim_rng.pt"  # the baseline needs a file: extract it (not timed)
        with tarfile.open(tar) as tf:
            member = next(m for m in tf if m.name.endswith("model_optim_rng.pt"))
            with tf.extractfile(member) as src, open(pt, "wb") as dst:
                shutil.copyfileobj(src, dst, 64 << 20)
        drop_cache(pt)
        res = run_measured(
            [sys.executable, "-c", BASELINE, str(pt), str(work / "baseline.safetensors"), str(limit)]
        )
        pt.unlink()
        res["limit_bytes"] = limit
        res["outcome"] = (
            "ok"
            if res["exit_code"] == 0
            else (
                "out of memory"
                if any(
                    w in res["stderr"] for w in ("MemoryError", "alloc", "Cannot allocate", "out of memory")
                )
                else "failed: " + (res["stderr"].strip().splitlines() or ["?"])[-1][:120]
            )
        )
        results["baseline_converter"] = res
        (work / "baseline.safetensors").unlink(missing_ok=True)

    cp_s, cps_s = results["cp"]["seconds"], results["cp"]["seconds"] + results["cp"]["sync_seconds"]
    conv = results["convert"]
    rows = [
        (
            "cp (same filesystem)",
            f"{cp_s:.1f} s",
            gib(results["cp"]["peak_rss_bytes"]),
            f"{size / cp_s / 2**20:.0f} MiB/s",
            "",
        ),
        ("cp + sync", f"{cps_s:.1f} s", "-", f"{size / cps_s / 2**20:.0f} MiB/s", ""),
        (
            "persimmon-tools convert",
            f"{conv['seconds']:.1f} s",
            gib(conv["peak_rss_bytes"]),
            f"{size / conv['seconds'] / 2**20:.0f} MiB/s",
            f"{conv['seconds'] / cp_s:.2f}x cp, {conv['seconds'] / cps_s:.2f}x cp+sync; medians of "
            f"{len(results['convert_rounds'])} rounds (cp {results['cp_rounds']}, convert {results['convert_rounds']})"
            + "".join(
                f"; {where.replace('_', ' ')}: cp {pos['cp'][where]:.2f} s, convert {pos['convert'][where]:.2f} s"
                for pos in [results.get("by_position", {})]
                for where in ("after_deletions", "after_the_other")
                if where in pos.get("cp", {}) and where in pos.get("convert", {})
            ),
        ),
    ]
    if "bit_identity" in results:
        b = results["bit_identity"]
        rows.append(
            (
                "bit-identity check",
                f"{b.get('seconds', 0):.1f} s",
                "-",
                "-",
                f"{b.get('tensors_identical')} identical, {b.get('tensors_different')} different",
            )
        )
    if "baseline_converter" in results:
        b = results["baseline_converter"]
        rows.append(
            (
                "torch.load + save_file",
                f"{b['seconds']:.1f} s",
                gib(b["peak_rss_bytes"]),
                "-",
                f"{b['outcome']} (RLIMIT_AS {gib(b['limit_bytes'])})",
            )
        )
    if "verify" in results:
        v = results["verify"]
        rows.append(
            (
                "persimmon-tools verify (CPU, 32 tokens)",
                f"{v['seconds']:.1f} s",
                gib(v["peak_rss_bytes"]),
                "-",
                f"exit {v['exit_code']}",
            )
        )
    results["table"] = rows
    print(f"\nrelease: {a.preset}, {size / 2**30:.2f} GiB; machine: {results['machine']}")
    print(f"| {'step':<40} | {'wall':>9} | {'peak RSS':>10} | {'throughput':>11} | notes |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 12}|{'-' * 13}|-------|")
    for r in rows:
        print(f"| {r[0]:<40} | {r[1]:>9} | {r[2]:>10} | {r[3]:>11} | {r[4]} |")
    target = a.json or REPO / "benchmarks" / "results" / f"convert_{a.preset}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {target}")


if __name__ == "__main__":
    main()

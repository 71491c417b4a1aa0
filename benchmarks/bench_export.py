"""Export a converted 8B-shaped release back to ADEPT's layout, side by side with ``cp``, in one run.

    python benchmarks/bench_export.py                        # 8B preset, TP=2 x PP=2 (issue 17's target)
    python benchmarks/bench_export.py --preset mid           # ~1 GiB, a quick run
    python benchmarks/bench_export.py --preset mid --tp 1 --pp 1 --rounds 2
    python benchmarks/bench_export.py --format torch_dist    # 8B to a Megatron-Core torch_dist checkpoint

Steps (each a subprocess, peak RSS from ``os.wait4`` via ``peak_rss.py``):

1. build the release with ``make-release --preset P`` if it is missing, and ``convert`` it to a Hugging Face
   folder ``HF`` (``--no-verify``); the tarball is then deleted unless ``--keep-release`` is given (disk);
2. for ``--rounds`` rounds, order flipped every round: ``cp -r HF COPY`` (and ``cp`` + ``sync``) and
   ``persimmon-tools export HF OUT --tp T --pp P -q``. Every step starts after deleting both outputs,
   ``sync``, ``--settle`` seconds and dropping the page cache of every file of ``HF``
   (``posix_fadvise(DONTNEED)``), so both start cold on the source; medians are reported;
3. round trip: ``convert OUT/NAME HF2 --no-verify --no-tokenizer`` (``convert OUT ...`` for torch_dist; OUT's
   page cache dropped first, and its time and peak RSS reported beside ``cp``) and every tensor of ``HF2``
   compared byte for byte with ``HF`` (raw data ranges from the safetensors headers, streamed in 64 MiB
   chunks).

Peak disk: the tarball + ``HF`` while converting, then ``HF`` + one output, then ``HF`` + ``OUT`` + ``HF2`` for
the round trip: about 3x the release. The script refuses to start without that much free space.

Prints a table and writes JSON (``--json``, default ``benchmarks/results/export_<preset>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "persimmon_tools.cli"]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_convert import drop_cache, gib, run_measured  # noqa: E402

# make-release's size of each preset (bytes of the bf16 tarball), for the free-space check before it exists.
RELEASE_BYTES = {"mid": 1_074_524_160, "8b": 18_794_885_120}
CHUNK = 64 << 20


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def safetensors_index(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def tensors_of(folder: Path) -> dict[str, tuple[Path, dict, int]]:
    """name -> (file, header entry, data start) over every ``*.safetensors`` file in ``folder``."""
    found: dict[str, tuple[Path, dict, int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        header, start = safetensors_index(f)
        for name, entry in header.items():
            found[name] = (f, entry, start)
    return found


def same_tensors(a_dir: Path, b_dir: Path) -> dict:
    """Compare every tensor of two HF folders byte for byte (dtype, shape, raw data), bounded memory."""
    start = time.perf_counter()
    a, b = tensors_of(a_dir), tensors_of(b_dir)
    same, different = 0, []
    handles: dict[Path, BinaryIO] = {}

    with contextlib.ExitStack() as stack:

        def fh(p: Path) -> BinaryIO:
            if p not in handles:
                handles[p] = stack.enter_context(open(p, "rb"))
            return handles[p]

        for name in sorted(a):
            if name not in b:
                different.append(f"{name}: missing in {b_dir.name}")
                continue
            (fa, ea, sa), (fb, eb, sb) = a[name], b[name]
            if (ea["dtype"], ea["shape"]) != (eb["dtype"], eb["shape"]):
                different.append(f"{name}: {ea['dtype']}{ea['shape']} vs {eb['dtype']}{eb['shape']}")
                continue
            (a0, a1), (b0, b1) = ea["data_offsets"], eb["data_offsets"]
            if a1 - a0 != b1 - b0:
                different.append(f"{name}: {a1 - a0} vs {b1 - b0} bytes")
                continue
            ha, hb = fh(fa), fh(fb)
            ha.seek(sa + a0)
            hb.seek(sb + b0)
            left, ok = a1 - a0, True
            while left and ok:
                n = min(CHUNK, left)
                ok = ha.read(n) == hb.read(n)
                left -= n
            if ok:
                same += 1
            else:
                different.append(f"{name}: bytes differ")
    extra = sorted(set(b) - set(a))
    different += [f"{name}: only in {b_dir.name}" for name in extra]
    return {
        "tensors": len(a),
        "tensors_identical": same,
        "tensors_different": len(different),
        "differences": different[:20],
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="8b", choices=["mid", "8b"])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--format", default="legacy", choices=["legacy", "torch_dist"], help="export's --format")
    ap.add_argument("--workdir", type=Path, default=REPO / ".bench")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of cp and export, order flipped each round")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of quiet before each timed step")
    ap.add_argument("--keep-release", action="store_true", help="keep the tarball after converting it")
    ap.add_argument("--keep-output", action="store_true", help="keep HF (the converted folder) at the end")
    ap.add_argument("--skip-roundtrip", action="store_true")
    a = ap.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    tar = work / f"{a.preset}_synthetic_release.tar"
    hf = work / f"{a.preset}-hf"
    copy, out, hf2 = work / "cp_copy", work / f"{a.preset}-export", work / f"{a.preset}-roundtrip-hf"
    for stale in (copy, out, hf2):
        shutil.rmtree(stale, ignore_errors=True)

    # Disk: the tarball and HF while converting, then HF + one output, then HF + OUT + HF2 (round trip).
    size = tar.stat().st_size if tar.exists() else tree_bytes(hf) or RELEASE_BYTES[a.preset]
    have = (tar.stat().st_size if tar.exists() else 0) + tree_bytes(hf)
    need_total = max(2 * size, (2 if a.skip_roundtrip else 3) * size) + (size if a.keep_release else 0)
    need = need_total - have + (1 << 30)  # and 1 GiB to spare
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(
            f"bench_export: {free / 1e9:.1f} GB free on {work}, {need / 1e9:.1f} GB needed (the {a.preset} "
            f"release is {size / 1e9:.1f} GB; peak is about {need_total / size:.0f}x that, plus 1 GiB). "
            "Free some space or pass --workdir on a bigger disk."
        )

    results: dict = {
        "preset": a.preset,
        "tp": a.tp,
        "pp": a.pp,
        "format": a.format,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    if not (hf / "config.json").exists():
        shutil.rmtree(hf, ignore_errors=True)
        if not tar.exists():
            print(f"building {tar} ...", file=sys.stderr)
            results["make_release"] = run_measured(
                [*CLI, "make-release", str(tar), "--preset", a.preset, "-q"]
            )
            if results["make_release"]["exit_code"]:
                sys.exit(results["make_release"]["stderr"])
        print(f"converting {tar} -> {hf} ...", file=sys.stderr)
        results["convert"] = run_measured([*CLI, "convert", str(tar), str(hf), "--no-verify", "-q"])
        if results["convert"]["exit_code"]:
            sys.exit(results["convert"]["stderr"])
    if not a.keep_release:
        tar.unlink(missing_ok=True)
    size = tree_bytes(hf)
    results["hf_bytes"] = size
    results["hf_files"] = sorted(p.name for p in hf.iterdir())

    def clean_slate() -> None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        time.sleep(a.settle)
        drop_cache(hf)

    def timed(cmd: list[str]) -> dict:
        res = run_measured(cmd)
        start = time.perf_counter()
        subprocess.run(["sync"], check=True)
        res["sync_seconds"] = round(time.perf_counter() - start, 2)
        return res

    def run_cp() -> dict:
        return timed(["cp", "-r", str(hf), str(copy)])

    shape = ["--tp", str(a.tp), "--pp", str(a.pp)] if a.format == "legacy" else ["--format", a.format]
    export_cmd = [*CLI, "export", str(hf), str(out), *shape, "-q"]
    label = f"--tp {a.tp} --pp {a.pp}" if a.format == "legacy" else f"--format {a.format}"

    def run_export() -> dict:
        return timed(export_cmd)

    # Every step after deleting both outputs (HF + one output on disk at a time); the order flips each round,
    # so each follows the other's deletion equally often.
    cps, exps = [], []
    for r in range(a.rounds):
        order = [run_cp, run_export] if r % 2 == 0 else [run_export, run_cp]
        for step in order:
            clean_slate()
            res = step()
            res["round"], res["first_in_round"] = r, step is order[0]
            (cps if step is run_cp else exps).append(res)
            print(f"round {r}: {'cp' if step is run_cp else 'export'} {res['seconds']} s", file=sys.stderr)
        if exps[-1]["exit_code"] != 0:
            print(exps[-1]["stderr"], file=sys.stderr)
            break
    shutil.rmtree(copy, ignore_errors=True)
    results["command"] = " ".join(["persimmon-tools", *export_cmd[3:]])

    def median(runs: list[dict]) -> dict:
        """The run nearest the median (its peak RSS etc.), with ``seconds`` the median itself."""
        mid = statistics.median(r["seconds"] for r in runs)
        mid_sync = statistics.median(r["seconds"] + r["sync_seconds"] for r in runs)
        near = min(runs, key=lambda r: abs(r["seconds"] - mid))
        return {
            **near,
            "seconds": round(mid, 2),
            "seconds_with_sync": round(mid_sync, 2),
            "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in runs),
        }

    results["cp_rounds"] = [r["seconds"] for r in cps]
    results["cp_sync_rounds"] = [r["sync_seconds"] for r in cps]
    results["export_rounds"] = [r["seconds"] for r in exps]
    results["export_sync_rounds"] = [r["sync_seconds"] for r in exps]
    results["cp"] = median(cps)
    ok = exps[-1]["exit_code"] == 0
    results["export"] = median(exps) if ok else exps[-1]

    if ok and not a.skip_roundtrip:
        # When the last timed step was cp, it started by deleting OUT: export once more (untimed).
        if not out.exists():
            results["roundtrip_export"] = run_measured(export_cmd)
        names = [p for p in out.iterdir() if p.is_dir()]
        back_source = out if a.format == "torch_dist" else names[0]
        results["export_files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        results["export_bytes"] = tree_bytes(out)
        subprocess.run(["sync"], check=True)
        drop_cache(hf)
        drop_cache(out)
        back = run_measured(
            [*CLI, "convert", str(back_source), str(hf2), "--no-verify", "--no-tokenizer", "-q"]
        )
        results["roundtrip_convert"] = back
        if back["exit_code"] == 0:
            drop_cache(hf)
            drop_cache(hf2)
            results["roundtrip"] = same_tensors(hf, hf2)
        shutil.rmtree(hf2, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    if not a.keep_output:
        shutil.rmtree(hf, ignore_errors=True)
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    cp, ex = results["cp"], results["export"]
    cp_s, cps_s = cp["seconds"], cp["seconds_with_sync"]

    def rounds(runs: list[dict], sync: bool = False) -> str:
        return ", ".join(f"{r['seconds'] + (r['sync_seconds'] if sync else 0):.2f}" for r in runs)

    rows = [
        (
            "cp -r (same filesystem)",
            f"{cp_s:.1f} s",
            rounds(cps),
            gib(cp["peak_rss_bytes_max"]),
            f"{size / cp_s / 2**20:.0f} MiB/s",
            "1.00x",
        ),
        (
            "cp -r + sync",
            f"{cps_s:.1f} s",
            rounds(cps, True),
            "-",
            f"{size / cps_s / 2**20:.0f} MiB/s",
            "1.00x",
        ),
    ]
    if ok:
        rows += [
            (
                f"persimmon-tools export {label}",
                f"{ex['seconds']:.1f} s",
                rounds(exps),
                gib(ex["peak_rss_bytes_max"]),
                f"{size / ex['seconds'] / 2**20:.0f} MiB/s",
                f"{ex['seconds'] / cp_s:.2f}x cp",
            ),
            (
                "export + sync",
                f"{ex['seconds_with_sync']:.1f} s",
                rounds(exps, True),
                "-",
                f"{size / ex['seconds_with_sync'] / 2**20:.0f} MiB/s",
                f"{ex['seconds_with_sync'] / cps_s:.2f}x cp+sync",
            ),
        ]
    else:
        rows.append(("persimmon-tools export", "failed", "", "", "", f"exit {ex['exit_code']}"))
    if "roundtrip" in results:
        rt, back = results["roundtrip"], results["roundtrip_convert"]
        rows.append(
            (
                "convert OUT back (cold cache, one run)",
                f"{back['seconds']:.1f} s",
                "",
                gib(back["peak_rss_bytes"]),
                f"{size / back['seconds'] / 2**20:.0f} MiB/s",
                f"{back['seconds'] / cp_s:.2f}x cp",
            )
        )
        rows.append(
            (
                "round trip: convert OUT back, compare",
                f"{rt['seconds']:.1f} s",
                "",
                "",
                "",
                f"{rt['tensors_identical']} of {rt['tensors']} tensors identical",
            )
        )
    elif "roundtrip_convert" in results:
        rows.append(
            (
                "round trip: convert OUT back",
                "failed",
                "",
                "",
                "",
                results["roundtrip_convert"]["stderr"][-200:],
            )
        )
    results["targets"] = {
        "peak_rss_le_1_gib": ok and ex["peak_rss_bytes_max"] <= 2**30,
        "wall_le_1_3x_cp": ok and ex["seconds"] <= 1.3 * cp_s,
        "wall_with_sync_le_1_3x_cp_with_sync": ok and ex["seconds_with_sync"] <= 1.3 * cps_s,
        "peak_rss_le_2_gib": ok and ex["peak_rss_bytes_max"] <= 2 * 2**30,
    }
    if "roundtrip_convert" in results and results["roundtrip_convert"]["exit_code"] == 0:
        back = results["roundtrip_convert"]
        results["targets"]["convert_back_peak_rss_le_2_gib"] = back["peak_rss_bytes"] <= 2 * 2**30
        results["targets"]["convert_back_wall_le_1_3x_cp"] = back["seconds"] <= 1.3 * cp_s
    results["table"] = rows
    print(
        f"\nsource: {hf.name} ({a.preset}, {size / 2**30:.2f} GiB, {size / 1e9:.2f} GB); export {label}; "
        f"{a.rounds} rounds; load average {results['loadavg_start']} -> {results['loadavg_end']}"
    )
    head = ("step", "wall (median)", "rounds (s)", "peak RSS", "throughput", "ratio")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"targets: {results['targets']}")
    suffix = "" if a.format == "legacy" else f"_{a.format}"
    target = a.json or REPO / "benchmarks" / "results" / f"export_{a.preset}{suffix}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {target}")


if __name__ == "__main__":
    main()

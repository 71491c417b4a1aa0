"""Long CLI fuzzing run (outside CI): the strategies of ``tests/cli/test_cli_fuzz.py`` for N inputs per command.

    python benchmarks/fuzz_cli.py --examples 10000
    python benchmarks/fuzz_cli.py --examples 2000 --commands convert,inspect --seconds 300

Prints, per command, the count of examples by exit code, how many were not clean, and each distinct
traceback found (file, function, exception of the innermost toolkit frame; one example argv each).
``--seconds`` caps each command's wall time; the table says how many examples actually ran.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings

REPO = Path(__file__).resolve().parent.parent


def _load_fuzz_module():
    spec = importlib.util.spec_from_file_location("cli_fuzz", REPO / "tests" / "cli" / "test_cli_fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class _Stop(Exception):
    pass


def fuzz_command(fz, command: str, n: int, seconds: float, inputs: Path, sentinel: Path, root: Path) -> dict:
    codes: collections.Counter = collections.Counter()
    problems: dict[tuple, tuple[int, list[str], str]] = {}
    start = time.monotonic()

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=fz.argv_strategy(command))
    def run(drawn):
        if time.monotonic() - start > seconds:
            raise _Stop
        outcome = fz.run_example(drawn, inputs, sentinel, root / "example")
        codes[outcome.exit_code] += 1
        if outcome.problem is not None:
            key = outcome.signature or (outcome.problem.splitlines()[0][:120],)
            count, argv, text = problems.get(key, (0, outcome.argv, outcome.problem))
            problems[key] = (count + 1, argv, text)

    with contextlib.suppress(_Stop):
        run()
    return {"codes": codes, "problems": problems, "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=10000, help="examples per command")
    parser.add_argument("--seconds", type=float, default=float("inf"), help="wall-time cap per command")
    parser.add_argument("--commands", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--show-tracebacks", action="store_true", help="print one full traceback per bug")
    args = parser.parse_args()
    fz = _load_fuzz_module()
    commands = args.commands.split(",") if args.commands else fz.COMMANDS
    logging.disable(logging.CRITICAL)  # the library's info/warnings would flood the terminal

    root = Path(tempfile.mkdtemp(prefix="fuzz_cli_"))
    old_env = fz.set_offline_env(root / "hf_home")
    try:
        from persimmon_tools.conversion.convert import ConvertOptions, convert

        tar = REPO / "fixtures" / "tiny_release.tar"
        converted = root / "converted-src"
        convert(tar, converted, ConvertOptions())
        inputs, sentinel = fz.make_inputs(root / "ws", tar, converted)
        results = {}
        for command in commands:
            results[command] = fuzz_command(fz, command, args.examples, args.seconds, inputs, sentinel, root)
            r = results[command]
            print(f"{command}: {sum(r['codes'].values())} examples in {r['seconds']:.0f} s", file=sys.stderr)
    finally:
        for k, v in old_env.items():
            if v is not None:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)

    all_codes = sorted({c for r in results.values() for c in r["codes"]})
    header = f"{'command':<14}{'examples':>9}{'seconds':>9}" + "".join(f"{f'exit {c}':>9}" for c in all_codes)
    print(header + f"{'unclean':>9}")
    for command, r in results.items():
        unclean = sum(n for n, _, _ in r["problems"].values())
        print(
            f"{command:<14}{sum(r['codes'].values()):>9}{r['seconds']:>9.0f}"
            + "".join(f"{r['codes'].get(c, 0):>9}" for c in all_codes)
            + f"{unclean:>9}"
        )
    print()
    for command, r in results.items():
        for key, (count, argv, text) in sorted(r["problems"].items(), key=lambda kv: -kv[1][0]):
            print(f"{command}: {count} x {':'.join(key)}\n    e.g. {argv}")
            if args.show_tracebacks:
                print("    " + text.replace("\n", "\n    "))


if __name__ == "__main__":
    main()

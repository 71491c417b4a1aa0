"""Run a command and report its own peak RSS: ``python benchmarks/peak_rss.py CMD ARGS...``.

Prints ``PEAK_RSS_JSON {"exit_code", "peak_rss_bytes", "seconds"}`` as the last line of stderr. A child's ``ru_maxrss`` starts from its parent's RSS at fork time and
survives ``exec``, so measuring from a big parent (pytest with torch loaded) over-reports; this launcher is a
small Python process, so the number is the command's own.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(sys.argv[1], sys.argv[1:])
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    result = {
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "seconds": round(time.perf_counter() - start, 3),
    }
    sys.stderr.write("\nPEAK_RSS_JSON " + json.dumps(result) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()

"""Memory and speed of a compressed model against its dense original (the same as
``cospadi bench-runtime DIR``; see cospadi/pipeline/bench_runtime.py).

    python tools/bench_runtime.py OUT_DIR [--dense DIR] [--threads 1] [--json FILE]
"""

from __future__ import annotations

from cospadi.pipeline.bench_runtime import main

if __name__ == "__main__":
    raise SystemExit(main())

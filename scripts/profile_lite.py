"""Where a milvus-lite server spends its time: insert, index build, search, filtered searches, profiled apart.

    .venv/bin/pip install -e ".[profile]"        # py-spy
    .venv/bin/python scripts/profile_lite.py --rows 100000 --out /tmp/lite-profile

Starts a milvus-lite server of its own (a temporary data folder, a free loopback port, the pipeline's engine
settings), fills a collection through ``ImageIndex.upsert`` with synthetic 1280-d rows, and samples the server with
``py-spy`` during each phase. Prints, per phase, the figures and the functions holding the largest shares of the
server's samples (self time and inclusive), and leaves the raw profiles in ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from embedding_pipeline.bench import corpus as corpus_mod
from embedding_pipeline.bench.insert import build_index
from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.index.server import NAME, start_milvus, stop_milvus
from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.state import HOME_ENV
from embedding_pipeline.settings import load_settings

FILTERS = {
    "unfiltered": None,
    "declared_key": 'metadata["category"] == "c3"',
    "undeclared_key": 'metadata["group"] == "g3"',
}


def top_frames(raw: Path, count: int) -> dict[str, list[tuple[float, str]]]:
    """The frames with the largest shares of the samples in a py-spy ``raw`` profile: self and inclusive."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", re.sub(r" \(.*site-packages/", " (", f)) for f in stack.split(";")]
        if not any(k in stack for k in ("Servicer.", "_bg_", "Collection.")):
            continue  # idle gRPC and executor threads
        total += int(n)
        for frame in set(frames):
            inclusive[frame] += int(n)
        own[frames[-1]] += int(n)

    def shares(counter: collections.Counter[str]) -> list[tuple[float, str]]:
        return [(round(100 * v / total, 1), k) for k, v in counter.most_common(count)] if total else []

    return {"self": shares(own), "inclusive": shares(inclusive)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("lite-profile"))
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install -e '.[profile]'", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="lite-profile-"))
    (port,) = processes.free_ports(1)
    settings = load_settings(environ={HOME_ENV: str(home), "MILVUS_URI": f"http://127.0.0.1:{port}"})
    milvus = settings.milvus.model_copy(update={"collection": "profile", "filter_fields": {"category": "VARCHAR"}})
    corpus = corpus_mod.build(args.rows, 1280, None, None, args.queries)
    figures: dict[str, dict] = {}
    start_milvus(settings)
    try:
        pid = processes.read(settings.paths.run, NAME).pid

        def phase(name: str, work) -> None:  # noqa: ANN001 - a callable returning the phase's figures
            out = args.out / f"{name}.txt"
            sampler = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "-o", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached before the work starts
            started = time.perf_counter()
            result = work()
            seconds = time.perf_counter() - started
            sampler.send_signal(signal.SIGINT)
            sampler.wait(120)
            figures[name] = {"seconds": round(seconds, 2), **(result or {}), **top_frames(out, args.top)}

        with ImageIndex(milvus) as index:
            index.ensure_collection(corpus.dim)
            step = index.settings.insert_batch_size * 10
            phase("insert", lambda: {"rows": sum(index.upsert(rows) for rows in corpus.batches(step, "m"))})
            phase("index_build", lambda: build_index(index, corpus.size, pid))
            for name, expr in FILTERS.items():
                index.search(corpus.query(0), top_k=10, filter=expr)

                def searches(expr: str | None = expr) -> dict:
                    ms = []
                    for i in range(args.queries):
                        t0 = time.perf_counter()
                        index.search(corpus.query(i), top_k=10, filter=expr)
                        ms.append(1000 * (time.perf_counter() - t0))
                    return {
                        "p50_ms": round(float(np.percentile(ms, 50)), 2),
                        "p99_ms": round(float(np.percentile(ms, 99)), 2),
                    }

                phase(f"search_{name}", searches)
    finally:
        stop_milvus(settings)
        shutil.rmtree(home, ignore_errors=True)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    for name, f in figures.items():
        head = {k: v for k, v in f.items() if k not in ("self", "inclusive")}
        print(f"\n== {name}: {head}")
        for share, frame in f["self"]:
            print(f"  {share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

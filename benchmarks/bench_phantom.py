"""Benchmark: rendering the phantom cohort (target: 10,000 images at 64x64 in under 60 s on
2 cores), measured side by side with 1 and 2 worker processes in one run.

    python benchmarks/bench_phantom.py [--n 10000] [--size 64]

Times the whole writer (metadata sampling, rendering, JPEG encoding, files, train.csv), then
decoding the result into the image cache, and prints seconds, images per second, the ratio to
the 60 s budget and the speed-up of 2 workers over 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cxrlib.core.schema import PhantomSpec
from cxrlib.data.imagecache import build_cache
from cxrlib.data.phantom import lung_templates, write_phantom_site

BUDGET_S = 60.0


def time_render(n: int, size: int, workers: int, folder: Path) -> float:
    spec = PhantomSpec(metadata="chexpert", style="chexpert", n_images=n, image_size=size)
    start = time.perf_counter()
    write_phantom_site(folder, folder.name, spec, seed=0, race_marginals={"White": 1.0},
                       workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    lung_templates()  # decoded once (and cached on disk); not part of the per-image cost
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            folder = Path(tmp) / f"w{workers}"
            secs = time_render(args.n, args.size, workers, folder)
            rows.append((workers, secs))
            print(f"render  workers={workers}: {secs:7.2f} s  {args.n / secs:8.0f} img/s  "
                  f"{secs / BUDGET_S:.2f}x of the {BUDGET_S:.0f} s budget")
        import pandas as pd

        table = pd.read_csv(Path(tmp) / "w2" / "train.csv")
        paths = [str(Path(tmp) / "w2" / p.split("/", 1)[1]) for p in table["Path"]]
        for workers in (1, 2):
            start = time.perf_counter()
            build_cache(paths, [str(i) for i in range(len(paths))], Path(tmp) / f"cache{workers}",
                        args.size, workers=workers, progress=False)
            secs = time.perf_counter() - start
            print(f"cache   workers={workers}: {secs:7.2f} s  {len(paths) / secs:8.0f} img/s")
    (w1, s1), (w2, s2) = rows
    print(f"\nspeed-up 2 workers / 1 worker (render): {s1 / s2:.2f}x")
    verdict = "PASS" if s2 < BUDGET_S else "FAIL"
    print(f"{verdict}: {args.n} phantoms at {args.size}px in {s2:.1f} s with 2 workers "
          f"(budget {BUDGET_S:.0f} s, ratio {s2 / BUDGET_S:.2f})")


if __name__ == "__main__":
    main()

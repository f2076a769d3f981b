"""First and second ``load_model`` of the bundled models, each in a fresh process.

The first load starts from an empty conversion cache: it dequantises the GGUF and writes
the cache entry. The second, in a new process, reads the entry. Both run against a
temporary ``TL_LINMAP_CACHE``, so the user's cache is neither used nor touched.
``--uncached`` also times ``load_model(..., cache=False)`` (what every load cost before
the cache). Times: ``load_model`` alone, and the whole process (Python start and imports
included). ``sha256`` is the hashing of the GGUF file each cached load pays for its key.

Usage: python benchmarks/load.py [--models smollm2 gemma3-270m] [--uncached]
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tl_linmap.load.models import bundled_path

# Runs in the child: prints the timings as the last line of stdout.
CHILD = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import tl_linmap
start = time.perf_counter()
tl_linmap.load_model(sys.argv[1], cache=sys.argv[2] == "cache")
print(json.dumps({"load_s": time.perf_counter() - start}))
"""


def timed_load(name, cache_root, cache=True):
    """Seconds of one load in a fresh process: load_model, and the process wall time."""
    env = {**os.environ, "TL_LINMAP_CACHE": str(cache_root), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, name, "cache" if cache else "no-cache"],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"load_model({name!r}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["load_s"], wall


def sha256_seconds(path):
    start = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return time.perf_counter() - start


def size_mb(path):
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"])
    parser.add_argument("--uncached", action="store_true", help="also time load_model(..., cache=False)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}")
    header = "| model | GGUF MB | cache MB | sha256 s | first load_model s | second load_model s | ratio | first process s | second process s | ratio |"
    if args.uncached:
        header += " cache=False load_model s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.models:
        gguf = bundled_path(name)
        with tempfile.TemporaryDirectory(prefix="tl_linmap_load_bench_") as root:
            first, first_wall = timed_load(name, root)
            second, second_wall = timed_load(name, root)
            cached_mb = size_mb(root)
            row = (f"| {name} | {size_mb(gguf):.0f} | {cached_mb:.0f} | {sha256_seconds(gguf):.2f} | {first:.1f} | "
                   f"{second:.1f} | {first / second:.1f} | {first_wall:.1f} | {second_wall:.1f} | "
                   f"{first_wall / second_wall:.1f} |")
            if args.uncached:
                row += f" {timed_load(name, root, cache=False)[0]:.1f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""Peak memory and time of SmolLM2's 8-token `layer_maps(..., modules=True)` (180 dense maps), in a fresh process.

    python benchmarks/maps_memory.py                          # this checkout (about 1-2 minutes on 2 cores)
    PYTHONPATH=/path/to/old python benchmarks/maps_memory.py  # another version, for an A/B

Prints the peak resident set (the kernel's high-water mark, reset once the model is loaded), its growth
during the call, the seconds, and which tl_linmap ran. Measured 2026-12-07 (docs/scale.md): 9.40 GB
and 106 s before maps were held within a budget and blocks cast one at a time, 2.19 GB and 65 s after.
"""

from __future__ import annotations

import json
import subprocess
import sys

from peak_memory import PRELUDE

_CHILD = r"""
import json, time, warnings
warnings.filterwarnings("ignore")
import tl_linmap

model = tl_linmap.load_model("smollm2")

from peak_memory import high_water, reset

base = reset()
start = time.perf_counter()
maps = tl_linmap.layer_maps(model, "The capital of France is a city in", modules=True, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"peak": high_water(), "growth": high_water() - base, "seconds": seconds, "maps": len(maps),
                  "file": tl_linmap.__file__}))
"""


def main() -> None:
    # From / so that the tl_linmap imported is the installed one, or PYTHONPATH's.
    out = subprocess.run([sys.executable, "-c", PRELUDE + _CHILD], capture_output=True, text=True, check=True, cwd="/")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"layer_maps(SmolLM2, 8 tokens, modules=True): {r['maps']} maps, peak {r['peak'] / 1e9:.2f} GB "
          f"({r['growth'] / 1e9:.2f} GB above the loaded model), {r['seconds']:.0f} s; tl_linmap from {r['file']}")


if __name__ == "__main__":
    main()

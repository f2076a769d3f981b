"""Peak memory of mapping a model held in a narrower dtype than the working one (issue 27).

A random Llama-shaped bridge of about 0.5B parameters is built in bfloat16, then each call runs
in its own process: the peak resident set during the call (the kernel's high-water mark, reset
after the model is built) is printed against the model's own size and against what one full
float64 copy of it would take (the borrow's cost before blocks were cast one at a time). The
routes that keep a graph keep the cast blocks where they fit the runtime's share of free memory;
the calls marked "no room" run as on a machine where they would not (free memory reported as one
float64 copy, so half of it cannot hold one), where the graph saves recipes to cast again.

    python benchmarks/scale_memory.py            # about 5 minutes on 2 cores
    python benchmarks/scale_memory.py --quick    # a 0.1B model
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from peak_memory import PRELUDE

CALLS = {
    "token_contributions": "tl_linmap.token_contributions(model, tokens, dtype=torch.float64)",
    "push_forward (8 vectors from layer 0)": "tl_linmap.push_forward(model, tokens, torch.randn(8, model.cfg.d_model), source='blocks.0.hook_resid_pre', source_position=0, dtype=torch.float64)",
    "logit readout (linear_map, rows)": "tl_linmap.linear_map(model, tokens, target=tl_linmap.Logit(5), dtype=torch.float64)",
    "matrix_free svd k=4": "exec('with tl_linmap.matrix_free(model, tokens, dtype=torch.float64) as mf: mf.svd(k=4)')",
}
_NO_ROOM = "tl_linmap.base.budget.available_bytes = lambda device: 8 * sum(p.numel() for p in model.parameters())\n"
CALLS.update({
    f"{label}, no room": _NO_ROOM + call for label, call in CALLS.items() if label.startswith(("logit readout", "matrix_free"))
})

_CHILD = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, tl_linmap
from tl_linmap.load.toy import toy_model

size, call = json.loads(sys.argv[1])
model = toy_model("llama", dtype=torch.bfloat16, n_ctx=64, **size)
tokens = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))

from peak_memory import high_water, reset

base = reset()
start = time.perf_counter()
exec(call)
seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"peak": high_water() - base, "params": params, "seconds": seconds, "file": tl_linmap.__file__}))
"""

SIZES = {
    "full": dict(d_model=1536, n_layers=18, n_heads=12, d_mlp=4096),
    "quick": dict(d_model=768, n_layers=12, n_heads=12, d_mlp=2048),
}


def run(size: dict, call: str) -> dict:
    # Run from / so that the tl_linmap imported is the installed one, or PYTHONPATH's (an A/B of versions).
    out = subprocess.run([sys.executable, "-c", PRELUDE + _CHILD, json.dumps([size, call])], capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    size = SIZES["quick" if parser.parse_args().quick else "full"]
    print(f"random Llama-shaped bridge {size}, bfloat16, 12 tokens, mapped in float64")
    print(f"{'call':36} {'peak GiB':>9} {'/ model':>8} {'/ f64 copy':>11} {'seconds':>8}")
    for label, call in CALLS.items():
        r = run(size, call)
        model, copy = 2 * r["params"], 8 * r["params"]
        print(f"{label:36} {r['peak'] / 2**30:9.2f} {r['peak'] / model:8.2f} {r['peak'] / copy:11.2f} {r['seconds']:8.1f}")
    print(f"(tl_linmap from {r['file']})")
    print(f"(model {model / 2**30:.2f} GiB in bfloat16, {r['params'] / 1e9:.2f}B parameters; a float64 copy {copy / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()

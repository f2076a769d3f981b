"""The README's table of relative reconstruction errors on the toy models (float64 / float32).

Usage:
    python scripts/toy_errors.py
"""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import tl_linmap  # noqa: E402
from tl_linmap.load.toy import FAMILIES, toy_model  # noqa: E402

PROMPT = "Hello world, this is a test"


def main() -> None:
    print(f'Final-norm output, prompt "{PROMPT}"\n')
    print("| family | architecture | float64 | float32 |")
    print("|---|---|---|---|")
    for family in FAMILIES:
        model = toy_model(family)
        errors = [tl_linmap.linear_map(model, PROMPT, dtype=dtype).relative_error() for dtype in (torch.float64, torch.float32)]
        print(f"| {family} | {model.cfg.architecture} | {errors[0]:.1e} | {errors[1]:.1e} |")


if __name__ == "__main__":
    main()

"""The GPU benchmark's command runs on the CPU (`--device cpu --quick`): every route, exact, its table written.

No wall-clock assertions: the run's times depend on the machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
gpu = pytest.importorskip("gpu")

#: Largest relative error per working dtype (float64's bound is 1e-12; float32 rounds at about 1e-7).
BOUNDS = {"float64": 1e-10, "float32": 1e-4}


def _table(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("gpu")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, text=True)
    files = list(out.glob("gpu-cpu-quick-*.md"))
    assert len(files) == 1, files
    return _table(files[0])


def test_every_model_dtype_and_route_has_a_row(table):
    models = list(dict.fromkeys(row["model"] for row in table))
    assert len(models) == 3
    for model in models:
        routes = gpu.ROUTES if model.startswith("SmolLM2") else [r for r in gpu.ROUTES if r != "attribution_graph"]
        for dtype in BOUNDS:
            assert [r["route"] for r in table if r["model"] == model and r["dtype"] == dtype] == list(routes), (model, dtype)


def test_every_route_ran_and_is_exact(table):
    for row in table:
        assert not row["note"], row  # nothing skipped at the quick sizes
        assert float(row["relative error"]) < BOUNDS[row["dtype"]], row
        assert float(row["seconds"]) >= 0 and float(row["plan s"]) > 0, row

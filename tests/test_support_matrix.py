"""The support matrix (`scripts/support_matrix.py`) against what TransformerLens boots and what tl_linmap maps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tl_linmap.freeze.architectures import EXCEPTIONS, SUPPORTED

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformer_lens.model_bridge")


def _script():
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {row["architecture"]: row for row in json.loads((ROOT / "tl_linmap" / "support_matrix.json").read_text())}


def test_every_architecture_transformerlens_boots_is_in_the_matrix(rows):
    missing = sorted(set(_script().decoder_only_text()) - rows.keys())
    assert not missing, f"TransformerLens boots {missing}, which the support matrix lacks: run scripts/support_matrix.py"


def test_supported_rows_are_the_tested_set(rows):
    supported = {arch for arch, row in rows.items() if row["status"] == "supported"}
    assert supported == SUPPORTED & rows.keys()
    for arch in supported:
        assert rows[arch]["float64"] < 1e-12 and rows[arch]["float32"] < 1e-4, arch


def test_refused_rows_give_a_reason(rows):
    for arch, row in rows.items():
        if row["status"] != "supported":
            assert row["reason"].strip(), arch
            if arch in EXCEPTIONS:
                assert EXCEPTIONS[arch] in row["reason"]


def test_the_docs_show_the_matrix(rows):
    table = _script().markdown(list(rows.values()))
    assert table in (ROOT / "docs" / "support.md").read_text()


def test_only_replaces_the_rows_it_recomputed():
    kept = [{"architecture": "AForCausalLM", "status": "refused", "reason": "old"}, {"architecture": "CForCausalLM", "status": "refused", "reason": "kept"}]
    fresh = [{"architecture": "AForCausalLM", "status": "refused", "reason": "new"}, {"architecture": "BForCausalLM", "status": "refused", "reason": "added"}]
    rows = _script().merged(kept, fresh)
    assert [(row["architecture"], row["reason"]) for row in rows] == [("AForCausalLM", "new"), ("BForCausalLM", "added"), ("CForCausalLM", "kept")]


def test_only_refuses_an_architecture_transformerlens_does_not_boot(capsys):
    with pytest.raises(SystemExit):
        _script().main(["--only", "NoSuchForCausalLM"])
    assert "NoSuchForCausalLM" in capsys.readouterr().err

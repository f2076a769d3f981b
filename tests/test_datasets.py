"""The bundled datasets: what the files hold, how they load, and that the package ships them."""

from __future__ import annotations

import dataclasses
import json
from fnmatch import fnmatch
from pathlib import Path

import pytest

import tl_linmap
from tl_linmap.load import datasets
from tl_linmap.base.errors import InputError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# The imported package's files (the checkout's, or site-packages' where scripts/wheel_check.sh runs the tests).
DATA = Path(tl_linmap.__file__).parent / "data"


def test_a_hundred_distinct_short_phrases_of_varied_kinds():
    records = json.loads((DATA / "phrases.json").read_text(encoding="utf-8"))["phrases"]
    texts = datasets.phrases()
    assert texts == [r["text"] for r in records]
    assert len(texts) == len(set(texts)) == 100
    assert all(5 <= len(t.split()) <= 15 for t in texts), [t for t in texts if not 5 <= len(t.split()) <= 15]
    kinds = datasets.phrase_kinds()
    assert len(kinds) >= 8 and {"code", "arithmetic", "negation", "question"} <= set(kinds)
    assert sum(len(datasets.phrases(kind)) for kind in kinds) == 100
    assert min(len(datasets.phrases(kind)) for kind in kinds) >= 5


def test_kind_filters_and_names():
    code = datasets.phrases("code")
    assert code and all(datasets.phrase_kind(t) == "code" for t in code)
    with pytest.raises(InputError, match=r"No phrases of kind 'poems'; the kinds are \['fact'"):
        datasets.phrases("poems")
    with pytest.raises(InputError, match="is not one of the bundled phrases"):
        datasets.phrase_kind("not a phrase")


def test_callers_cannot_change_the_shared_data():
    datasets.phrases().append("extra")
    assert len(datasets.phrases()) == 100
    if (DATA / "pairs.json").exists():
        with pytest.raises(dataclasses.FrozenInstanceError):
            datasets.prompt_pairs()[0].clean = "changed"


def test_prompt_pairs_or_a_clear_error():
    if (DATA / "pairs.json").exists():
        records = json.loads((DATA / "pairs.json").read_text(encoding="utf-8"))["pairs"]
        pairs = datasets.prompt_pairs()
        assert [dataclasses.asdict(p) for p in pairs] == records
        assert all(p.metric == (r["answer"], r["wrong"]) for p, r in zip(pairs, records))
        assert tl_linmap.prompt_pairs is tl_linmap.patching.prompt_pairs is datasets.prompt_pairs  # one loader
    else:
        with pytest.raises(FileNotFoundError, match=r"ships no data file 'pairs.json' \(tl_linmap/data has \['phrases.json'"):
            datasets.prompt_pairs()


def test_the_package_ships_every_data_file():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tl_linmap"]
    for path in DATA.iterdir():
        assert any(fnmatch(path.relative_to(DATA.parent).as_posix(), p) for p in patterns), path.name
    assert tl_linmap.datasets is datasets

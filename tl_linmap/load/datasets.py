"""Datasets shipped with tl_linmap: short phrases of varied kinds, and prompt pairs for patching.

The files live in ``tl_linmap/data/`` and are read with `importlib.resources`, so they work
from an installed wheel as well as from a checkout:

- ``phrases.json``: a hundred short phrases (facts, geography, code, arithmetic, dialogue,
  poetry, instructions, lists, negation, questions), written for this project, each tagged with
  its kind; the input of `tl_linmap.methods.corpus` analyses, the tutorial and the benchmarks.
- ``pairs.json``: clean/corrupted prompt pairs for activation patching (`prompt_pairs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from tl_linmap.base.errors import InputError

#: The phrase file's name inside ``tl_linmap/data``.
PHRASES = "phrases.json"


#: The prompt-pair file's name inside ``tl_linmap/data``.
PAIRS = "pairs.json"


@cache
def read_data(name: str) -> dict:
    """One JSON file of ``tl_linmap/data``, parsed (read once per process).

    Args:
        name: File name, e.g. ``"phrases.json"``.

    Returns:
        The parsed JSON object (callers must not modify it: it is shared).

    Raises:
        FileNotFoundError: if the package ships no such file.
    """
    path = resources.files("tl_linmap") / "data" / name
    if not path.is_file():
        shipped = sorted(p.name for p in (resources.files("tl_linmap") / "data").iterdir() if p.name.endswith(".json"))
        raise FileNotFoundError(f"tl_linmap ships no data file {name!r} (tl_linmap/data has {shipped}).")
    return json.loads(path.read_text(encoding="utf-8"))


def phrase_kinds() -> list[str]:
    """The kinds of the bundled phrases, in file order.

    Returns:
        Kind names (``"fact"``, ``"geography"``, ``"code"``, ...).
    """
    return list(dict.fromkeys(p["kind"] for p in read_data(PHRASES)["phrases"]))


def phrases(kind: str | None = None) -> list[str]:
    """The bundled short phrases (5-15 words each), optionally of one kind.

    Args:
        kind: One of `phrase_kinds` (default: every phrase, a hundred).

    Returns:
        The phrases' texts, in file order.

    Raises:
        InputError: for a kind the file does not have.
    """
    records = read_data(PHRASES)["phrases"]
    if kind is None:
        return [p["text"] for p in records]
    if kind not in phrase_kinds():
        raise InputError(f"No phrases of kind {kind!r}; the kinds are {phrase_kinds()}.")
    return [p["text"] for p in records if p["kind"] == kind]


def phrase_kind(text: str) -> str:
    """The kind of one bundled phrase.

    Args:
        text: A phrase's exact text.

    Returns:
        Its kind.

    Raises:
        InputError: if the text is not a bundled phrase.
    """
    for p in read_data(PHRASES)["phrases"]:
        if p["text"] == text:
            return p["kind"]
    raise InputError(f"{text!r} is not one of the bundled phrases (tl_linmap.load.datasets.phrases()).")


@dataclass(frozen=True)
class PromptPair:
    """A clean/corrupted prompt pair of equal length (on SmolLM2) with its answer tokens.

    Attributes:
        name: Short identifier.
        kind: The task ("factual recall", "indirect object identification").
        clean: The clean prompt.
        corrupted: The corrupted prompt.
        answer: The clean prompt's answer (one token).
        wrong: The corrupted prompt's answer (one token).
    """

    name: str
    kind: str
    clean: str
    corrupted: str
    answer: str
    wrong: str

    @property
    def metric(self) -> tuple[str, str]:
        """``(answer, wrong)``, the ``metric=`` of `tl_linmap.methods.patching.attribution_patching` (a ``LogitDiff``)."""
        return (self.answer, self.wrong)


def prompt_pairs() -> list[PromptPair]:
    """The bundled clean/corrupted prompt pairs for activation patching (``pairs.json``).

    Returns:
        The pairs, in file order; each has equal token lengths on SmolLM2-135M-Instruct and
        one-token answers.

    Raises:
        FileNotFoundError: if this installation ships no ``pairs.json``.
    """
    return [PromptPair(**p) for p in read_data(PAIRS)["pairs"]]

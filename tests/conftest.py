"""Fixtures: tiny random-weight bridges of every supported family, in float64."""

import dataclasses
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a model hub

import pytest
import torch

from tl_linmap.load.toy import FAMILIES, toy_model


def _has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


# TransformerLens 4 has no HookedTransformer, 2.x no TransformerBridge: tests of a class the
# installed version lacks are not collected (not skipped); CI runs them in its TransformerLens
# 2.18 and 3.9 environments.
HOOKED = _has("transformer_lens", "HookedTransformer")
BRIDGE = _has("transformer_lens.model_bridge", "TransformerBridge")
collect_ignore = ([] if HOOKED else ["test_hooked.py"]) + ([] if HOOKED and BRIDGE else ["test_cross.py"])
# A bridge dispatched with disk offload boots in TransformerLens 4 (3.9 refuses disk targets).
if not (BRIDGE and "offload_folder" in inspect.signature(importlib.import_module("transformer_lens.model_bridge").TransformerBridge.boot_transformers).parameters):
    collect_ignore.append("test_devices.py")
# Likewise the splices of SAELens and circuit-tracer need those packages (CI's TransformerLens 2.18
# environment has them): where one is missing its test file is not collected (a skip would fail in CI).
collect_ignore += [f for f, pkg in (("test_saelens.py", "sae_lens"), ("test_replacement.py", "circuit_tracer"), ("test_ct_frontend.py", "circuit_tracer")) if importlib.util.find_spec(pkg) is None]

#: Where the README's set-up ran (CI sets CI=true), every test can run: a skip there is a failure.
NO_SKIPS = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped where the README's set-up should make it run (CI=true): {reason}"


PROMPT = "The cat sat on the mat, and then"  # crosses Gemma's sliding window of 4
ALL_FAMILIES = sorted(FAMILIES)
BIASED = {"gpt2", "pythia", "qwen2"}  # biases or learned positions: nonzero affine part


@pytest.fixture(scope="session")
def toy_models():
    """One float64 toy bridge per family, shared read-only across tests."""
    return {family: toy_model(family) for family in ALL_FAMILIES}


@pytest.fixture(params=ALL_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(toy_models, family):
    return toy_models[family]


@pytest.fixture
def fresh_llama():
    """A float32 bridge the test may put through anything (it is not shared)."""
    return toy_model("llama", dtype=torch.float32)


def _detach(act, hook=None):
    return act.detach()


def hand_freeze_hooks(model) -> list:
    """For the oracles of the feature tests: norm scales and attention patterns detached, a gated MLP's gate,
    or its pointwise activation as the ratio post/pre, written here (none of tl_linmap's rules)."""
    hooks = [(n, _detach) for n in model.hook_dict if n.endswith("hook_scale") or n.endswith("attn.hook_pattern")]
    gated = bool(getattr(model.cfg, "gated_mlp", False))
    for layer in range(model.cfg.n_layers):
        if gated:
            hooks.append((f"blocks.{layer}.mlp.hook_pre", _detach))
            continue
        live = {}

        def keep(pre, hook=None, live=live):
            live["pre"] = pre

        def ratio(post, hook=None, live=live):
            pre = live.pop("pre")
            return post.detach() + (pre - pre.detach()) * (post / pre).detach()

        hooks += [(f"blocks.{layer}.mlp.hook_pre", keep), (f"blocks.{layer}.mlp.hook_post", ratio)]
    return hooks


def assert_maps_by_convention(lm, bare, convention: str, tol: float = 1e-10) -> None:
    """For the feature tests: with a live error the maps are the bare model's; with a constant one or none, not."""
    gap = float((lm.operators - bare.operators).norm() / bare.operators.norm())
    if convention == "live":
        assert gap <= tol, f"live: the maps should be the model's own, differ by {gap:.1e}"
    else:
        assert gap > 1e-6, f"{convention}: the maps should not be the model's own"



def leaf_effects(logit, x, leaves: dict) -> dict:
    """For the feature tests' oracles: each leaf's direct effect on a logit computed with leaves (value times gradient).

    ``x`` is the embeddings' leaf, ``leaves`` per site ``(acts, error or None)``; the constant is what no leaf carries.
    """
    flat = [x] + [t for a, e in leaves.values() for t in (a, e) if t is not None]
    grads = torch.autograd.grad(logit, flat, allow_unused=True)  # an SAE on the residual stream cuts the embeddings off
    grads = {id(t): torch.zeros_like(t) if g is None else g for t, g in zip(flat, grads)}
    out = {"logit": logit.detach(), "tokens": (grads[id(x)] * x).sum(-1).detach(), "acts": {}, "maps": {}, "errors": {}}
    total = out["tokens"].sum()
    for site, (a, e) in leaves.items():
        out["acts"][site] = a.detach()[0]
        out["maps"][site] = grads[id(a)][0]
        total = total + (grads[id(a)] * a).sum()
        if e is not None:
            out["errors"][site] = (grads[id(e)] * e).sum(-1).detach()[0]
            total = total + out["errors"][site].sum()
    out["constant"] = out["logit"] - total.detach()
    return out


def assert_same(saved, loaded, path: str = "result") -> None:
    """For the saving tests: a loaded result equals the one saved in every dataclass field (so a field the
    file drops fails here), tensors bit for bit with their dtype, and a model it held is now a SavedModel of it."""
    from tl_linmap.base.saving import SavedModel, model_config

    if isinstance(loaded, SavedModel) and not isinstance(saved, SavedModel):
        assert loaded.config == model_config(saved), f"{path}: another model's config"
        assert all(saved.tokenizer.decode([i]) == text for i, text in loaded.strings.items()), f"{path}: token texts"
        if loaded.full:
            assert sorted(loaded.strings) == list(range(saved.cfg.d_vocab)), f"{path}: the whole vocabulary"
            for name in ("W_U", "W_E", "b_U"):
                weights = getattr(saved, name)  # a Parameter, saved as a tensor
                assert_same(None if weights is None else weights.detach(), getattr(loaded, name), f"{path}.{name}")
        return
    assert type(saved) is type(loaded), f"{path}: a {type(saved).__name__} saved, a {type(loaded).__name__} loaded"
    if isinstance(saved, torch.Tensor):
        assert saved.dtype == loaded.dtype and saved.shape == loaded.shape and torch.equal(saved.cpu(), loaded), f"{path}: tensors differ"
    elif isinstance(saved, SavedModel):
        assert (saved.config, saved.strings, saved.full) == (loaded.config, loaded.strings, loaded.full), path
    elif dataclasses.is_dataclass(saved):
        for f in dataclasses.fields(saved):
            if f.init:
                assert_same(getattr(saved, f.name), getattr(loaded, f.name), f"{path}.{f.name}")
    elif isinstance(saved, dict):
        assert list(saved) == list(loaded), f"{path}: keys differ"
        for key, value in saved.items():
            assert_same(value, loaded[key], f"{path}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(loaded), f"{path}: lengths differ"
        for i, (a, b) in enumerate(zip(saved, loaded)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(saved, float) and saved != saved:
        assert loaded != loaded, f"{path}: nan saved"
    else:
        assert saved == loaded, f"{path}: {saved!r} saved, {loaded!r} loaded"


#: What a peak-memory child starts with: `status(key)` reads /proc/self/status in bytes, `reset()` restarts the
#: high-water mark from what is resident now (`VmHWM - reset()` is then the peak a call adds).
_PEAK_PRELUDE = """
import re
from pathlib import Path

def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

def reset():
    Path("/proc/self/clear_refs").write_text("5")
    return status("VmRSS")
"""


def peak_memory_child(code: str, *args: str) -> list[float]:
    """Run ``code`` in a fresh Python (after `_PEAK_PRELUDE`) and read the numbers its last line prints.

    A fresh process, since in the suite's own, memory freed by earlier tests is still resident and a call
    reuses it without raising the high-water mark (CI once measured 0 bytes there). Skips where Linux's
    /proc cannot reset the mark (CI runs on Linux, where it must not skip).
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("peak resident memory is reset through Linux's /proc")
    run = subprocess.run([sys.executable, "-c", _PEAK_PRELUDE + code, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return [float(v) for v in run.stdout.strip().splitlines()[-1].split()]


"""Memory planning: one memory model, free memory on every operating system, a fallback where none is reported."""

from types import SimpleNamespace

import pytest
import torch

from tl_linmap.base import budget
from tl_linmap.base.errors import InputError, MemoryBudgetError

CPU = torch.device("cpu")
SMOLLM2 = SimpleNamespace(cfg=SimpleNamespace(d_model=576, d_mlp=1536))


def test_linux_reports_available_pages():
    import os

    if not hasattr(os, "sysconf") or "SC_AVPHYS_PAGES" not in os.sysconf_names:
        pytest.skip("not Linux")  # CI runs on Linux, where this must not skip
    expected = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(budget.available_bytes(CPU) - expected) < 2**30  # free memory moves a little between the two reads


def test_without_sysconf_names_it_falls_back(monkeypatch):
    """macOS has no SC_AVPHYS_PAGES: os.sysconf raises ValueError there."""

    def no_such_name(name):
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(budget.os, "sysconf", no_such_name)
    monkeypatch.setattr(budget, "_windows_available", lambda: None)
    monkeypatch.setattr(budget, "_macos_available", lambda: None)
    assert budget.available_bytes(CPU) == budget.FALLBACK_FREE_BYTES


def test_each_platform_probe_is_tried_in_turn(monkeypatch):
    monkeypatch.setattr(budget, "_linux_available", lambda: None)
    monkeypatch.setattr(budget, "_windows_available", lambda: 3 * 2**30)
    assert budget.available_bytes(CPU) == 3 * 2**30
    monkeypatch.setattr(budget, "_windows_available", lambda: None)
    monkeypatch.setattr(budget, "_macos_available", lambda: 5 * 2**30)
    assert budget.available_bytes(CPU) == 5 * 2**30


def test_probes_of_other_platforms_say_nothing_here():
    import sys

    if sys.platform != "win32":
        assert budget._windows_available() is None
    if sys.platform != "darwin":
        assert budget._macos_available() is None


def test_rows_fit_the_budget_and_a_risky_request_names_a_safe_one(monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2**30)
    per_row = 2**20
    fits = budget.fit_rows(per_row, 0, 10_000, None, CPU, "rows_per_pass")
    assert fits == int(2**30 * budget.MEMORY_FRACTION) // per_row  # the memory fraction, no more
    with pytest.raises(MemoryBudgetError, match=rf"rows_per_pass={fits + 1} risks.*use rows_per_pass={fits} or less"):
        budget.fit_rows(per_row, 0, 10_000, fits + 1, CPU, "rows_per_pass")
    with pytest.raises(MemoryBudgetError, match="The results need"):
        budget.fit_rows(per_row, 2**30, 10_000, None, CPU, "rows_per_pass")


def test_default_rows_are_wide_enough_not_all_rows(monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2**40)
    assert budget.plan_rows(SMOLLM2, 16, 576, 1, torch.float64, 576, CPU) == 576  # the user's choice stands
    assert budget.plan_rows(SMOLLM2, 16, 576, 1, torch.float64, None, CPU) == budget.ROW_POSITIONS // 16
    assert budget.plan_rows(SMOLLM2, 4, 64, 1, torch.float64, None, CPU) == 64  # every row
    assert budget.plan_rows(SMOLLM2, 1000, 576, 1, torch.float64, None, CPU) == 32


def test_tokens_per_pass_make_at_most_eight_windows_of_at_least_32(monkeypatch):
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2**40)
    assert budget.plan_tokens(SMOLLM2, 16, 15, torch.float64, None, CPU) == 16  # one window: every token
    assert budget.plan_tokens(SMOLLM2, 256, 255, torch.float64, None, CPU) == 32  # 8 windows
    assert budget.plan_tokens(SMOLLM2, 1024, 1023, torch.float64, None, CPU) == 128  # 8 windows
    assert budget.plan_tokens(SMOLLM2, 1024, 1023, torch.float64, 5, CPU) == 5
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2 * 2**30)  # ~130 MiB per row of 1024 tokens
    with pytest.raises(MemoryBudgetError, match="tokens_per_pass=64 risks.*use tokens_per_pass=8 or less"):
        budget.plan_tokens(SMOLLM2, 1024, 1023, torch.float64, 64, CPU)


def test_auto_route_rule():
    d, layers, n = 576, 30, 16
    residual = [(d, layer + 1) for layer in range(layers) for _ in ("mid", "post")]
    assert budget.choose_route(d, n, n - 1, residual) == "columns"  # every layer's residual stream
    assert budget.choose_route(d, n, n - 1, [(d, layers)]) == "rows"  # only the output
    assert budget.choose_route(d, 512, 511, residual) == "rows"  # a long prompt
    assert budget.choose_route(d, 512, 3, residual) == "columns"  # ... read early: short windows
    eight = [(d, layer + 1) for layer in range(8) for _ in ("mid", "post")]
    assert budget.choose_route(d, n, n - 1, eight) == "columns"  # 1088 vs 1152 rows·positions·layers per d
    assert budget.choose_route(d, n, n - 1, eight, forward_cost=1.6) == "rows"  # forward rows cost more


def test_forward_row_cost():
    llama = SimpleNamespace(n_heads=9, d_head=64, n_key_value_heads=3, d_mlp=1536, gated_mlp=True, d_model=576)
    gpt2 = SimpleNamespace(n_heads=12, d_head=64, n_key_value_heads=None, d_mlp=3072, gated_mlp=False, d_model=768)
    assert budget.forward_row_cost(llama) == pytest.approx(1.6)  # + Q, K and the gate
    assert budget.forward_row_cost(gpt2) == pytest.approx(1.2)  # + Q and K


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("512 MiB", 2**29), ("1.5g", 1_500_000_000), (4096, 4096)])
def test_memory_sizes_read_as_bytes(text, size):
    assert budget.parse_memory(text) == size


@pytest.mark.parametrize("bad", ["lots", "2 GBs", 0, -5, 1.5, True, None])
def test_a_memory_that_is_no_size_says_what_to_pass(bad):
    with pytest.raises(InputError, match='"2GB"'):
        budget.parse_memory(bad)


def test_the_default_memory_is_a_share_of_the_free_memory_capped():
    assert 0 < budget.memory_budget(None, CPU) <= budget.DEFAULT_MEMORY
    assert budget.memory_budget("1MB", CPU) == 10**6

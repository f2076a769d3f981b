"""Attribution graphs: time, peak memory and size of tl_linmap.attribution_graph, and circuit-tracer beside it.

What: `tl_linmap.attribution_graph` on SmolLM2-135M (the bundled GGUF, float64 working dtype) with
  A. every attention head (hook_z) and MLP output per position as nodes (modules=True), 16 and 128 tokens,
     max_nodes 64 and 256 (16 tokens: all nodes too, where estimated under 3 minutes);
  B. the bundled TopK SAE (smollm2-resid15, k 32, d_sae 4096) as nodes, 16 tokens with every feature,
     128 tokens with max_nodes 256 and 1024;
  C. circuit-tracer's `attribute` against tl_linmap on one ReplacementModel (TransformerLens 2.18 env):
     SmolLM2 as a HookedTransformer in float64 with random TopK single-layer transcoders (d_transcoder 2048,
     k 16, every layer, no skip), 16 and 128 tokens, max_feature_nodes = max_nodes = 256, batch_size =
     rows_per_pass = 64 (circuit-tracer with update_interval=1 so that it re-ranks after every batch as
     tl_linmap does and both keep the same nodes), and circuit-tracer's defaults (batch 512, update_interval 4)
     for information. At 16 tokens tl_linmap's `to_circuit_tracer()` adjacency is compared with
     circuit-tracer's on the rows and columns both graphs hold (every row would take ~10 min here).
How: each configuration in a fresh subprocess: load the model (C: build the ReplacementModel), note the RSS,
reset the peak-RSS mark (/proc/self/clear_refs, so that load-time peaks do not hide the call's), one warm-up
call on a 4-token prompt, then the timed call; peak = ru_maxrss after it (reported whole and minus the RSS
after loading). Prompts: a fixed English paragraph, repeated, tokenized with model.to_tokens after a BOS
token, cut to the length. One run per configuration. The tl_linmap stages are timed by wrapping
tl_linmap.linear.graph's functions (targets' gradients `held_pass`, rows `_rows_of`, ranking
`partial_influence`). Section D fits time and memory against rows kept and prompt length.
Usage: python benchmarks/graphs.py [--only A1,B2,...] [--table] [--write]   (C rows run in .venv-tl2; results are
cached in --json, so configurations can be run in parts; --write rewrites the results file: its hand-written notes too)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TL2 = ROOT / ".venv-tl2" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results" / "graphs-2026-12-07.md"
CT_FILE = Path("/tmp/tl_linmap_bench_graphs_ct16.pt")  # circuit-tracer's 16-token graph, for the comparison

TEXT = ("The history of the city is long and full of surprising turns, from its founding by traders on the river "
        "to its growth as a centre of learning, where scholars from distant lands came to study law and medicine. ")

# name: (suite, route, tokens, max_nodes, batch, extra); route: modules | sae | ct | tlct
CONFIGS = {
    "A1": ("A", "modules", 16, 64, 64, {}),
    "A2": ("A", "modules", 16, 256, 64, {}),
    "A3": ("A", "modules", 16, None, 64, {}),
    "A4": ("A", "modules", 128, 64, 64, {}),
    "A5": ("A", "modules", 128, 256, 64, {}),
    "B1": ("B", "sae", 16, None, 64, {}),
    "B2": ("B", "sae", 128, 256, 64, {}),
    "B3": ("B", "sae", 128, 1024, 64, {}),
    "C1": ("C", "ct", 16, 256, 64, {"update_interval": 1}),
    "C2": ("C", "tlct", 16, 256, 64, {}),
    "C3": ("C", "ct", 128, 256, 64, {"update_interval": 1}),
    "C4": ("C", "tlct", 128, 256, 64, {}),
    "C5": ("C", "ct", 16, 256, 512, {}),
    "C6": ("C", "ct", 128, 256, 512, {}),
}
# Estimated, not run (see the estimate printed with the table).
SKIPPED = {
    "A3": "est. 3–6 min (75 passes of 64 rows at 2.5–4.8 s, 16 tokens; table 0.19 GiB), over the 3-min limit",
    "B3": "est. 2.5 min (17 passes at ~8 s, B2's rate); not run for time",
    "C5": "time budget",
    "C6": "batch 512 scales the per-batch gradient buffers 8× (C3 +4.8 GiB at 64); would not fit 24 GiB",
}


# ---------------------------------------------------------------- worker (one configuration, fresh process)

def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _tokens(model, n: int):
    import torch

    bos = model.tokenizer.bos_token_id
    ids = model.to_tokens(TEXT * 12, prepend_bos=False)[0]
    return torch.cat([torch.tensor([bos]), ids])[:n]


def _stage_timers():
    """Wrap tl_linmap.linear.graph's stages; returns the dict of accumulated seconds and calls."""
    import tl_linmap.linear.graph as G

    spent = {}

    def wrap(name):
        fn = getattr(G, name)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                s, c = spent.get(name, (0.0, 0))
                spent[name] = (s + time.perf_counter() - start, c + 1)

        setattr(G, name, timed)

    for name in ("held_pass", "_rows_of", "partial_influence", "node_forward", "_reference", "_assemble"):
        wrap(name)
    groups = G._groups

    def counted(*a, **k):  # every node of the node pass, the inner ones (features, heads, MLPs) apart
        out = groups(*a, **k)
        spent["inner_all"] = sum(len(g.index) for g in out if g.kind in ("feature", "head", "mlp"))
        return out

    G._groups = counted
    return spent


def _replacement_model(d_tc: int = 2048, k: int = 16, seed: int = 0):
    """SmolLM2 as circuit-tracer's TransformerLens ReplacementModel, float64, random TopK transcoders (no download)."""
    import torch
    from circuit_tracer import ReplacementModel
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import TopK

    import tl_linmap

    dt = torch.float64
    hooked = tl_linmap.load_model("smollm2", kind="hooked", dtype=dt)
    cfg, d = hooked.cfg, hooked.cfg.d_model
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in range(cfg.n_layers):
        tc = SingleLayerTranscoder(d, d_tc, TopK(k), layer, skip_connection=False, device=torch.device("cpu"), dtype=dt)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d_tc, d, generator=g, dtype=dt) / d**0.5)
            tc.W_dec.copy_(torch.randn(d_tc, d, generator=g, dtype=dt) / d_tc**0.5)
            tc.b_enc.zero_()
            tc.b_dec.zero_()
        transcoders[layer] = tc
    ts = TranscoderSet(transcoders, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="random-topk")
    model = ReplacementModel.from_config(cfg, ts, tokenizer=hooked.tokenizer)
    state = {k.replace("mlp.", "mlp.old_mlp.", 1) if ".mlp." in k else k.replace("unembed.", "unembed.old_unembed.", 1): v
             for k, v in hooked.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("transcoders.") or k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing), missing
    model.tokenizer = hooked.tokenizer
    model.eval()
    del hooked
    return model


def _ct_attribute(model, tokens, max_nodes, batch, update_interval):
    import torch
    from circuit_tracer import attribute

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # circuit-tracer allocates its adjacency in the default dtype
    try:
        return attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=batch,
                         max_feature_nodes=max_nodes, update_interval=update_interval, verbose=False)
    finally:
        torch.set_default_dtype(previous)


def _compare(mine, path: Path) -> dict:
    """tl_linmap's to_circuit_tracer() graph against circuit-tracer's saved one, on the nodes both hold."""
    import torch

    ct = torch.load(path)

    def keys(active, n_layers, n_pos, n_logits):
        out = [("f", *row) for row in active.tolist()]
        out += [("e", layer, p) for layer in range(n_layers) for p in range(n_pos)] + [("t", p) for p in range(n_pos)]
        return out + [("l", j) for j in range(n_logits)]

    n_layers, n_pos = int(mine.cfg.n_layers), len(mine.input_tokens)
    a = keys(mine.active_features[mine.selected_features], n_layers, n_pos, len(mine.logit_token_ids))
    b = keys(ct["active"][ct["selected"]], n_layers, n_pos, len(ct["logit_ids"]))
    ib = {key: i for i, key in enumerate(b)}
    common = [(i, ib[key]) for i, key in enumerate(a) if key in ib]
    ia = torch.tensor([i for i, _ in common])
    jb = torch.tensor([j for _, j in common])
    A, B = mine.adjacency_matrix[ia][:, ia], ct["adjacency"][jb][:, jb]
    same_logits = torch.equal(mine.logit_token_ids.cpu(), ct["logit_ids"])
    n_feat_a = len(mine.selected_features)
    n_common_feat = sum(1 for key in a[:n_feat_a] if key in ib)
    return {"max_diff": float((A - B).abs().max()), "scale": float(B.abs().max()), "common_features": n_common_feat,
            "tl_features": n_feat_a, "ct_features": len(ct["selected"]), "same_logits": same_logits}


def worker(name: str) -> dict:
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import tl_linmap

    suite, route, n_tokens, max_nodes, batch, extra = CONFIGS[name]
    if route in ("ct", "tlct"):
        model = _replacement_model()
        dictionaries = ()
    else:
        model = tl_linmap.load_model("smollm2")
        dictionaries = [tl_linmap.load_sae("smollm2-resid15")] if route == "sae" else ()
    gc.collect()
    rss_load = _rss_gib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here on
    tokens = _tokens(model, n_tokens)
    short = tokens[:4]
    out = {"name": name, "suite": suite, "route": route, "tokens": len(tokens), "max_nodes": max_nodes, "batch": batch,
           "rss_load": rss_load, "threads": torch.get_num_threads(), "load1": os.getloadavg()[0]}
    if route == "ct":
        ui = extra.get("update_interval", 4)
        _ct_attribute(model, short, 8, batch, ui)  # warm-up
        start, cpu = time.perf_counter(), _cpu_s()
        graph = _ct_attribute(model, tokens, max_nodes, batch, ui)
        out["seconds"], out["cpu"] = time.perf_counter() - start, _cpu_s() - cpu
        out["peak"] = _peak_gib()
        out["load1_end"] = os.getloadavg()[0]
        out["update_interval"] = ui
        n_sel = len(graph.selected_features)
        out["rows"] = n_sel + len(graph.logit_token_ids)
        out["nodes_kept"] = graph.adjacency_matrix.shape[0]
        out["nodes_all"] = len(graph.active_features) + (model.cfg.n_layers + 1) * len(tokens) + len(graph.logit_token_ids)
        out["active_features"] = len(graph.active_features)
        if n_tokens == 16 and batch == 64:
            torch.save({"adjacency": graph.adjacency_matrix.cpu(), "active": graph.active_features.cpu(),
                        "selected": graph.selected_features.cpu(), "logit_ids": graph.logit_token_ids.cpu()}, CT_FILE)
        return out
    spent = _stage_timers()
    kw = {"dictionaries": dictionaries, "rows_per_pass": batch, "max_logits": 10}
    tl_linmap.attribution_graph(model, short, max_nodes=8, **kw)  # warm-up
    spent.clear()
    start, cpu = time.perf_counter(), _cpu_s()
    graph = tl_linmap.attribution_graph(model, tokens, max_nodes=max_nodes, **kw)
    out["seconds"], out["cpu"] = time.perf_counter() - start, _cpu_s() - cpu
    out["peak"] = _peak_gib()
    out["load1_end"] = os.getloadavg()[0]
    inner_all = spent.pop("inner_all")
    out["stages"] = dict(spent)
    kinds = ("feature", "head", "mlp")
    inner_rows = int((graph.has_row & graph.kind_mask(*kinds)).sum())
    out["targets"] = len(graph.targets)
    out["rows"] = inner_rows + len(graph.targets)
    out["nodes_kept"] = len(graph)
    # every node of the node pass (up to the target position): kept ones plus the inner ones left out
    out["nodes_all"] = inner_all + int((~graph.kind_mask(*kinds)).sum())
    out["inner_all"] = inner_all
    out["relative_error"] = graph.relative_error()
    if route == "tlct":
        mine = graph.to_circuit_tracer(dtype=torch.float64)
        if n_tokens == 16 and CT_FILE.exists():
            out["compare"] = _compare(mine, CT_FILE)
    return out


# ---------------------------------------------------------------- orchestrator (no torch here)

def run(name: str) -> dict:
    route = CONFIGS[name][1]
    python = str(TL2) if route in ("ct", "tlct") else sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([python, __file__, "--worker", name], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"name": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(line[-1][7:])


def fmt_nodes(m):
    return "all" if m is None else str(m)


def table(results: dict) -> list[str]:
    rows = [("| id | route | tokens | max nodes | rows/pass | rows computed | nodes kept / all | s | CPU s | load | peak RSS GiB | "
             "peak − loaded GiB | held pass s | row passes s (n) | ranking s |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    route_names = {"modules": "A: SmolLM2 heads+MLP", "sae": "B: SmolLM2 + SAE", "ct": "C: circuit-tracer attribute",
                   "tlct": "C: tl_linmap on ReplacementModel"}
    for name, (suite, route, n, m, batch, extra) in CONFIGS.items():
        r = results.get(name)
        label = route_names[route] + (f" (update_interval {extra.get('update_interval', 4)})" if route == "ct" else "")
        if r is None:
            continue
        if "skipped" in r:
            rows.append(f"| {name} | {label} | {n} | {fmt_nodes(m)} | {batch} | | | not run: {r['skipped']} | | | | | | | |")
            continue
        if "error" in r:
            rows.append(f"| {name} | {label} | {n} | {fmt_nodes(m)} | {batch} | | | failed: {r['error']} | | | | | | | |")
            continue
        st = r.get("stages", {})
        held = f"{st['held_pass'][0]:.1f}" if "held_pass" in st else ""
        passes = f"{st['_rows_of'][0]:.1f} ({st['_rows_of'][1]})" if "_rows_of" in st else ""
        rank = f"{st['partial_influence'][0]:.1f}" if "partial_influence" in st else ""
        rows.append(f"| {name} | {label} | {r['tokens']} | {fmt_nodes(m)} | {batch} | {r['rows']} | {r['nodes_kept']} / {r['nodes_all']} | "
                    f"{r['seconds']:.1f} | {r.get('cpu', float('nan')):.1f} | {r['load1']:.1f}–{r.get('load1_end', float('nan')):.1f} | {r['peak']:.2f} | {r['peak'] - r['rss_load']:.2f} | {held} | {passes} | {rank} |")
    return rows


def ratios(results: dict) -> list[str]:
    out = ["| tokens | circuit-tracer batch | time ratio (ct / tl_linmap) | peak-RSS ratio (ct / tl_linmap) | Δ-RSS ratio (ct / tl_linmap) |",
           "|---|---|---|---|---|"]
    for ct_name, tl_name in (("C1", "C2"), ("C5", "C2"), ("C3", "C4"), ("C6", "C4")):
        a, b = results.get(ct_name), results.get(tl_name)
        if not a or not b or "seconds" not in a or "seconds" not in b:
            continue
        da, db = a["peak"] - a["rss_load"], b["peak"] - b["rss_load"]
        out.append(f"| {a['tokens']} | {a['batch']} (update_interval {a['update_interval']}) | {a['seconds'] / b['seconds']:.2f} | "
                   f"{a['peak'] / b['peak']:.2f} | {da / db:.2f} |")
    c = (results.get("C2") or {}).get("compare")
    if c:
        out += ["", (f"Adjacency check (16 tokens, 256 nodes, batch 64): tl_linmap's to_circuit_tracer() against circuit-tracer's on the "
                    f"{c['common_features']} features both kept (tl_linmap kept {c['tl_features']} after position 0, circuit-tracer "
                    f"{c['ct_features']}), every error, token and logit: max |difference| {c['max_diff']:.1e} (largest entry "
                    f"{c['scale']:.1f}); same logit targets: {c['same_logits']}.")]
    return out


def growth(results: dict) -> list[str]:
    out = []
    for suite in ("A", "B", "C"):
        ok = [r for r in results.values() if r.get("suite") == suite and "stages" in r]
        for r in ok:
            st = r["stages"]
            t_rows, n_pass = st.get("_rows_of", (0.0, 0))
            per_row = t_rows / max(r["rows"], 1)
            table_gib = r["rows"] * r["nodes_all"] * 8 / 2**30
            out.append(f"- {r['name']} ({suite}, {r['tokens']} tokens, {r['rows']} rows): {t_rows / max(n_pass, 1):.2f} s per reverse pass, "
                       f"{1000 * per_row:.0f} ms per row; rest of the call {r['seconds'] - t_rows:.1f} s; rows' table "
                       f"{table_gib:.3f} GiB vs peak − loaded {r['peak'] - r['rss_load']:.2f} GiB")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated configuration ids (default: all that are not estimated)")
    parser.add_argument("--table", action="store_true", help="run nothing: print the table of the cached results")
    parser.add_argument("--json", default="/tmp/tl_linmap_bench_graphs.json", help="results cache (kept between runs)")
    parser.add_argument("--write", action="store_true", help=f"write the table to {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker)), flush=True)
        return
    cache = Path(args.json)
    results = json.loads(cache.read_text()) if cache.exists() else {}
    names = [] if args.table else args.only.split(",") if args.only else [n for n in CONFIGS if n not in SKIPPED]
    for name in names:
        print(f"running {name} {CONFIGS[name]} ...", file=sys.stderr, flush=True)
        results[name] = run(name)
        print(f"  {results[name]}", file=sys.stderr, flush=True)
        cache.write_text(json.dumps(results))
    for name, why in SKIPPED.items():
        results.setdefault(name, {"skipped": why})
    lines = [*table(results), "", *ratios(results), "", *growth(results)]
    print("\n".join(lines))
    if args.write:
        head = ["# benchmarks/graphs.py, 2026-12-07 (one run per configuration, 2 CPU cores, no GPU, CPU shared with other jobs: see load)",
                "", ("Columns: rows computed (targets + nodes); nodes kept / all nodes of the node pass; s = the graph call "
                     "(after a warm-up call); load = 1-min load average before–after; peak RSS = ru_maxrss (mark reset after "
                     "loading); held pass / row passes / ranking = tl_linmap stages (s). C: same float64 ReplacementModel."), ""]
        RESULTS.write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()

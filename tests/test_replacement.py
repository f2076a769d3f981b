# Runs in the TransformerLens 2.18 environment only (circuit-tracer needs a HookedTransformer):
#     .venv-tl2/bin/python -m pytest tests/test_replacement.py -q
# conftest.py does not collect it where circuit_tracer is not installed.
"""circuit-tracer's ReplacementModel: tl_linmap's feature contributions against circuit-tracer's graph.

Tiny random models (a GPT-2-like one: LayerNorm, learned positions, GELU MLP; a Llama-like one:
RMSNorm, rotary, grouped-query attention, gated SiLU MLP), each with random single-layer
transcoders (ReLU without skip; JumpReLU with skip; TopK with skip), all in float64 and built
from configs (no download). ``circuit_tracer.attribute`` gives the graph; for each of its logit
targets, `tl_linmap.feature_contributions` with a readout equal to circuit-tracer's logit node
(the demeaned logit ``(W_U[:, t] - W_U.mean(-1)) · ln_final(x)``, ``b_U`` left out) must give the
same active features and activations, and each feature's, error's and token's direct effect must
equal the logit row's adjacency entry, to 1e-10.

How the two differ (documented here, checked only as arithmetic in `test_matches_circuit_tracer_graph`):
circuit-tracer has no nodes at position 0 (BOS): it drops that position's features, and its error
nodes there are zero, so the logit row sums, with its constant, to the demeaned logit only when the
constant takes in position 0's feature and error terms. tl_linmap keeps position 0's features and
error as nodes of their own, so

    circuit-tracer's constant = tl_linmap's constant + Σ features at pos 0 + Σ errors at pos 0,

with tl_linmap's constant holding only what no node carries (b_dec, the biases, learned positions,
the final norm's bias). A `LogitCombination` over the whole vocabulary gives the same direct effects
and a constant larger by the demeaned ``b_U[t]`` (circuit-tracer's logit node ignores ``b_U``).
Token nodes agree at every position, position 0 included.
"""

import contextlib
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_linmap

DT = torch.float64
TOL = 1e-10
BOS = 1
TOKENS = torch.tensor([BOS, 7, 3, 9, 4, 12])  # circuit-tracer keeps a prompt that starts with a special id as is
N_LOGITS = 3


class StubTokenizer:
    """Just what ``circuit_tracer.attribute`` reads of a tokenizer on token ids (no download)."""

    def __init__(self, vocab_size: int, bos_token_id: int = BOS):
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.pad_token_id = None
        self.eos_token_id = None
        self.all_special_ids = [bos_token_id]
        self.padding_side = "right"

    def decode(self, ids, **kw):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, int):
            return f"<{ids}>"
        return "".join(f"<{i}>" for i in ids)

    def encode(self, s, add_special_tokens=False):
        return [int(t) for t in s.replace(">", " ").replace("<", " ").split()]


def gpt2_cfg() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=32, d_head=8, n_heads=2, d_mlp=64, d_vocab=50, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="standard", dtype=DT, device="cpu", seed=0,
    )


def llama_cfg() -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=32, d_head=8, n_heads=2, d_mlp=32, d_vocab=50, act_fn="silu", gated_mlp=True,
        normalization_type="RMS", final_rms=True, positional_embedding_type="rotary", rotary_dim=8,
        n_key_value_heads=1, dtype=DT, device="cpu", seed=0,
    )


CONFIGS = {"gpt2": gpt2_cfg, "llama": llama_cfg}
TRANSCODERS = {
    "relu": ("relu", False), "jumprelu_skip": ("jumprelu", True), "topk_skip": ("topk", True),
    # Cross-layer transcoders: each layer's features write that layer's and every later layer's MLP output.
    "clt_relu": ("clt_relu", False), "clt_jumprelu_skip": ("clt_jump_relu", True),
}


def transcoder_set(cfg, act: str, skip: bool, d_tc: int = 32, seed: int = 0) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    transcoders = {}
    for layer in range(cfg.n_layers):
        fn = {"relu": lambda: F.relu, "jumprelu": lambda: JumpReLU(torch.full((d_tc,), 0.05, dtype=DT), bandwidth=0.1), "topk": lambda: TopK(4)}[act]()
        # SingleLayerTranscoder's default dtype is bfloat16.
        tc = SingleLayerTranscoder(cfg.d_model, d_tc, fn, layer, skip_connection=skip, device=torch.device("cpu"), dtype=DT)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d_tc, cfg.d_model, generator=g, dtype=DT) * 0.5)
            tc.W_dec.copy_(torch.randn(d_tc, cfg.d_model, generator=g, dtype=DT) * 0.5)
            tc.b_enc.copy_(torch.randn(d_tc, generator=g, dtype=DT) * 0.1)
            tc.b_dec.copy_(torch.randn(cfg.d_model, generator=g, dtype=DT) * 0.1)
            if skip:
                tc.W_skip.copy_(torch.randn(cfg.d_model, cfg.d_model, generator=g, dtype=DT) * 0.2)
        transcoders[layer] = tc
    return TranscoderSet(transcoders, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out", scan="random")


def cross_layer_transcoder(cfg, act: str = "relu", skip: bool = False, d_tc: int = 16, seed: int = 0) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(
        cfg.n_layers, d_tc, cfg.d_model, activation_function=act, skip_connection=skip, lazy_decoder=False,
        lazy_encoder=False, feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out", scan="random-clt",
        device=torch.device("cpu"), dtype=DT,
    )
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
        if act == "jump_relu":  # some features above threshold, some below
            clt.activation_function.threshold.fill_(0.05)
    return clt


def build(cfg, transcoders, seed: int = 0) -> ReplacementModel:
    model = ReplacementModel.from_config(cfg, transcoders)  # TransformerLens backend
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every model parameter random (biases and norm weights too); transcoders as built
        for name, p in model.named_parameters():
            if name.startswith("transcoders."):
                continue
            if name.endswith(".w"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.tokenizer = StubTokenizer(cfg.d_vocab)
    return model


def plain_twin(model) -> HookedTransformer:
    """A plain HookedTransformer with the ReplacementModel's weights (its wrapped MLP and unembed renamed back)."""
    plain = HookedTransformer(model.cfg)
    state = {
        k.replace("mlp.old_mlp.", "mlp.").replace("unembed.old_unembed.", "unembed."): v
        for k, v in model.state_dict().items()
        if not k.startswith("transcoders.")
    }
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing), missing
    return plain


def snapshot(model) -> dict:
    """Everything a tl_linmap call must leave as it was: tensors bit for bit, hooks by identity, modes."""
    hooks = {}
    for name, module in model.named_modules():
        hooks[name] = tuple(
            tuple(d.items())
            for d in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, getattr(module, "_backward_pre_hooks", {}))
        )
        if hasattr(module, "fwd_hooks"):  # a HookPoint's LensHandles, circuit-tracer's permanent ones included
            hooks[name] += (
                tuple((id(h.hook), h.is_permanent, h.context_level) for h in module.fwd_hooks),
                tuple((id(h.hook), h.is_permanent, h.context_level) for h in module.bwd_hooks),
            )
    return {
        "parameters": {k: (v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "hooks": hooks,
        "permanent": sum(h.is_permanent for m in model.hook_dict.values() for h in m.fwd_hooks + m.bwd_hooks),
        "training": tuple(m.training for m in model.modules()),
        "default_dtype": torch.get_default_dtype(),
        "grad": torch.is_grad_enabled(),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["parameters"].keys() == before["parameters"].keys()
    for k, (v, grad) in before["parameters"].items():
        w, grad2 = after["parameters"][k]
        assert grad == grad2 and v.dtype == w.dtype and torch.equal(v, w), k
    assert after["buffers"].keys() == before["buffers"].keys()
    for k, v in before["buffers"].items():
        assert v.dtype == after["buffers"][k].dtype and torch.equal(v, after["buffers"][k]), k
    assert after["hooks"] == before["hooks"]
    assert after["permanent"] == before["permanent"] > 0
    assert after["training"] == before["training"]
    assert after["default_dtype"] == before["default_dtype"] and after["grad"] == before["grad"]


def logit_readout(model, t: int) -> tl_linmap.Direction:
    """circuit-tracer's logit node for token t: ``(W_U[:, t] - W_U.mean(-1)) · ln_final(x)``, ``b_U`` left out.

    It is read at ``ln_final.hook_normalized``, the hook ln_final's output goes to in TransformerLens 2.18:
    after LayerNorm's weight and bias (``x * w + b``), but before RMSNorm's weight (``x / scale``, then ``* w``).
    """
    W_U = model.W_U.detach()
    u = W_U[:, t] - W_U.mean(-1)
    if model.cfg.normalization_type.startswith("RMS"):
        u = model.ln_final.w.detach() * u
    return tl_linmap.Direction("ln_final.hook_normalized", u, label=f"demeaned logit {t}")


@pytest.fixture(scope="module", params=[(c, t) for c in CONFIGS for t in TRANSCODERS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    name, kind = request.param
    cfg = CONFIGS[name]()
    act, skip = TRANSCODERS[kind]
    transcoders = cross_layer_transcoder(cfg, act.removeprefix("clt_"), skip) if act.startswith("clt_") else transcoder_set(cfg, act, skip)
    model = build(cfg, transcoders)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DT)  # circuit-tracer builds its adjacency matrix in the default dtype
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = attribute(TOKENS, model, batch_size=256, max_n_logits=N_LOGITS, max_feature_nodes=100_000, verbose=False)
    finally:
        torch.set_default_dtype(previous)
    yield model, graph
    del graph, model


def test_matches_circuit_tracer_graph(case):
    model, graph = case
    before = snapshot(model)
    L, n_pos = model.cfg.n_layers, len(TOKENS)
    A = graph.adjacency_matrix
    assert A.dtype == DT and torch.equal(graph.input_tokens.cpu(), TOKENS)
    af = graph.active_features.cpu()
    n_feat = len(graph.selected_features)
    assert n_feat == len(af) and torch.equal(graph.selected_features.cpu(), torch.arange(n_feat))  # every feature kept
    assert (af[:, 1] > 0).all()  # circuit-tracer has none at BOS
    ids = graph.logit_token_ids.cpu().tolist()
    assert len(ids) == N_LOGITS and A.shape[0] == n_feat + (L + 1) * n_pos + N_LOGITS
    err_col = lambda layer, pos: n_feat + layer * n_pos + pos
    tok_col = lambda pos: n_feat + L * n_pos + pos
    ct_key = {tuple(k): i for i, k in enumerate(af.tolist())}

    for j, t in enumerate(ids):
        row = A[n_feat + (L + 1) * n_pos + j]
        fc = tl_linmap.feature_contributions(model, TOKENS, target=logit_readout(model, t))
        assert_unchanged(model, before)
        assert fc.convention == "constant" and fc.sites == tuple(f"blocks.{layer}.{model.original_feature_output_hook}" for layer in range(L))
        assert fc.values.shape[1] == 1 and fc.errors.shape == (L, n_pos, 1) and fc.tokens.shape == (n_pos, 1)

        # (a) the same active features after BOS, with the same activations
        later = fc.features[:, 1] > 0
        assert not later.all()  # tl_linmap keeps BOS's features as nodes
        ours = {tuple(k): i for i, k in enumerate(fc.features.tolist()) if k[1] > 0}
        assert ours.keys() == ct_key.keys()
        order = torch.tensor([ours[k] for k in ct_key])
        assert (fc.activations[order] - graph.activation_values.cpu()).abs().max() < TOL
        # (b) each feature's direct effect is the logit row's entry
        assert (fc.values[order, 0] - row[:n_feat]).abs().max() < TOL
        # (c) error nodes after BOS (circuit-tracer's are zero at BOS)
        for layer in range(L):
            assert row[err_col(layer, 0)] == 0
            for pos in range(1, n_pos):
                assert abs(fc.errors[layer, pos, 0] - row[err_col(layer, pos)]) < TOL
        # (d) token nodes, BOS included
        assert (fc.tokens[:, 0] - row[tok_col(0) : tok_col(n_pos)]).abs().max() < TOL
        # the logit columns are empty; what circuit-tracer leaves out at BOS is in its constant
        assert (row[n_feat + (L + 1) * n_pos :] == 0).all()
        at_bos = fc.values[~later, 0].sum() + fc.errors[:, 0, 0].sum()
        assert abs(row.sum() + at_bos + fc.constant[0] - fc.output[0]) < TOL
        logits = model(TOKENS)[0, -1]
        assert abs(fc.output[0] - (logits[t] - logits.mean() - (model.b_U[t] - model.b_U.mean()))) < TOL

        if j == 0:  # the same readout as logits over the whole vocabulary: same nodes, constant + demeaned b_U[t]
            V = model.cfg.d_vocab
            combo = tl_linmap.LogitCombination({v: (1.0 if v == t else 0.0) - 1.0 / V for v in range(V)})
            fl = tl_linmap.feature_contributions(model, TOKENS, target=combo)
            assert_unchanged(model, before)
            assert torch.equal(fl.features, fc.features)
            for a, b in ((fl.values, fc.values), (fl.errors, fc.errors), (fl.tokens, fc.tokens), (fl.activations, fc.activations)):
                assert (a - b).abs().max() < TOL
            assert abs(fl.constant[0] - fc.constant[0] - (model.b_U[t] - model.b_U.mean())) < TOL
            assert abs(fl.output[0] - (logits[t] - logits.mean())) < TOL


def test_linear_map(case):
    """``linear_map`` is exact on the ReplacementModel under both error conventions; live, it is the plain model's."""
    model, _ = case
    before = snapshot(model)
    maps = {}
    maps["default"] = tl_linmap.linear_map(model, TOKENS, target="output")  # the model's own convention: constant
    assert_unchanged(model, before)
    for convention in ("constant", "live"):
        with tl_linmap.spliced(model, error=convention):
            maps[convention] = tl_linmap.linear_map(model, TOKENS, target="output")
        assert_unchanged(model, before)
    plain = plain_twin(model)
    reference = tl_linmap.linear_map(plain, TOKENS, target="output")
    with torch.no_grad():  # the same forward (circuit-tracer's skip hook adds s - s.detach(): equal to rounding)
        assert (plain(TOKENS) - model(TOKENS)).abs().max() < TOL
    for name, m in maps.items():
        assert m.operators.dtype == DT
        assert (m.contributions().sum(0) + m.bias - m.output).abs().max() < TOL, name
        assert (m.output - reference.output).abs().max() < TOL, name
    assert (maps["default"].operators - maps["constant"].operators).abs().max() < TOL
    assert (maps["default"].bias - maps["constant"].bias).abs().max() < TOL
    assert (maps["live"].operators - reference.operators).abs().max() < TOL
    assert (maps["live"].bias - reference.bias).abs().max() < TOL
    # the constant error cuts the MLPs' paths that the transcoders do not carry
    assert (maps["constant"].operators - reference.operators).abs().max() > 1e-3


# --- Attribution graphs --------------------------------------------------------------------------------


@contextlib.contextmanager
def _float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DT)  # circuit-tracer's pruning allocates its weights in the default dtype
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _ct_columns(graph: tl_linmap.Graph, ct) -> torch.Tensor:
    """Per node of a tl_linmap graph without position-0 features, its index in circuit-tracer's node order."""
    kinds = tl_linmap.results.graph.KINDS
    L, n_pos = ct.cfg.n_layers, ct.n_pos
    n_feat = len(ct.selected_features)
    feature = {tuple(k): i for i, k in enumerate(ct.active_features.cpu().tolist())}
    out = []
    for i in range(len(graph)):
        kind, _, pos, idx = (int(v) for v in graph.nodes[i])
        layer = graph.layer(i)
        out.append({
            "feature": lambda: feature[(layer, pos, idx)],
            "error": lambda: n_feat + layer * n_pos + pos,
            "token": lambda: n_feat + L * n_pos + pos,
            "target": lambda: n_feat + (L + 1) * n_pos + idx,
        }[kinds[kind]]())
    return torch.tensor(out)


def test_attribution_graph_is_circuit_tracers(case):
    """``attribution_graph(...).to_circuit_tracer()``: circuit-tracer's nodes in its order, its adjacency matrix to 1e-10;
    circuit-tracer's pruning and scores give on it what they give on its own graph, and tl_linmap's pruning and
    scores, on its graph without position 0's features and errors (which circuit-tracer leaves out), the same numbers."""
    model, ct = case
    before = snapshot(model)
    graph = tl_linmap.attribution_graph(model, TOKENS, max_logits=N_LOGITS)
    assert_unchanged(model, before)
    assert graph.convention == "constant" and graph.relative_error() <= 1e-12
    mine = graph.to_circuit_tracer(scan="test", dtype=DT)
    assert torch.equal(mine.active_features, ct.active_features.cpu()) and torch.equal(mine.selected_features, ct.selected_features.cpu())
    assert torch.equal(mine.input_tokens.cpu(), ct.input_tokens.cpu()) and torch.equal(mine.logit_token_ids.cpu(), ct.logit_token_ids.cpu())
    assert (mine.logit_probabilities - ct.logit_probabilities.cpu()).abs().max() < 1e-12
    assert (mine.activation_values - ct.activation_values.cpu()).abs().max() < TOL
    A, B = mine.adjacency_matrix, ct.adjacency_matrix.cpu()
    assert A.shape == B.shape and A.dtype == B.dtype == DT
    assert (A - B).abs().max() < TOL * max(1.0, float(B.abs().max())), f"adjacency differs by {float((A - B).abs().max()):.1e}"
    with _float64_default():
        theirs, ours_in_ct = prune_graph(ct), prune_graph(mine)
        ct_scores = compute_graph_scores(ct)
        assert torch.equal(theirs.node_mask, ours_in_ct.node_mask) and torch.equal(theirs.edge_mask, ours_in_ct.edge_mask)
        assert compute_graph_scores(mine) == pytest.approx(ct_scores, abs=1e-12)
    # tl_linmap's own pruning and scores, on the same graph
    same = graph.subgraph((graph.nodes[:, 2] > 0) & ~graph.kind_mask("token", "target"))
    assert same.relative_error() <= 1e-12  # position 0's nodes are in the remainders now
    cols = _ct_columns(same, ct)
    assert (same.adjacency - B[cols][:, cols]).abs().max() < TOL * max(1.0, float(B.abs().max()))
    for thresholds in ((0.8, 0.98), (0.5, 0.9)):
        with _float64_default():
            expected = prune_graph(ct, *thresholds)
        ours = same.pruning(*thresholds)
        assert torch.equal(ours.nodes, expected.node_mask[cols]), thresholds
        assert torch.equal(ours.edges, expected.edge_mask[cols][:, cols]), thresholds
        assert (ours.cumulative - expected.cumulative_scores[cols]).abs().max() < 1e-12
    assert same.scores() == pytest.approx(ct_scores, abs=1e-12)


def test_circuit_tracer_graphs_in_its_own_dtype_and_of_an_earlier_position(case):
    """By default the circuit-tracer graph is float32, as circuit-tracer's own, and its pruning runs as it is; a graph
    of an earlier position is cut there (circuit-tracer reads logits at the prompt's last token)."""
    model, _ = case
    ct = tl_linmap.attribution_graph(model, TOKENS, max_logits=2).to_circuit_tracer()
    assert ct.adjacency_matrix.dtype == torch.float32 == torch.get_default_dtype()
    assert prune_graph(ct).node_mask.any()
    earlier = tl_linmap.attribution_graph(model, TOKENS, max_logits=2, position=-2)
    cut = earlier.to_circuit_tracer(dtype=DT)
    assert torch.equal(cut.input_tokens, TOKENS[:-1]) and cut.n_pos == len(TOKENS) - 1
    L, n = model.cfg.n_layers, len(TOKENS) - 1
    assert cut.adjacency_matrix.shape[0] == len(cut.selected_features) + (L + 1) * n + 2
    assert (earlier.nodes[:, 2] <= len(TOKENS) - 2).all()

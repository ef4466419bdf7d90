"""Baseline scorers: the methods the benchmark compares Cus-Prun with, as ScoreSets.

Every baseline writes the same ``cusprun-scores/1`` tensors (``model.layers.{l}.{P}.rows|cols``) as
the Cus-Prun scorer, so selection, intersection, slicing and export are shared and only the scores
differ. Notation for a projection y = x Wᵀ with inputs X [T, in] and outputs Y [T, out] over the
calibration tokens; A [T, inter] is the MLP's down_proj input act(gate)·up.

``random``     i.i.d. uniform scores (seeded): the floor any method must beat.
``magnitude``  structured weight magnitude (as the magnitude baseline of An et al. 2024 and LLM-Pruner):
               ‖W[:, j]‖₂ of o_proj and down_proj input columns, no data.
``wanda-sp``   structured Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs";
               structured variant as defined in An et al. 2024, FLAP): Σ_i |W_ij|·‖X[:, j]‖₂ of o_proj
               and down_proj input columns, X over a general corpus.
``flap``       FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs"): the
               fluctuation Var_t(X[:, j])·‖W[:, j]‖₂² of o_proj and down_proj input columns on a
               general corpus.
               These three remove what the papers remove: whole query heads (scored by their o_proj
               columns, summed per head; a head goes with its q rows and o columns, a k/v group with its
               last query head) and whole MLP channels (down_proj columns, with their gate and up rows).
               Their default selection is the unit selection of :mod:`cusprun.selection.units` over heads
               and channels; only those groups carry scores (``metadata["prunable"]``). The per-neuron
               selection, asked for by name (``granularity="neuron"``), still ranks single o columns.
``plnd``       PLND (Zhao et al. 2024, "How do Large Language Models Handle Multilingualism?"):
               a neuron's importance is the L1 norm over tokens of the change its deactivation makes:
               MLP channel k: Σ_t |A[t, k]|·‖W_down[:, k]‖₂ (gate, up and down share it); other rows
               Σ_t |Y[t, i]|; columns ‖W[:, j]‖₂·Σ_t |X[t, j]|. Per document on the *target* corpus,
               like Cus-Prun. (PLND's approximation for q/k neurons through the softmax is replaced
               here by the projection-output rule above.)
``shortgpt``   ShortGPT (Men et al. 2024, "ShortGPT: Layers in LLMs are More Redundant Than You
               Expect"): block influence BI_l = 1 - mean_t cos(h_l[t], h_l+1[t]) of each decoder
               layer on a general corpus; whole layers with the lowest BI are removed
               (``metadata["granularity"] = "layer"``), every neuron of layer l carries BI_l.

Corpus-free (random, magnitude), general-corpus (wanda-sp, flap, shortgpt: one pooled row) and
target-corpus (plnd: one row per document) methods all return [n_docs, features] tensors.
Each baseline is registered below as a :class:`~cusprun.scores.methods.Method`: its scorer and what it may prune.
"""

from __future__ import annotations

import torch

from ..core.architectures import check_architecture
from ..core.neurons import PROJECTIONS, head_dim, tensor_name
from .methods import HEADS_AND_CHANNELS, WHOLE_HEADS_AND_CHANNELS, Method, methods, register
from .scorefile import score_metadata
from .scoreset import ScoreSet


class _Stats:
    """Sums over tokens of one projection's inputs and outputs (float64): per document (PLND's L1 sums) or
    pooled over the corpus (Wanda-sp's and FLAP's second moments), whichever the method needs."""

    def __init__(self, per_document: bool):
        self.per_document = per_document
        self.x_abs: list[torch.Tensor] = []  # per document
        self.y_abs: list[torch.Tensor] = []
        self.x_sq = self.x_sum = 0.0  # pooled
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor):
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        if self.per_document:
            self.x_abs.append(x.abs().sum(0))
            self.y_abs.append(y.abs().sum(0))
        else:
            self.x_sq = self.x_sq + x.square().sum(0)
            self.x_sum = self.x_sum + x.sum(0)
            self.tokens += x.shape[0]


class Collected:
    """What one hooked forward pass per calibration document gathered: per-(layer, projection) stats and
    each layer's mean cos(h_in, h_out) (``mean_cos``, only for layer-granularity methods)."""

    def __init__(self, stats: dict, mean_cos: torch.Tensor):
        self.stats, self.mean_cos = stats, mean_cos


def _collect(model, documents: list[list[int]], method: Method, on_doc=None) -> Collected:
    """One forward pass per document with hooks: projection stats, and per-layer mean cos(h_in, h_out)."""
    want_hidden = method.granularity == "layer"
    stats = {(layer, proj): _Stats(per_document=method.data == "target")
             for layer in range(len(model.model.layers)) for proj in PROJECTIONS}
    cos_sums = torch.zeros(len(model.model.layers), dtype=torch.float64)
    handles = []
    for index, layer in enumerate(model.model.layers):
        for proj in PROJECTIONS:
            def hook(module, args, output, key=(index, proj)):
                stats[key].add(args[0], output)
            handles.append(layer.get_submodule(proj).register_forward_hook(hook))
        if want_hidden:
            def layer_hook(module, args, kwargs, output, index=index):
                h_in = (args[0] if args else kwargs["hidden_states"]).double()
                h_out = (output[0] if isinstance(output, tuple) else output).double()
                cos_sums[index] += torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum()
            handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for ids in documents:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
                if on_doc is not None:
                    on_doc(len(ids))
    finally:
        for h in handles:
            h.remove()
    return Collected(stats, cos_sums / sum(map(len, documents)))


def _weights(model, layer: int, proj: str) -> torch.Tensor:
    return model.model.layers[layer].get_submodule(proj).weight.detach().double().cpu()


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.cpu() for v in values]).float()


def baseline_scores(model, method: str, documents: list[list[int]] | None = None, *, seed: int = 0,
                    corpus: str = "", on_doc=None, metadata: dict | None = None) -> ScoreSet:
    """The ``method`` baseline's ScoreSet for ``model`` (see the module docstring for definitions).

    documents: token-id lists — a general corpus for wanda-sp, flap and shortgpt, the target corpus
    for plnd; ignored by random and magnitude. ``on_doc(tokens)`` is called after each document.
    metadata: more fields to record (the CLI's model name, max_tokens, dtype, corpus_sha256).
    """
    known = {name: m for name, m in methods().items() if m.scorer is not None}
    if method not in known:
        raise ValueError(f"method must be one of {tuple(known)}, got {method!r}")
    spec = known[method]
    check_architecture(model.config)
    if spec.data != "none" and not documents:
        raise ValueError(f"{method} needs calibration documents")
    collected = _collect(model, documents, spec, on_doc) if spec.data != "none" else None
    scores, extra = spec.scorer(model, collected, seed)
    if spec.prunable is not None:
        extra["prunable"] = list(spec.prunable)
    if spec.granularity == "layer":
        extra["granularity"] = "layer"
    n_layers = model.config.num_hidden_layers
    order = [tensor_name(layer, proj, side) for layer in range(n_layers) for proj in PROJECTIONS
             for side in ("rows", "cols")]
    fields = {"model": getattr(model.config, "_name_or_path", "") or "", **(metadata or {})}
    metadata = score_metadata(model.config, measure=method, method=method, corpus=corpus,
                              n_docs=next(iter(scores.values())).shape[0],
                              token_counts=[len(d) for d in documents] if documents and spec.data != "none" else [],
                              **extra, **fields)
    return ScoreSet({name: scores[name].contiguous() for name in order}, metadata)


def _random(model, collected, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for layer in range(model.config.num_hidden_layers):
        for proj in PROJECTIONS:
            out_f, in_f = model.model.layers[layer].get_submodule(proj).weight.shape
            scores[tensor_name(layer, proj, "rows")] = torch.rand(1, out_f, generator=gen)
            scores[tensor_name(layer, proj, "cols")] = torch.rand(1, in_f, generator=gen)
    return scores, {"seed": seed}


def _magnitude(model, collected, seed):
    scores = {}
    for layer in range(model.config.num_hidden_layers):
        scores.update(_heads_and_channels(model, layer, lambda proj, w: w.norm(dim=0)))
    return scores, {}


def _column_method(column_score):
    """A structured method scoring o_proj and down_proj input columns from the pooled general-corpus stats."""
    def scorer(model, collected, seed):
        scores = {}
        for layer in range(model.config.num_hidden_layers):
            scores.update(_heads_and_channels(
                model, layer, lambda proj, w, layer=layer: column_score(w, collected.stats[layer, proj])))
        return scores, {}
    return scorer


def _plnd_scores(model, collected, seed):
    scores = {}
    for layer in range(model.config.num_hidden_layers):
        scores.update(_plnd(model, layer, collected.stats))
    return scores, {}


def _shortgpt(model, collected, seed):
    bi = 1 - collected.mean_cos
    scores = {}
    for layer in range(model.config.num_hidden_layers):
        for proj in PROJECTIONS:
            out_f, in_f = model.model.layers[layer].get_submodule(proj).weight.shape
            scores[tensor_name(layer, proj, "rows")] = torch.full((1, out_f), float(bi[layer]))
            scores[tensor_name(layer, proj, "cols")] = torch.full((1, in_f), float(bi[layer]))
    return scores, {"block_influence": [float(b) for b in bi]}


def _heads_and_channels(model, layer: int, column_score) -> dict[str, torch.Tensor]:
    """Scores for the structured methods: ``column_score(proj, W)`` of o_proj's input columns, summed per
    attention head (each column carries its head's sum), and of down_proj's input columns (MLP
    channels). Every other group gets zeros and is not prunable; it goes only where made dead."""
    hd = head_dim(model.config)
    out = {}
    for proj in PROJECTIONS:
        w = _weights(model, layer, proj)
        out[tensor_name(layer, proj, "rows")] = torch.zeros(1, w.shape[0])
        if f"{proj}.cols" in HEADS_AND_CHANNELS:
            col = column_score(proj, w)
            if proj == "self_attn.o_proj":
                col = col.view(-1, hd).sum(1, keepdim=True).expand(-1, hd).reshape(-1)
            out[tensor_name(layer, proj, "cols")] = col[None].float()
        else:
            out[tensor_name(layer, proj, "cols")] = torch.zeros(1, w.shape[1])
    return out


def _wanda_sp(w: torch.Tensor, s: _Stats) -> torch.Tensor:
    """Σ_i |W_ij|·‖X_j‖₂ over the pooled general corpus."""
    return w.abs().sum(0) * s.x_sq.sqrt()


def _flap(w: torch.Tensor, s: _Stats) -> torch.Tensor:
    """Var_t(X_j)·‖W[:, j]‖₂² (population variance over the pooled general corpus)."""
    mean = s.x_sum / s.tokens
    return (s.x_sq / s.tokens - mean.square()).clamp_min(0) * w.square().sum(0)


def _plnd(model, layer, stats):
    out = {}
    w_down_norm = _weights(model, layer, "mlp.down_proj").norm(dim=0)  # [inter]
    channel = _stack([a * w_down_norm for a in stats[layer, "mlp.down_proj"].x_abs])  # [docs, inter]
    for proj in PROJECTIONS:
        s = stats[layer, proj]
        w_col_norm = _weights(model, layer, proj).norm(dim=0)
        out[tensor_name(layer, proj, "rows")] = channel if proj in ("mlp.gate_proj", "mlp.up_proj") else _stack(s.y_abs)
        out[tensor_name(layer, proj, "cols")] = _stack([a * w_col_norm for a in s.x_abs])
    return out


# What each baseline scores and what a selection may remove with its scores (see the module docstring).
for _method in (
    Method("random", "i.i.d. uniform scores (--seed), no data", data="none", scorer=_random),
    Method("magnitude", "column norms of o_proj (per head) and down_proj, no data", data="none",
           prunable=HEADS_AND_CHANNELS, scorer=_magnitude, selection=WHOLE_HEADS_AND_CHANNELS),
    Method("wanda-sp", "structured Wanda: sum_i |W_ij| * ||X_j|| of heads and channels (general corpus)",
           data="general", prunable=HEADS_AND_CHANNELS, scorer=_column_method(_wanda_sp),
           selection=WHOLE_HEADS_AND_CHANNELS),
    Method("flap", "FLAP fluctuation Var(X_j) * ||W[:, j]||^2 of heads and channels (general corpus)",
           data="general", prunable=HEADS_AND_CHANNELS, scorer=_column_method(_flap),
           selection=WHOLE_HEADS_AND_CHANNELS),
    Method("plnd", "PLND: L1 deactivation effect of every neuron per document (target corpus)", data="target",
           scorer=_plnd_scores),
    Method("shortgpt", "ShortGPT: whole layers by block influence (general corpus)", data="general",
           granularity="layer", scorer=_shortgpt),
):
    register(_method)

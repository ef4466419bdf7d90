"""What one decoder layer's forward pass yields: every neuron score of that layer, for a batch of documents.

Each projection's forward is swapped for the :func:`cusprun_kernels.projection_energies` op, so its
output Y is computed once, used by the rest of the forward pass, and its energies come with it. Once
the batch's documents have passed the layer, the block-measure scores are computed from what the
passes produced, with one call of each ablation op per batch.

Definitions (docs/scores.md, "Score definition"): for y = x Wᵀ (+ b) with input X [T, in] and output Y,
``local`` scores are rows[i] = ‖Y[:, i]‖₂ and cols[j] = ‖W[:, j]‖₂·‖X[:, j]‖₂; ``block`` scores are
the Frobenius norm of the change of the enclosing block's output, recomputed exactly, except the
input columns of q, k, v, gate and up, which keep the local definition.

A document's scores do not depend on the other documents of its batch, bit for bit: the decoder
layer and the projections run on each document alone (views of the batch), and the ablation ops
compute each document's scores from its own rows only.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

import cusprun_kernels as ops
from cusprun_kernels.segments import Segments

from ..core.architectures import sliding_window
from ..core.neurons import PROJECTIONS, influence_name, tensor_name
from ..scores.stats import STAT_PROJECTIONS, gram_name
from .sources import LayerSource, layer_mask

MEASURES = ("block", "local")  # checked by the engine before any work
# What a layer yields, by version: checkpoints record it, so a run never resumes on layers of another kind
# (2: with each layer's block influence).
OUTPUTS_VERSION = 2


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """A layer's block influence on one document: h_in, h_out [1, L, hidden] -> float32 scalar, the mean over
    tokens of 1 - cos(h_in[t], h_out[t]) (0: the layer leaves every token's direction as it was)."""
    cos = torch.nn.functional.cosine_similarity(h_in[0].float(), h_out[0].float(), dim=-1)
    return (1 - cos.double()).mean().float()


class LayerScores:
    """Decoder layer ``index`` instrumented for scoring (inside ``with scores.instrumented():``).

    :meth:`run` passes a batch of documents through the layer and returns their outputs and scores. With
    ``stats``, the Gram matrices of o_proj's and down_proj's inputs are summed over every batch (:meth:`grams`).
    """

    def __init__(self, source: LayerSource, index: int, layer: torch.nn.Module, measure: str, chunk_bytes: int,
                 stats: bool = False):
        self.source, self.index, self.layer = source, index, layer
        self.config, self.measure, self.chunk_bytes = source.config, measure, chunk_bytes
        self.stats = stats
        self._gram: dict[str, torch.Tensor] = {}  # float64 sums over the batches
        # Fresh float32 copies, once per layer: reductions over a weight round the same way whatever its
        # memory alignment in the loaded model (so streamed and in-memory runs are bit-identical).
        self.w_o = layer.self_attn.o_proj.weight.to(torch.float32, copy=True)
        self.weight_col_sq = {proj: layer.get_submodule(proj).weight.to(torch.float32, copy=True).square().sum(dim=0)
                              for proj in PROJECTIONS}
        self._doc: Segments | None = None  # the document passing the layer now: segments [0, L]
        self._energies: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # per document, in batch order
        self._tensors: dict[str, list[torch.Tensor]] = {}  # per document: what the attention block scores need

    def _keep(self, name: str, t: torch.Tensor) -> None:
        self._tensors.setdefault(name, []).append(t)

    def _projection_forward(self, proj: str, linear: torch.nn.Linear) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            y, row_sq, col_sq = ops.projection_energies(flat, linear.weight, linear.bias, self._doc)
            self._energies.setdefault(proj, []).append((row_sq[0], col_sq[0]))
            if self.stats and proj in STAT_PROJECTIONS:
                g = ops.gram(flat)  # float32, one document; summed in float64
                self._gram[proj] = g.double() if proj not in self._gram else self._gram[proj].add_(g)
            if self.measure == "block":  # the attention-side block scores need these, nothing else
                if proj == "self_attn.o_proj":
                    self._keep(f"{proj}.in", flat)
                elif proj.startswith("self_attn"):
                    self._keep(f"{proj}.out", y)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return forward

    def _attention_started(self, module, args, kwargs):
        if self.measure == "block":
            cos, sin = kwargs["position_embeddings"]
            self._keep("cos", cos.reshape(-1, cos.shape[-1]))
            self._keep("sin", sin.reshape(-1, sin.shape[-1]))

    @contextmanager
    def instrumented(self):
        """The layer with its projections swapped for the energy op and its attention inputs captured."""
        layer = self.layer
        handle = layer.self_attn.register_forward_pre_hook(self._attention_started, with_kwargs=True)
        patched = []
        for proj in PROJECTIONS:
            linear = layer.get_submodule(proj)
            linear.forward = self._projection_forward(proj, linear)
            patched.append(linear)
        try:
            yield self
        finally:
            handle.remove()
            for linear in patched:
                del linear.forward  # back to the class's forward

    def run(self, hidden: list[torch.Tensor], on_document: Callable[[int, int], None] | None = None):
        """hidden: each document's input [1, L_d, hidden] -> (each document's output, scores), where scores
        maps ``proj.rows`` / ``proj.cols`` to float32 [n_docs, features] on the device, documents in order,
        and the layer's block influence to [n_docs, 1] (:func:`block_influence`).

        ``on_document(j, tokens)`` is called once document j of the batch has passed the layer."""
        lengths = [h.shape[1] for h in hidden]
        outputs, influence = [], []
        try:
            for j, h in enumerate(hidden):
                self._doc = Segments([0, lengths[j]], h.device)
                position_ids = torch.arange(lengths[j], device=h.device)[None]
                outputs.append(self.layer(
                    h, attention_mask=layer_mask(self.config, self.layer.self_attn, h, position_ids),
                    position_embeddings=self.source.rotary(h, position_ids), position_ids=position_ids,
                    use_cache=False))
                influence.append(block_influence(h, outputs[-1]))
                if on_document is not None:
                    on_document(j, lengths[j])
            scores = self._scores(Segments.of_lengths(lengths, hidden[0].device))
            return outputs, {**scores, influence_name(self.index): torch.stack(influence)[:, None]}
        finally:
            self._doc = None
            self._energies.clear()
            self._tensors.clear()

    def grams(self) -> dict[str, torch.Tensor]:
        """{``gram_name``: float64 [n, n] on the device}: XᵀX of o_proj's and down_proj's inputs over every
        token that has passed the layer (empty without ``stats``)."""
        return {gram_name(self.index, proj): g for proj, g in self._gram.items()}

    def _scores(self, segments: Segments) -> dict[str, torch.Tensor]:
        row_sq = {proj: torch.stack([e[0] for e in self._energies[proj]]) for proj in PROJECTIONS}
        col_sq = {proj: self.weight_col_sq[proj] * torch.stack([e[1] for e in self._energies[proj]])
                  for proj in PROJECTIONS}  # ‖W[:, j]‖²·Σ_t X[t, j]²: exact for o and down, whose block ends there
        if self.measure == "block":
            row_sq.update(self._block_attention(segments))
            # Removing gate row k, up row k or down column k all remove A[:, k] W_down[:, k]ᵀ from the
            # MLP output: one score, ‖A[:, k]‖₂·‖W_down[:, k]‖₂ (act(0) = 0 for SiLU), i.e. down's column score.
            row_sq["mlp.gate_proj"] = row_sq["mlp.up_proj"] = col_sq["mlp.down_proj"]
        out = {}
        for proj in PROJECTIONS:
            out[tensor_name(self.index, proj, "rows")] = row_sq[proj].clamp_min(0).sqrt()
            out[tensor_name(self.index, proj, "cols")] = col_sq[proj].sqrt()
        return out

    def _block_attention(self, segments: Segments) -> dict[str, torch.Tensor]:
        """Block-measure row energies of q, k and v for the batch: [n_docs, features] each."""
        t = {name: torch.cat(parts) for name, parts in self._tensors.items()}
        attn, cfg = self.layer.self_attn, self.config
        hd, total = attn.head_dim, segments.total
        n_kv, n_heads = cfg.num_key_value_heads, cfg.num_attention_heads
        n_rep = n_heads // n_kv
        q_sq, k_sq = ops.qk_row_ablation(
            t["self_attn.q_proj.out"].reshape(total, n_heads, hd),
            t["self_attn.k_proj.out"].reshape(total, n_kv, hd),
            t["self_attn.v_proj.out"].reshape(total, n_kv, hd),
            t["cos"], t["sin"], self.w_o, segments, n_rep=n_rep, scaling=attn.scaling,
            sliding_window=sliding_window(attn, cfg), chunk_bytes=self.chunk_bytes)
        v_sq = ops.v_row_energies(t["self_attn.o_proj.in"], self.w_o, segments, n_kv=n_kv, n_rep=n_rep)
        return {"self_attn.q_proj": q_sq, "self_attn.k_proj": k_sq, "self_attn.v_proj": v_sq}

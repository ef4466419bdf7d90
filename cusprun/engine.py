"""The scoring engine: one instrumented forward pass per document yields every neuron's score.

Each projection's forward is swapped for the :func:`cusprun_kernels.projection_energies` op, so
its output Y is computed once, used by the rest of the forward pass, and its energies come with
it. When a layer's attention (MLP) block finishes, its block-measure scores are computed from what
the pass produced. Activations of one layer live only until that layer's scores are taken.

Definitions (README, "Score definition"): for y = x Wᵀ (+ b) with input X [T, in] and output Y,
``local`` scores are rows[i] = ‖Y[:, i]‖₂ and cols[j] = ‖W[:, j]‖₂·‖X[:, j]‖₂; ``block`` scores are
the Frobenius norm of the change of the enclosing block's output, recomputed exactly, except the
input columns of q, k, v, gate and up, which keep the local definition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch

import cusprun_kernels as ops

from .architectures import sliding_window
from .checkpoint import Checkpoint
from .hidden_store import HiddenStore
from .layers import InMemoryLayers, layer_mask
from .neurons import PROJECTIONS, tensor_name
from .parallel import Parallel

MEASURES = ("block", "local")


class _LayerTap:
    """What one decoder layer's forward produced for the current document, and its scores."""

    def __init__(self, scorer: Scorer, index: int, layer: torch.nn.Module):
        self.scorer, self.index, self.layer = scorer, index, layer
        self.energies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.block_sq: dict[str, torch.Tensor] = {}  # block-measure row energies that replace local ones
        # Fresh float32 copies, once per layer: reductions over a weight round the same way whatever its
        # memory alignment in the loaded model (so streamed and in-memory runs are bit-identical).
        self.w_o = layer.self_attn.o_proj.weight.to(torch.float32, copy=True)
        self.weight_col_sq = {proj: layer.get_submodule(proj).weight.to(torch.float32, copy=True).square().sum(dim=0)
                              for proj in PROJECTIONS}

    def projection_forward(self, proj: str, linear: torch.nn.Linear) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            offsets = torch.tensor([0, flat.shape[0]], device=flat.device)
            y, row_sq, col_sq = ops.projection_energies(flat, linear.weight, linear.bias, offsets)
            self.energies[proj] = (row_sq[0], col_sq[0])
            if self.scorer.measure == "block":  # the attention-side block scores need these, nothing else
                if proj == "self_attn.o_proj":
                    self.tensors[f"{proj}.in"] = flat
                elif proj.startswith("self_attn"):
                    self.tensors[f"{proj}.out"] = y
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return forward

    def attention_started(self, module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        self.tensors["cos"], self.tensors["sin"] = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])

    def attention_done(self, module, args, output):
        if self.scorer.measure == "block":
            self._block_attention(module)
        self._emit(PROJECTIONS[:4])

    def mlp_done(self, module, args, output):
        if self.scorer.measure == "block":
            # Removing gate row k, up row k or down column k all remove A[:, k] W_down[:, k]ᵀ from the
            # MLP output: one score, ‖A[:, k]‖₂·‖W_down[:, k]‖₂ (act(0) = 0 for SiLU), i.e. down's column score.
            channel_sq = self._cols_sq("mlp.down_proj")
            self.block_sq.update({"mlp.gate_proj": channel_sq, "mlp.up_proj": channel_sq})
        self._emit(PROJECTIONS[4:])
        self.energies.clear()
        self.tensors.clear()
        self.block_sq.clear()

    def _block_attention(self, attn):
        t, cfg = self.tensors, self.scorer.config
        hd, length = attn.head_dim, t["cos"].shape[0]
        n_kv, n_heads = cfg.num_key_value_heads, cfg.num_attention_heads
        n_rep = n_heads // n_kv
        w_o = self.w_o
        offsets = torch.tensor([0, length], device=w_o.device)
        q_sq, k_sq = ops.qk_row_ablation(
            t["self_attn.q_proj.out"].reshape(length, n_heads, hd),
            t["self_attn.k_proj.out"].reshape(length, n_kv, hd),
            t["self_attn.v_proj.out"].reshape(length, n_kv, hd),
            t["cos"], t["sin"], w_o, offsets, n_rep=n_rep, scaling=attn.scaling,
            sliding_window=sliding_window(attn, cfg), chunk_bytes=self.scorer.chunk_bytes)
        v_sq = ops.v_row_energies(t["self_attn.o_proj.in"], w_o, offsets, n_kv=n_kv, n_rep=n_rep)
        self.block_sq.update({"self_attn.q_proj": q_sq[0], "self_attn.k_proj": k_sq[0], "self_attn.v_proj": v_sq[0]})
        t.clear()

    def _cols_sq(self, proj: str) -> torch.Tensor:
        """Local column energies ‖W[:, j]‖²·Σ_t X[t, j]² (exact for o and down, whose block ends there)."""
        return self.weight_col_sq[proj] * self.energies[proj][1]

    def _emit(self, projections: Iterable[str]):
        """Scores (square roots of energies) of the given projections into the current document's row."""
        for proj in projections:
            rows_sq = self.block_sq.get(proj, self.energies[proj][0])
            self.scorer.store(self.index, proj, rows_sq.clamp_min(0).sqrt(), self._cols_sq(proj).sqrt())


class Scorer:
    """Scores documents layer by layer: every document passes decoder layer l (its scores taken as it
    goes) before layer l + 1 is touched, so only one layer's weights need to be on the device
    (:class:`~cusprun.layers.StreamedLayers`), each finished layer can be checkpointed, and the
    documents can be split across processes.

    Give either a loaded Hugging Face model (Llama, Mistral or Qwen2 layout) or a layer source.
    """

    def __init__(self, model=None, measure: str = "block", chunk_bytes: int = ops.qk_ablation.DEFAULT_CHUNK_BYTES,
                 layers=None):
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if (model is None) == (layers is None):
            raise ValueError("give a model or a layer source, not both")
        self.model, self.measure, self.chunk_bytes = model, measure, chunk_bytes
        self.source = layers if layers is not None else InMemoryLayers(model)
        self.config = self.source.config
        self._doc_row: dict[str, torch.Tensor] | None = None

    def store(self, layer: int, proj: str, rows: torch.Tensor, cols: torch.Tensor):
        self._doc_row[tensor_name(layer, proj, "rows")] = rows.float().cpu()
        self._doc_row[tensor_name(layer, proj, "cols")] = cols.float().cpu()

    @contextmanager
    def _instrumented(self, index: int, layer: torch.nn.Module):
        tap = _LayerTap(self, index, layer)
        handles = [layer.self_attn.register_forward_pre_hook(tap.attention_started, with_kwargs=True),
                   layer.self_attn.register_forward_hook(tap.attention_done),
                   layer.mlp.register_forward_hook(tap.mlp_done)]
        patched = []
        for proj in PROJECTIONS:
            linear = layer.get_submodule(proj)
            linear.forward = tap.projection_forward(proj, linear)
            patched.append(linear)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for linear in patched:
                del linear.forward  # back to the class's forward

    def _run_layer(self, index: int, layer: torch.nn.Module, hidden: HiddenStore, docs: list[int], on_step):
        rows = {}
        with self._instrumented(index, layer):
            for i in docs:
                h = hidden.get(i)
                position_ids = torch.arange(h.shape[1], device=h.device)[None]
                self._doc_row = {}
                out = layer(h, attention_mask=layer_mask(self.config, layer.self_attn, h, position_ids),
                            position_embeddings=self.source.rotary(h, position_ids), position_ids=position_ids,
                            use_cache=False)
                hidden.put(i, out)
                rows[i] = self._doc_row
                if on_step is not None:
                    on_step(index, i, h.shape[1])
        self._doc_row = None
        return rows

    @torch.inference_mode()
    def score_documents(self, documents: list[list[int]], on_step: Callable[[int, int, int], None] | None = None,
                        checkpoint: Checkpoint | None = None, parallel: Parallel | None = None,
                        device_budget: float = float("inf"), host_budget: float = float("inf")):
        """Scores of several documents: tensor name -> float32 [n_docs, features] (on rank 0; ``None``
        on other ranks). ``on_step(layer, document, tokens)`` follows progress; ``checkpoint`` makes the
        run resumable; ``parallel`` splits the documents across processes."""
        if any(len(d) == 0 for d in documents):
            raise ValueError("cannot score an empty document")
        parallel = parallel or Parallel()
        mine = parallel.shard(len(documents))
        hidden = HiddenStore(self.source.device, device_budget, host_budget)
        n_layers = self.config.num_hidden_layers
        start = 0
        if checkpoint is not None:
            checkpoint.open()
            start = parallel.minimum(checkpoint.finished_layers())
        if start:
            for i, h in checkpoint.load_hidden(start - 1).items():
                hidden.put(i, h.to(self.source.device))
        else:
            for i in mine:
                hidden.put(i, self.source.embed(documents[i]))
        if hasattr(self.source, "release_embedding"):
            self.source.release_embedding()
        scores = checkpoint.load_scores(start) if start and parallel.is_main else {}
        try:
            for index in range(start, n_layers):
                layer = self.source.layer(index)
                error, rows = None, {}
                try:
                    rows = self._run_layer(index, layer, hidden, mine, on_step)
                except Exception as exc:  # shared with every rank below, so none waits forever
                    if parallel.world == 1:
                        raise
                    error = f"{type(exc).__name__}: {exc}"
                parallel.check(error)
                gathered = parallel.gather(rows)
                layer_scores = None
                if gathered is not None:
                    layer_scores = {name: torch.stack([gathered[i][name] for i in range(len(documents))])
                                    for name in gathered[0]}
                    scores.update(layer_scores)
                if checkpoint is not None:
                    # hidden states of every rank first, then the scores: a layer's score file exists only
                    # once every rank can resume after it
                    checkpoint.save_hidden(index, {i: hidden.get(i) for i in mine})
                    parallel.barrier()
                    if layer_scores is not None:
                        checkpoint.save_scores(index, layer_scores)
                    checkpoint.drop_hidden(index - 1)
                self.source.release(index)
        finally:
            hidden.close()
        return scores if parallel.is_main else None

    def score_document(self, input_ids: list[int]) -> dict[str, torch.Tensor]:
        """Scores of one document: tensor name -> float32 [features]."""
        return {name: t[0] for name, t in self.score_documents([input_ids]).items()}

"""The scoring engine: every document passes decoder layer l, its scores taken as it goes, before layer
l + 1 is touched (:mod:`cusprun.engine.layer_scores` computes what one layer yields).

Layer-major order lets only one layer's weights be on the device (:class:`~cusprun.engine.sources.StreamedLayers`),
each finished layer be checkpointed, and the documents be split across processes. Documents are packed
into batches of at most ``batch_tokens`` tokens (a longer document is a batch of its own); each op runs
once per batch, and a layer's scores reach the host in one copy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

import cusprun_kernels as ops

from ..scores.stats import split_stats
from .checkpoint import Checkpoint
from .hidden_store import HiddenStore
from .layer_scores import MEASURES, LayerScores
from .parallel import Parallel
from .sources import InMemoryLayers, LayerSource

# Tokens per batch. On a CPU batching saves little (each document's attention runs alone anyway); on a
# GPU a batch fills the device with one launch per op instead of one per document.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}


class Scorer:
    """Scores documents layer by layer (see the module docstring).

    Give either a loaded Hugging Face model (Llama, Mistral or Qwen2 layout) or a layer source.
    ``batch_tokens``: the token budget of a batch (default per device, :data:`DEFAULT_BATCH_TOKENS`);
    scores do not depend on it, bit for bit. ``stats``: also sum the Gram matrices of o_proj's and
    down_proj's inputs over all documents (``model.layers.{l}.{proj}.gram``, float32 [n, n], among the
    results of :meth:`score_documents`; see :mod:`cusprun.scores.stats`): intermediate² + (heads·head_dim)²
    floats per layer (SmolLM2-135M 320 MB, Llama-3-8B 28 GB). With a checkpoint they are spilled to its
    per-layer files and left out of the results (:meth:`Checkpoint.grams` reads them back one at a time);
    without one they stay in host memory until the run ends.
    """

    def __init__(self, model=None, measure: str = "block", chunk_bytes: int = ops.qk_ablation.DEFAULT_CHUNK_BYTES,
                 layers: LayerSource | None = None, batch_tokens: int | None = None, stats: bool = False):
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if (model is None) == (layers is None):
            raise ValueError("give a model or a layer source, not both")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
        self.measure, self.chunk_bytes, self.stats = measure, chunk_bytes, stats
        self.source: LayerSource = layers if layers is not None else InMemoryLayers(model)
        self.config = self.source.config
        self.batch_tokens = batch_tokens or DEFAULT_BATCH_TOKENS.get(self.source.device.type,
                                                                     DEFAULT_BATCH_TOKENS["cpu"])

    def batches(self, docs: list[int], lengths: list[int]) -> list[list[int]]:
        """``docs`` in order, cut into runs of at most ``batch_tokens`` tokens (a longer document alone)."""
        out, tokens = [], 0
        for i in docs:
            if not out or tokens + lengths[i] > self.batch_tokens:
                out.append([])
                tokens = 0
            out[-1].append(i)
            tokens += lengths[i]
        return out

    def _run_layer(self, index: int, layer: torch.nn.Module, hidden: HiddenStore, batches: list[list[int]],
                   on_step) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Every batch through layer ``index``: hidden states replaced by the layer's outputs; returns each
        document's scores of the layer on the host (document -> tensor name -> float32 [features]) and,
        with ``stats``, the layer's Gram matrices over these documents (name -> float64 [n, n], host)."""
        scorer = LayerScores(self.source, index, layer, self.measure, self.chunk_bytes, self.stats)
        parts, names = [], None
        with scorer.instrumented():
            for batch in batches:
                step = None if on_step is None else partial(_document_done, on_step, index, batch)
                outputs, scores = scorer.run([hidden.get(i) for i in batch], step)
                for i, out in zip(batch, outputs):
                    hidden.put(i, out)
                names = list(scores)
                parts.append(torch.cat([scores[n] for n in names], dim=1))  # [batch docs, all features]
        grams = {name: g.cpu() for name, g in scorer.grams().items()}
        if not parts:
            return {}, grams
        flat = torch.cat(parts).float().cpu()  # the layer's scores reach the host in one copy
        widths = [scores[n].shape[1] for n in names]
        docs = [i for batch in batches for i in batch]
        # per-document clones: a view would carry (and pickle, when gathered) the whole layer's storage
        return {i: {n: t.clone() for n, t in zip(names, flat[j].split(widths))} for j, i in enumerate(docs)}, grams

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
        batches = self.batches(mine, [len(d) for d in documents])
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
        self.source.release_embedding()
        scores = checkpoint.load_scores(start) if start and parallel.is_main else {}
        try:
            for index in range(start, n_layers):
                layer = self.source.layer(index)
                error, rows, grams = None, {}, {}
                try:
                    rows, grams = self._run_layer(index, layer, hidden, batches, on_step)
                except Exception as exc:  # shared with every rank below, so none waits forever
                    if parallel.world == 1:
                        raise
                    error = f"{type(exc).__name__}: {exc}"
                parallel.check(error)
                # a rank's Gram sums travel under a negative key (document keys are 0, 1, ...)
                gathered = parallel.gather({**rows, -1 - parallel.rank: grams})
                layer_scores = None
                if gathered is not None:
                    layer_scores = {name: torch.stack([gathered[i][name] for i in range(len(documents))])
                                    for name in gathered[0]}
                    # ranks' float64 sums added in a fixed order, then kept (and stored) as float32
                    per_rank = [gathered[k] for k in sorted(gathered, reverse=True) if k < 0]
                    layer_scores.update({name: sum(g[name] for g in per_rank if name in g).float() for name in grams})
                    # with a checkpoint the Gram matrices live in its layer files only (one layer in memory)
                    scores.update(layer_scores if checkpoint is None else split_stats(layer_scores)[0])
                if checkpoint is not None:
                    # hidden states of every rank first, then the scores: a layer's score file exists only
                    # once every rank can resume after it
                    checkpoint.save_hidden(index, {i: hidden.get(i) for i in mine})
                    parallel.barrier()
                    if layer_scores is not None:
                        checkpoint.save_scores(index, layer_scores)
                    checkpoint.drop_hidden(index - 1)
                del gathered, layer_scores, rows, grams  # this layer's Gram sums go before the next layer's
                self.source.release(index)
        finally:
            hidden.close()
        return scores if parallel.is_main else None


def _document_done(on_step, layer: int, batch: list[int], j: int, tokens: int) -> None:
    on_step(layer, batch[j], tokens)

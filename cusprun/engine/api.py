"""The Python API: score a model the caller has loaded; the CLI commands are thin shells over this.

    import cusprun
    de = cusprun.score(model, german_texts, tokenizer=tokenizer)      # ScoreSet
    med = cusprun.ScoreSet.load("scores/medical.safetensors")
    plan = (de & med).select(0.25)              # intersection, then whole MLP channels for 25%
    expert = cusprun.apply(model, plan)         # dense: per-layer MLP widths, no gathers or scatters
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import partial

import torch

import cusprun_kernels

from ..core.architectures import check_architecture
from ..core.progress import advance, progress_bar
from ..scores.scorefile import score_metadata
from ..scores.scoreset import ScoreSet
from .layer_major import MEASURES, Scorer


def token_ids(documents, tokenizer=None, max_tokens: int | None = None,
              vocab_size: int | None = None) -> list[list[int]]:
    """Documents (strings, token-id sequences, 1-D tensors, or an iterable mixing them) -> token-id lists."""
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Iterable):
        raise TypeError("documents must be an iterable of documents (strings or token-id lists), "
                        f"got {type(documents).__name__}")
    out = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            if tokenizer is None:
                raise ValueError(f"document {i} is text: pass tokenizer= (or give token ids)")
            ids = tokenizer(doc)["input_ids"]
        elif isinstance(doc, torch.Tensor):
            ids = doc.flatten().tolist()
        else:
            ids = list(doc)
        if not ids:
            raise ValueError(f"document {i} has no tokens")
        if not all(isinstance(t, int) and 0 <= t < (vocab_size or sys.maxsize) for t in ids):
            raise ValueError(f"document {i}: token ids must be integers in [0, {vocab_size})")
        out.append(ids[:max_tokens] if max_tokens else ids)
    if not out:
        raise ValueError("no documents to score")
    return out


def score(model, documents, measure: str = "block", *, tokenizer=None, max_tokens: int | None = None,
          corpus: str = "documents", progress: bool = True, stats: bool = False) -> ScoreSet:
    """Every neuron's relevance score for each document, on a model the caller has loaded.

    model: a Llama / Mistral / Qwen2 ``*ForCausalLM`` on any device and dtype (scores accumulate in
        float32). Its weights are not changed (misaligned parameters are re-homed, values equal).
    documents: strings (tokenized with ``tokenizer``, special tokens as it adds them), token-id lists or
        1-D tensors, or any iterable of these; ``max_tokens`` truncates each.
    measure: ``block`` (default) or ``local``; see the score definition in docs/scores.md.
    corpus: the name recorded in the ScoreSet's metadata.
    stats: also collect the Gram matrices ``--compensate`` needs (``ScoreSet.stats``, see :mod:`cusprun.scores.stats`).
    Returns a :class:`ScoreSet` of float32 [n_docs, features] tensors, row i for document i.
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError("model must be a Hugging Face *ForCausalLM with a decoder stack (model.model.layers)")
    check_architecture(model.config)
    ids = token_ids(documents, tokenizer, max_tokens, model.config.vocab_size)
    param = next(model.parameters())
    scorer = Scorer(model, measure, stats=stats)
    with progress_bar(sum(map(len, ids)), corpus, disable=not progress) as bar:
        scores = scorer.score_documents(ids, partial(advance, bar, len(ids), model.config.num_hidden_layers))
    metadata = score_metadata(model.config, measure=measure,
                              model=getattr(model.config, "_name_or_path", "") or type(model).__name__,
                              corpus=corpus, n_docs=len(ids), token_counts=[len(t) for t in ids],
                              max_tokens=max_tokens or "", dtype=str(param.dtype).removeprefix("torch."),
                              backend=cusprun_kernels.resolve_backend(param.device.type, announce=False))
    return ScoreSet(scores, metadata)


"""Perplexity and speed of a (dense or pruned) model, the measurements behind ``cusprun.eval`` and the main job."""

from __future__ import annotations

import math
import statistics
import time

import torch

from ..core.corpus import Document, read_corpus, tokenize
from ..core.errors import CusprunError
from ..core.progress import item_bar

LOGITS_BUDGET = 1 << 26  # float32 logits of one forward in perplexity(): 256 MB


def _by_length(documents: list[list[int]]) -> dict[int, list[list[int]]]:
    """length -> the documents of that length, in order: rows of one length batch without padding."""
    groups: dict[int, list[list[int]]] = {}
    for ids in documents:
        groups.setdefault(len(ids), []).append(ids)
    return groups


@torch.inference_mode()
def perplexity(model, documents: list[list[int]], on_doc=None, batch_tokens: int = 4096) -> tuple[float, int]:
    """Token-weighted perplexity over documents: exp(Σ NLL / Σ predicted tokens). Returns (ppl, tokens).
    ``on_doc(n)`` follows progress.

    Documents of the same length run together, up to ``batch_tokens`` tokens per forward: rows of one
    length need no padding or mask, so each document is computed as alone (tested against one forward per
    document), and a batch of short documents reads the weights once instead of once per document."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    nll, count = 0.0, 0
    for length, docs in _by_length(documents).items():
        # the logits are the largest tensor: a few copies of [rows, length, vocab] floats (Llama-3's vocabulary
        # makes 4096 tokens 2 GB each), so rows stop at LOGITS_BUDGET elements as well as at batch_tokens
        rows = max(1, min(batch_tokens // max(length, 1), LOGITS_BUDGET // max(length * vocab, 1)))
        for start in range(0, len(docs), rows):
            chunk = docs[start:start + rows]
            if length >= 2:
                x = torch.tensor(chunk, device=device)
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(),
                                                         reduction="sum").item()
                count += len(chunk) * (length - 1)
            if on_doc is not None:
                on_doc(len(chunk))
    return (math.exp(nll / count) if count else float("nan")), count


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work: GPU launches return before they run, so a host clock read without
    this times the launches, not the computation."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill_tokens_per_s(model, documents: list[list[int]], batch: int = 1, logits_to_keep: int = 0) -> float:
    """Tokens/s of forwards over ``documents``, ``batch`` documents of one length per forward (one each
    by default: a single request's prefill; on a GPU a larger batch moves a large model from Python's
    launch overhead to its GEMMs), with the logits of every token (``logits_to_keep`` 0, as perplexity
    needs them) or of the last ``logits_to_keep`` (1: a generation's prefill)."""
    device = next(model.parameters()).device
    groups = {length: docs for length, docs in _by_length(documents).items() if length}
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}  # the default: every token's logits
    _synchronize(device)
    start = time.perf_counter()
    for docs in groups.values():
        for i in range(0, len(docs), batch):
            model(input_ids=torch.tensor(docs[i:i + batch], device=device), use_cache=False, **keep)
    _synchronize(device)
    return sum(len(ids) for ids in documents) / (time.perf_counter() - start)


def paired_prefill(model, documents: list[list[int]], repetitions: int, reference=None, batch: int = 1,
                   logits_to_keep: int = 0) -> tuple[float, float | None]:
    """(median prefill tokens/s of ``model`` over ``repetitions``, and with a ``reference`` model the median of
    the repetitions' speed ratios model / reference, else None), after one untimed warm-up forward;
    ``batch`` and ``logits_to_keep`` as in :func:`prefill_tokens_per_s`.

    The reference is timed right before the model in each repetition: a small CPU drifts by more than the
    differences measured (10-20% between runs), so speeds timed minutes apart would compare the machine's
    moods; the median of paired ratios cancels the drift."""
    # warm-up, not timed: a model's first forward is slower
    prefill_tokens_per_s(model, documents[:batch], batch, logits_to_keep)
    speeds, ratios = [], []
    for _ in range(repetitions):
        base = (prefill_tokens_per_s(reference, documents, batch, logits_to_keep) if reference is not None
                else None)
        speeds.append(prefill_tokens_per_s(model, documents, batch, logits_to_keep))
        if base is not None:
            ratios.append(speeds[-1] / base)
    return statistics.median(speeds), (statistics.median(ratios) if ratios else None)


@torch.inference_mode()
def decode_tokens_per_s(model, prompt: list[int], new_tokens: int = 32) -> float:
    """Greedy generation with the KV cache: new tokens per second after the prompt's prefill."""
    device = next(model.parameters()).device
    x = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)  # prefill and warm-up, excluded below

    def seconds(tokens: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        _synchronize(device)
        return time.perf_counter() - start
    full, prefill = seconds(1 + new_tokens), seconds(1)
    return new_tokens / max(full - prefill, 1e-9)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def read_texts(paths: list[str]) -> dict[str, list[Document]]:
    """Each evaluation text's documents, read (and so checked) before any model loads."""
    return {path: read_corpus(path) for path in paths}


def tokenize_texts(texts: dict[str, list[Document]], tokenizer, max_tokens: int,
                   vocab_size: int) -> dict[str, list[list[int]]]:
    """Each evaluation text's non-empty documents as token ids, or a one-line error: callers check them with
    the config and tokenizer alone, before any weights load."""
    tokenized = {}
    for path, documents in texts.items():
        docs = [d for d in tokenize(documents, tokenizer, max_tokens, vocab_size) if d]
        if not any(len(d) >= 2 for d in docs):  # perplexity needs a token to predict from the one before
            raise CusprunError(f"{path}: no document with at least 2 tokens")
        tokenized[path] = docs
    return tokenized


def evaluate(model, tokenized: dict[str, list[list[int]]], decode_tokens: int, model_name: str,
             quiet: bool = False, reference=None) -> dict:
    """Perplexity per text (``tokenized``: :func:`tokenize_texts`, made once for every model of a run),
    parameter count, prefill and decode speed.

    With a ``reference`` model (the dense model an expert came from), also ``prefill_speedup``: the median,
    over three repetitions, of the model's prefill speed over the reference's, timed right before it on the
    same documents (:func:`paired_prefill`)."""
    files, all_docs = {}, []
    with item_bar(sum(map(len, tokenized.values())), f"eval {model_name}", "doc", quiet) as bar:
        for path, docs in tokenized.items():
            ppl, n = perplexity(model, docs, on_doc=bar.update)
            files[path] = {"perplexity": ppl, "tokens": n}
            all_docs.extend(docs)
    prompt = next(d for d in all_docs)[:64]
    # the median of three: one timing on a small CPU moves by 10-20% (and more when the dense model is first)
    prefill, speedup = paired_prefill(model, all_docs[:8], 3, reference)
    result = {"model": model_name, "params": parameter_count(model), "files": files,
              "prefill_tokens_per_s": prefill,
              "decode_tokens_per_s": decode_tokens_per_s(model, prompt, decode_tokens)}
    if speedup is not None:
        result["prefill_speedup"] = speedup
    return result

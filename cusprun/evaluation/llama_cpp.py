"""Perplexity and speed of a GGUF file in llama.cpp (through llama-cpp-python), measured on the same token ids
as :mod:`cusprun.evaluation.evaluate`, so the two engines compare document by document."""

from __future__ import annotations

import math
import time

import numpy as np

F32 = 0  # GGML_TYPE_F32: a KV cache that rounds nothing (llama.cpp's default F16 cache moves logits ~2e-3)


def open_gguf(path, n_ctx: int, logits_all: bool = False, f32_cache: bool = True, threads: int | None = None):
    """A llama_cpp.Llama for ``path``: one sequence of up to ``n_ctx`` tokens, no log output."""
    import llama_cpp

    cache = {"type_k": F32, "type_v": F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                           verbose=False, n_threads=threads, n_threads_batch=threads, **cache)


def document_nll(llm, ids: list[int]) -> float:
    """Σ -log p(ids[t+1] | ids[:t+1]) over one document, in float64 from llama.cpp's logits."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)  # [len - 1, vocab]
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def perplexities(path, documents: list[list[int]], f32_cache: bool = True) -> list[float]:
    """Each document's perplexity in llama.cpp (documents of at least 2 tokens), one context for all."""
    llm = open_gguf(path, max(len(d) for d in documents), logits_all=True, f32_cache=f32_cache)
    try:
        return [math.exp(document_nll(llm, ids) / (len(ids) - 1)) for ids in documents]
    finally:
        llm.close()


def perplexity(path, documents: list[list[int]], f32_cache: bool = True) -> float:
    """Token-weighted perplexity over the documents, as :func:`cusprun.evaluation.evaluate.perplexity`."""
    docs = [d for d in documents if len(d) >= 2]
    llm = open_gguf(path, max(len(d) for d in docs), logits_all=True, f32_cache=f32_cache)
    try:
        nll = sum(document_nll(llm, ids) for ids in docs)
    finally:
        llm.close()
    return math.exp(nll / sum(len(d) - 1 for d in docs))


def prefill_seconds(llm, ids: list[int]) -> float:
    """Seconds of one prefill of ``ids`` from an empty cache (``llm`` without logits_all: the last token's logits)."""
    llm.reset()  # the next eval drops every cached position
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def decode_seconds(llm, prompt: list[int], tokens: int) -> float:
    """Seconds of ``tokens`` single-token steps after ``prompt`` (each feeds the previous step's argmax)."""
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
    return time.perf_counter() - start


def write_and_measure(model, source, path, kind: str, tokenized: dict[str, list[list[int]]]) -> dict:
    """``model`` (a dense expert of ``source``) as a GGUF at ``path`` in ``kind`` (f32, f16, bf16 or a llama.cpp
    quantization type), the command that runs it, and llama.cpp's perplexity on each held-out text's documents."""
    from ..core.models import local_folder
    from ..formats.gguf import DTYPES, export_gguf, tokenizer_source

    tokens_from = tokenizer_source(source, local_folder(source))
    if kind in DTYPES:
        export_gguf(model, path, tokens_from, dtype=kind)
    else:
        export_gguf(model, path, tokens_from, quant=kind)
    return {"gguf": str(path), "type": kind, "run": f"llama-cli -m {path}",
            "perplexity": {text: perplexity(path, docs) for text, docs in tokenized.items()}}

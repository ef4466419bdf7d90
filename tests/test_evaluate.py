"""Perplexity: documents of one length batched together == each document alone, in float64."""

import math

import pytest
import torch

from cusprun.evaluation import evaluate
from cusprun.evaluation.evaluate import perplexity
from cusprun.formats.apply import apply
from cusprun.selection.plan import Geometry
from tests.test_dense import unit_plan
from tests.tiny import random_ids, tiny_model

LENGTHS = [5, 9, 9, 1, 9, 17, 5, 0, 9, 2]  # repeated lengths, a batch cut inside one length, too-short documents


def alone(model, documents):
    """The reference: one forward per document, log-softmax in float64, summed in document order."""
    nll, count = 0.0, 0
    for ids in documents:
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
        nll -= logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    return math.exp(nll / count), count


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch_tokens, logits_budget", [(1, None), (20, None), (4096, None), (4096, 2 * 9 * 61)])
def test_batched_perplexity_is_each_document_alone(arch, batch_tokens, logits_budget, monkeypatch):
    if logits_budget is not None:  # the logits' budget cuts the batches (2 rows of length 9), not batch_tokens
        monkeypatch.setattr(evaluate, "LOGITS_BUDGET", logits_budget)
    model = tiny_model(arch, seed=3, layers=5).double()
    dense = apply(model, unit_plan(Geometry(model.config), seed=3), "dense")  # per-layer shapes, skipped blocks
    documents = [random_ids(n, vocab=61, seed=i) for i, n in enumerate(LENGTHS)]
    for m in (model, dense):
        seen = []
        ppl, tokens = perplexity(m, documents, on_doc=seen.append, batch_tokens=batch_tokens)
        expected, expected_tokens = alone(m, documents)
        assert tokens == expected_tokens == sum(max(n - 1, 0) for n in LENGTHS if n >= 2)
        assert ppl == pytest.approx(expected, rel=1e-5)  # perplexity() takes the loss of float32 logits
        assert sum(seen) == len(documents)  # progress counts every document, the skipped ones too


@pytest.mark.parametrize("batch, logits_to_keep", [(1, 0), (2, 0), (3, 1)])
def test_prefill_forwards_batches_of_one_length(batch, logits_to_keep):
    """Documents of one length go ``batch`` rows per forward (none padded, none dropped; empty ones none), with
    every token's logits or the last ``logits_to_keep``."""
    model = tiny_model("llama", seed=1)
    seen = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (tuple(kwargs["input_ids"].shape), out.logits.shape[1])), with_kwargs=True)
    documents = [random_ids(n, vocab=61, seed=i) for i, n in enumerate(LENGTHS)]
    speed = evaluate.prefill_tokens_per_s(model, documents, batch, logits_to_keep)
    handle.remove()
    expected = []
    for length in dict.fromkeys(n for n in LENGTHS if n):  # lengths in order of first appearance
        rows = LENGTHS.count(length)
        expected += [((min(batch, rows - i), length), logits_to_keep or length) for i in range(0, rows, batch)]
    assert seen == expected
    assert math.isfinite(speed) and speed > 0

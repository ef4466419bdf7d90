"""Packed batches: a document's scores are bit-identical whatever the batch size and composition."""

import pytest
import torch

from cusprun.engine.layer_major import Scorer
from tests.tiny import random_ids, tiny_model

LENGTHS = (7, 1, 13, 4, 9)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("measure", ["block", "local"])
def test_scores_do_not_depend_on_batching(arch, measure, monkeypatch):
    monkeypatch.setenv("CUSPRUN_BACKEND", "torch")
    model = tiny_model(arch, seed=3)
    docs = [random_ids(n, seed=10 + n) for n in LENGTHS]
    alone = Scorer(model, measure, batch_tokens=1).score_documents(docs)  # one document per batch
    together = Scorer(model, measure, batch_tokens=10**6).score_documents(docs)  # all in one batch
    some = Scorer(model, measure, batch_tokens=14).score_documents(docs)  # [7, 1], [13], [4, 9]
    order = [3, 0, 4, 2, 1]
    shuffled = Scorer(model, measure, batch_tokens=17).score_documents([docs[i] for i in order])
    assert sorted(alone) == sorted(together)
    for name, ref in alone.items():
        assert not ref.isnan().any(), name
        assert torch.equal(together[name], ref), name
        assert torch.equal(some[name], ref), name
        assert torch.equal(shuffled[name], ref[order]), name


def test_batches_follow_the_token_budget():
    scorer = Scorer(tiny_model("llama"), "local", batch_tokens=14)
    assert scorer.batches([0, 1, 2, 3, 4], list(LENGTHS)) == [[0, 1], [2], [3, 4]]
    assert scorer.batches([4, 2], list(LENGTHS)) == [[4], [2]]  # 9 + 13 > 14
    assert Scorer(tiny_model("llama"), "local", batch_tokens=1).batches([0, 1], list(LENGTHS)) == [[0], [1]]
    with pytest.raises(ValueError, match="batch_tokens"):
        Scorer(tiny_model("llama"), "local", batch_tokens=0)

"""cusprun scores as a Torch-Pruning ``Importance`` (PyPI ``torch-pruning``: ``pip install cusprun[adapters]``).

    import torch_pruning as tp
    from cusprun.integrations.torch_pruning import CusprunImportance

    importance = CusprunImportance(model, german & medical)          # ScoreSets, intersected
    pruner = tp.pruner.MetaPruner(model, example_ids, importance=importance, pruning_ratio=0.25,
                                  ignored_layers=[...], output_transform=lambda out: out.logits)
    pruner.step()

How a group is scored: Torch-Pruning groups every coupled channel (an MLP channel is gate row k,
up row k and down column k). Each member that is a projection cusprun scored gives, for each of the
group's channels, the relevance R (max within-group rank fraction over documents, see
``ScoreSet.relevance``) of the neuron it removes: its row for ``prune_out_channels``, its column for
``prune_in_channels``. Members cusprun does not score (norms, element-wise ops, embeddings, lm_head)
add nothing. ``reduction="max"`` (default) takes the members' maximum, so a channel ranks low only when
it is irrelevant in every projection it touches: the rule cusprun applies to dead neurons and to the
intersection of dimensions. ``"mean"`` averages instead. A group with no scored member gets ``None``,
which Torch-Pruning skips.

Scores refer to the unpruned model, so prune in one shot (``iterative_steps=1``): reading a side of a
projection that has already lost rows or columns raises an error instead of mixing up indices.
"""

from __future__ import annotations

import torch
import torch_pruning as tp

from ..scores.scoreset import ScoreSet

REDUCTIONS = ("max", "mean")


class CusprunImportance(tp.importance.Importance):
    """Torch-Pruning importance of each channel of a dependency group, from cusprun relevance."""

    def __init__(self, model: torch.nn.Module, scores: ScoreSet, reduction: str = "max"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.relevance = scores.relevance()
        self.projections = {}  # module -> (name, original [out, in])
        for name, module in model.named_modules():
            if f"{name}.rows" in self.relevance:
                if tuple(module.weight.shape) != (self.relevance[f"{name}.rows"].numel(),
                                                  self.relevance[f"{name}.cols"].numel()):
                    raise ValueError(f"{name}: weight {tuple(module.weight.shape)} does not match the scores")
                self.projections[module] = (name, tuple(module.weight.shape))
        if not self.projections:
            raise ValueError("no projection of the model has scores (were they computed on this model?)")

    def _member(self, dep, idxs) -> torch.Tensor | None:
        """R of the neurons one group member removes, or None when cusprun does not score it."""
        entry = self.projections.get(dep.layer)
        if entry is None:
            return None
        name, (out_features, in_features) = entry
        if dep.pruning_fn == tp.prune_linear_out_channels:
            side, size, now = "rows", out_features, dep.layer.weight.shape[0]
        elif dep.pruning_fn == tp.prune_linear_in_channels:
            side, size, now = "cols", in_features, dep.layer.weight.shape[1]
        else:
            return None
        if now != size:
            raise RuntimeError(f"{name}.{side} was already pruned ({size} -> {now}); cusprun scores refer to the "
                               "unpruned model: prune in one shot (iterative_steps=1)")
        return self.relevance[f"{name}.{side}"][torch.as_tensor(idxs, dtype=torch.long)]

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        """[channels of the group's root] importance; higher = kept longer."""
        n = len(group[0].idxs)
        values, counts = torch.full((n,), -1.0, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        total = torch.zeros(n, dtype=torch.float64)
        for i, (dep, idxs) in enumerate(group):
            member = self._member(dep, idxs)
            if member is None:
                continue
            root = torch.as_tensor(group[i].root_idxs, dtype=torch.long)
            values[root] = torch.maximum(values[root], member)
            total.index_add_(0, root, member)
            counts.index_add_(0, root, torch.ones_like(member))
        if not counts.any():
            return None
        if self.reduction == "mean":
            return (total / counts.clamp_min(1)).float()
        return values.clamp_min(0).float()

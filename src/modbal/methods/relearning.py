"""Diagnosing & Re-learning (Wei, Li, Hu, ECCV 2024): re-initialise each encoder by how much it overfits.

Training is plain joint cross-entropy. Every ``reinit_epoch`` epochs (at most ``reinit_num`` times)
each encoder is diagnosed: its features on the training and the validation split are min-max scaled
to [−1, 1] and clustered by k-means (k = number of classes); the purity of the clusters against the
labels is computed on each split, and the gap g_m = |purity_train − purity_val| says how much the
encoder memorised rather than learnt. Each encoder is then pulled back towards its initial weights:
θ_m ← w_m θ_m^init + (1 − w_m) θ_m with w_m = tanh(λ g_m).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_reduce_sum, rank, unwrap, world_size
from ..model import eval_mode
from ..registry import METHODS
from .base import EpochData, Method, at_least_float32, encoder_parameters, pool_feature
from .unimodal_assist import check_weight


# -- the formulas, as pure functions ---------------------------------------------------------
def minmax_scale(x: Tensor) -> Tensor:
    """Each column mapped linearly to [−1, 1] (a constant column to −1), as a min-max scaler."""
    low, high = x.min(0).values, x.max(0).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return (x - low) / span * 2 - 1


def kmeans(x: Tensor, k: int, seed: int = 0, restarts: int = 10, iterations: int = 300) -> Tensor:
    """Cluster labels (N) of the rows of ``x`` by Lloyd's k-means from k-means++ seeds (``restarts``
    seeded starts, the lowest inertia kept); deterministic for a given ``seed``."""
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=g)]
        for _ in range(1, k):  # k-means++: the next seed with probability ∝ squared distance
            d2 = torch.cdist(x, centres).pow(2).min(1).values
            if float(d2.sum()) <= 0:
                centres = torch.cat([centres, x[torch.randint(len(x), (1,), generator=g)]])
                continue
            centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
        labels = None
        for _ in range(iterations):
            new = torch.cdist(x, centres).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = x[labels == c]
                if len(members):
                    centres[c] = members.mean(0)
        inertia = float((x - centres[labels]).pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def purity(labels: Tensor, clusters: Tensor) -> float:
    """Σ_clusters (count of the cluster's most frequent label) / N."""
    table = torch.zeros(int(clusters.max()) + 1, int(labels.max()) + 1, dtype=torch.long)
    table.index_put_((clusters.long(), labels.long()), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return float(table.max(1).values.sum()) / len(labels)


def cluster_purity(features: Tensor, labels: Tensor, k: int, restarts: int = 10) -> float:
    """The purity of k-means clusters of the min-max scaled ``features`` against ``labels``. The rows
    are first put in a canonical order (by a fixed random projection), so the result does not depend
    on the order the data came in (one process or several)."""
    x = minmax_scale(features.double())
    direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(12345), dtype=x.dtype)
    order = torch.argsort(x @ direction, stable=True)
    return purity(labels[order], kmeans(x[order], k, restarts=restarts))


def relearn_weight(purity_train: float, purity_val: float, strength: float) -> float:
    """w = tanh(λ |purity_train − purity_val|)."""
    return float(torch.tanh(torch.tensor(strength * abs(purity_train - purity_val))))


def gather_rows(x: Tensor) -> Tensor:
    """The rows of ``x`` from every rank, in rank order (each rank's may differ in number)."""
    world = world_size()
    if world <= 1:
        return x
    counts = all_reduce_sum(F.one_hot(torch.tensor(rank()), world) * len(x)).long().tolist()
    buffer = x.new_zeros(world, max(counts), *x.shape[1:])
    buffer[rank(), :len(x)] = x
    buffer = all_reduce_sum(buffer)
    return torch.cat([buffer[r, :counts[r]] for r in range(world)])


# -- the method --------------------------------------------------------------------------------
@METHODS.register("relearning")
class Relearning(Method):
    """Joint training with diagnosis by clustering purity and partial re-initialisation of encoders.

    Args:
        strength (float): λ of w = tanh(λ·gap) (>= 0). Default 3.
        reinit_epoch (int): diagnose after every ``reinit_epoch``-th epoch (0-based epoch e with e %
            reinit_epoch == 0 and e > 0; the change applies from epoch e + 1). Default 20.
        reinit_num (int): at most this many re-initialisations. Default 3.
        restarts (int): k-means starts per clustering (the lowest inertia kept). Default 10.

    The initial encoder weights are kept in the method's state (checkpoints carry them). Like the
    original, only parameters are blended (BatchNorm running statistics stay) and the optimizer's
    momentum is kept. The diagnosis reads the validation split's labels, so that split also
    chooses the best epoch (as in the original, which diagnoses on a held-out part of train).
    Statistics: ``purity_train/<m>``, ``purity_val/<m>``, ``reinit/<m>`` (w_m) of the last diagnosis.
    """

    name = "relearning"
    acts_on_encoders = True

    def __init__(self, strength: float = 3.0, reinit_epoch: int = 20, reinit_num: int = 3, restarts: int = 10) -> None:
        for key, value, low in (("reinit_epoch", reinit_epoch, 1), ("reinit_num", reinit_num, 0),
                                ("restarts", restarts, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {key}: {value!r} (must be an integer >= {low})")
        self.strength = check_weight(strength, "strength")
        self.reinit_epoch, self.reinit_num, self.restarts = reinit_epoch, reinit_num, restarts
        self.initial: dict[str, list[Tensor]] | None = None
        self.done = 0
        self._stats: dict[str, float] = {}

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.initial is None:  # a fresh run: the weights training starts from (a resume loads them)
            params = encoder_parameters(model, self.name)
            self.initial = {m: [p.detach().clone() for p in ps] for m, ps in params.items()}

    def loss(self, model: nn.Module, inputs: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        return F.cross_entropy(at_least_float32(model(inputs)), targets)

    def due(self, epoch: int) -> bool:
        """Whether the diagnosis runs before ``epoch`` (after epoch − 1 ended)."""
        last = epoch - 1
        return last > 0 and last % self.reinit_epoch == 0 and self.done < self.reinit_num

    def before_epoch(self, model: nn.Module, data: EpochData) -> None:
        if not self.due(data.epoch):
            return
        if data.val_loader is None:
            raise ValueError(f"{self.name} diagnoses on the validation split, but the loop has none")
        if self.initial is None:
            raise RuntimeError(f"{self.name}: call method.setup(model, optimizer) before training")
        train = self.features(model, data, data.train_loader)
        val = self.features(model, data, data.val_loader)
        classes = unwrap(model).fusion.num_classes
        stats = {}
        with torch.no_grad():
            for m, params in encoder_parameters(model, self.name).items():
                scores = [cluster_purity(feats[m], labels, classes, self.restarts) for feats, labels in (train, val)]
                w = relearn_weight(*scores, self.strength)
                for p, p0 in zip(params, self.initial[m]):
                    p.copy_(w * p0.to(p.device) + (1 - w) * p)
                stats.update({f"purity_train/{m}": scores[0], f"purity_val/{m}": scores[1], f"reinit/{m}": w})
        self.done += 1
        self._stats = stats

    def features(self, model: nn.Module, data: EpochData, loader: Any) -> tuple[dict[str, Tensor], Tensor]:
        """Each encoder's pooled features and the labels over ``loader`` (eval mode, all ranks)."""
        inner = unwrap(model)
        feats: dict[str, list[Tensor]] = {m: [] for m in inner.modalities}
        labels = []
        with torch.no_grad(), eval_mode(inner):
            for inputs, targets in data.batches(loader):
                for m in inner.modalities:
                    feats[m].append(at_least_float32(pool_feature(inner.encoders[m](inputs[m]))).double())
                labels.append(targets)
        return ({m: gather_rows(torch.cat(f)).cpu() for m, f in feats.items()},
                gather_rows(torch.cat(labels)).cpu())

    def statistics(self) -> dict[str, float]:
        return dict(self._stats)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "initial": self.initial, "stats": dict(self._stats)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"done", "initial", "stats"})
        done, initial = state.get("done", 0), state.get("initial")
        if unknown or isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise ValueError(f"{self.name} state: expected done (integer >= 0), initial, stats; got {sorted(state)}")
        if initial is not None and not (isinstance(initial, Mapping) and all(
                isinstance(ps, list) and all(isinstance(p, Tensor) for p in ps) for ps in initial.values())):
            raise ValueError(f"{self.name} state: initial must map modalities to lists of tensors")
        self.done, self._stats = done, dict(state.get("stats", {}))
        self.initial = None if initial is None else {m: [p.clone() for p in ps] for m, ps in initial.items()}

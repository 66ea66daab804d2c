"""modbal's MSES against a transcription of the AGM authors' code (``run/CREMAD_main.py``,
``AVMNIST_main.py``, ``URFunny_main.py``), written out here: the smoothed loss is
0.6·(previous raw loss) + 0.4·(current raw loss), the first epoch's raw loss at first; a new strict
minimum saves the whole model and the optimizer; a modality stops when epoch − argmin > patience,
and then the whole model and the optimizer are loaded from its best epoch and the gradients of its
encoder and own classifier are multiplied by 0 from then on. The validation losses are given (the
same sequences to both sides) so the rules are exercised at chosen epochs, while the models train
for real between them; modbal only builds the model and runs its method."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from _original_heads import MLPEncoder, own_outputs, scale_own_gradients, toy_data

from modbal.fusions.concat import ConcatFusion
from modbal.fusions.sum import SumFusion
from modbal.methods import MSES
from modbal.model import MultimodalModel
from modbal.train.evaluate import evaluate

C, PATIENCE, EPOCHS = 3, 3, 12
FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "mlp": MLPFusion}
# raw validation losses per 0-based epoch. audio: the 2-tap mean is lowest at epoch 3 (an EMA of the
# smoothed value would pick epoch 5), so audio stops after epoch 7 (7 − 3 > 3); visual improves
# until epoch 7 and stops after epoch 11; text (M = 3) is best at epoch 2 and stops after epoch 6.
LOSSES = {
    "audio": [1.0, 0.8, 0.75, 0.5, 0.9, 0.45, 0.97, 0.9, 0.9, 0.9, 0.9, 0.9],
    "visual": [1.2, 1.1, 1.0, 0.95, 0.9, 0.85, 0.84, 0.83, 0.9, 1.0, 1.0, 1.0],
    "text": [1.0, 0.9, 0.7, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1],
}
STOPS = {"audio": 7, "visual": 11, "text": 6}
BEST = {"audio": 3, "visual": 7, "text": 2}


def build(fusion, modalities, seed=0):
    torch.manual_seed(seed)
    dims = dict(zip(modalities, (5, 4, 3)))
    encoders = {m: MLPEncoder(dims[m]) for m in modalities}
    return MultimodalModel(encoders, FUSIONS[fusion]({m: (6,) for m in modalities}, C)).double()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.05)


class OriginalMSES:
    """The code's per-epoch bookkeeping (1-based epochs there; 0-based here, the same rules)."""

    def __init__(self, modalities, patience):
        self.modalities, self.patience = modalities, patience
        self.ratio = {m: 1.0 for m in modalities}
        self.min_loss, self.argmin, self.bre = {}, {}, {}
        self.ckpt = {}
        self.stopped_at = {}

    def epoch_end(self, epoch, val_loss, model, optimizer):
        first = not self.bre
        batch_loss = {}
        for m in self.modalities:
            if first:
                self.min_loss[m], self.argmin[m] = val_loss[m], epoch
                batch_loss[m] = val_loss[m]
            else:
                batch_loss[m] = 0.6 * self.bre[m] + 0.4 * val_loss[m]
            self.bre[m] = val_loss[m]
        if first:  # the code has no file for its first epoch; modbal keeps one (see docs)
            self.ckpt[epoch] = copy.deepcopy({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()})
        for m in self.modalities:
            if self.min_loss[m] > batch_loss[m]:
                self.min_loss[m], self.argmin[m] = batch_loss[m], epoch
                self.ckpt[epoch] = copy.deepcopy({"state_dict": model.state_dict(),
                                                  "optimizer": optimizer.state_dict()})
        for m in self.modalities:
            if epoch - self.argmin[m] > self.patience and self.ratio[m] != 0.0:
                self.ratio[m] = 0.0
                ckpt = copy.deepcopy(self.ckpt[self.argmin[m]])
                model.load_state_dict(ckpt["state_dict"])
                optimizer.load_state_dict(ckpt["optimizer"])
                self.stopped_at[m] = epoch
        return all(r == 0.0 for r in self.ratio.values())  # the code exit()s here


def train_epoch(model, opt, data, method=None, original=None):
    for inputs, y in data:
        opt.zero_grad()
        if method is not None:
            method.loss(model, inputs, y).backward()
            method.after_backward(model)
        else:
            F.cross_entropy(model(inputs), y).backward()
            for m, ratio in original.ratio.items():
                scale_own_gradients(model, m, 1.0 * ratio)  # mses_audio_coeff = 1.0 * audio_lr_ratio
        opt.step()


def assert_same(model, reference, opt, ref_opt, where):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"{where}: {name}")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        a, b = opt.state.get(p, {}).get("momentum_buffer"), ref_opt.state.get(q, {}).get("momentum_buffer")
        assert (a is None) == (b is None), f"{where}: momentum of {name}"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{where}: momentum of {name}")


@pytest.mark.parametrize("fusion, modalities", [
    ("sum", ("audio", "visual")), ("concat", ("audio", "visual")), ("mlp", ("audio", "visual")),
    ("sum", ("audio", "visual", "text")),
])
def test_stopping_restore_and_freezing_match_the_agm_code(fusion, modalities):
    model = build(fusion, modalities)
    reference = copy.deepcopy(model)
    opt, ref_opt = sgd(model), sgd(reference)
    data = [toy_data(modalities, 32, C, seed=s) for s in (1, 2)]
    method = MSES(patience=PATIENCE)
    original = OriginalMSES(modalities, PATIENCE)
    source = "mono" if fusion == "mlp" else "head"
    for epoch in range(EPOCHS):
        method.on_epoch_start(epoch)
        train_epoch(reference, ref_opt, data, original=original)
        train_epoch(model, opt, data, method=method)
        assert_same(model, reference, opt, ref_opt, f"epoch {epoch}, trained")
        losses = {m: LOSSES[m][epoch] for m in modalities}
        done = original.epoch_end(epoch, losses, reference, ref_opt)
        metrics = {"acc": epoch / 100, **{f"{source}_loss/{m}": v for m, v in losses.items()}}
        method.on_epoch_end(epoch, metrics, model, opt)
        assert_same(model, reference, opt, ref_opt, f"epoch {epoch}, after the MSES rules")
        stopping = [m for m, t in original.stopped_at.items() if t == epoch]
        # a restore flags the changed weights (the loop then validates again, and clears the flag)
        assert method.changed_weights == bool(stopping) and metrics["acc"] == epoch / 100
        method.changed_weights = False
        assert method.stopped == set(original.stopped_at) and method.should_stop == done
        if done:
            break
    assert original.stopped_at == {m: STOPS[m] for m in modalities} and epoch == STOPS["visual"]
    assert method.best_epochs() == {m: BEST[m] for m in modalities}


def test_own_head_loss_is_what_evaluate_reports():
    modalities = ("audio", "visual")
    for fusion, source in (("concat", "head"), ("sum", "head"), ("mlp", "mono")):
        model = build(fusion, modalities)
        inputs, y = toy_data(modalities, 50, C, seed=5)
        metrics = evaluate(model, [(inputs, y)])
        model.eval()
        with torch.no_grad():
            feats = {m: model.encoders[m](inputs[m]) for m in modalities}
            outs = own_outputs(model, feats, {m: torch.zeros_like(inputs[m][:1]) for m in modalities})
        for m in modalities:
            # the code averages batch means of the head's CE; one batch here
            assert metrics[f"{source}_loss/{m}"] == pytest.approx(float(F.cross_entropy(outs[m], y)), rel=1e-6)
            assert metrics[f"{source}_acc/{m}"] == pytest.approx(float((outs[m].argmax(1) == y).double().mean()))
        assert (f"head_acc/{modalities[0]}" in metrics) == (fusion != "mlp")


def test_resume_with_snapshots_ends_as_the_uninterrupted_run():
    modalities = ("audio", "visual")
    data = [toy_data(modalities, 32, C, seed=s) for s in (1, 2)]

    def run(model, opt, method, epochs):
        for epoch in epochs:
            method.on_epoch_start(epoch)
            train_epoch(model, opt, data, method=method)
            method.on_epoch_end(epoch, {f"head_loss/{m}": LOSSES[m][epoch] for m in modalities}, model, opt)

    model = build("sum", modalities)
    opt, method = sgd(model), MSES(patience=PATIENCE)
    run(model, opt, method, range(5))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), method.state_dict()))
    assert set(saved[2]["snapshots"]) == {BEST["audio"], 4}  # audio's best (3) and visual's (4 so far)
    run(model, opt, method, range(5, EPOCHS))

    fresh = build("sum", modalities, seed=7)
    fresh.load_state_dict(saved[0])
    fresh_opt, fresh_method = sgd(fresh), MSES(patience=PATIENCE)
    fresh_method.load_state_dict(saved[2])
    fresh_method.setup(fresh, fresh_opt)
    fresh_opt.load_state_dict(saved[1])
    run(fresh, fresh_opt, fresh_method, range(5, EPOCHS))
    assert fresh_method.stopped == method.stopped == {"audio", "visual"}
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name

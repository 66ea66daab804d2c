"""modbal's MSLR against a transcription of the AGM authors' code (``run/CREMAD_main.py``,
``AVMNIST_main.py``, ``URFunny_main.py``), written out here: the ratio stays 1 while the first 5
epochs fill the memory, then ratio = acc(t) / mean(memory) with the current epoch excluded and the
memory sliding; in training, inside the window (1-based epochs, inclusive), the gradients of the
modality's encoder and its own classifier are multiplied by initial factor × ratio; the accuracy
is the validation accuracy of the modality's own head. modbal only builds the model, evaluates it
and runs its method; every expected value comes from the transcription."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fusions import MLPFusion
from _original_heads import MLPEncoder, own_outputs, scale_own_gradients, toy_data

from modbal.fusions.concat import ConcatFusion
from modbal.fusions.sum import SumFusion
from modbal.methods import MSLR
from modbal.model import MultimodalModel
from modbal.train.evaluate import evaluate

C = 3
FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "mlp": MLPFusion}


def build(fusion, modalities):
    torch.manual_seed(0)
    dims = dict(zip(modalities, (5, 4, 3)))
    encoders = {m: MLPEncoder(dims[m]) for m in modalities}
    return MultimodalModel(encoders, FUSIONS[fusion]({m: (6,) for m in modalities}, C)).double()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def own_accuracy(model, inputs, y):
    """``accuracy_a = sum(acc_a) / sum(num)`` of the own outputs, model in eval mode."""
    model.eval()
    with torch.no_grad():
        feats = {m: model.encoders[m](inputs[m]) for m in model.modalities}
        zeros = {m: torch.zeros_like(inputs[m][:1]) for m in model.modalities}
        outs = own_outputs(model, feats, zeros)
    model.train()
    return {m: float((outs[m].argmax(1) == y).double().mean()) for m in model.modalities}


@pytest.mark.parametrize("fusion, modalities", [
    ("sum", ("audio", "visual")), ("concat", ("audio", "visual")), ("mlp", ("audio", "visual")),
    ("sum", ("audio", "visual", "text")),
])
def test_training_matches_the_agm_code_epoch_by_epoch(fusion, modalities):
    model = build(fusion, modalities)
    reference = copy.deepcopy(model)
    opt, ref_opt = sgd(model), sgd(reference)
    train = [toy_data(modalities, 32, C, seed=s) for s in (1, 2)]
    val_inputs, val_y = toy_data(modalities, 60, C, seed=9)
    init = dict(zip(modalities, (1.3, 0.7, 0.9)))
    epochs, start, end = 11, 1, 9  # modbal [1, 9) over 0-based epochs = the code's starts=2, ends=9 (1-based)
    method = MSLR(initial_factors=init, start_epoch=start, end_epoch=end)

    # the AGM code's state
    lr_ratio = {m: 1.0 for m in modalities}
    lr_memory = {m: [] for m in modalities}
    starts, ends = start + 1, end
    used_ratios = set()
    for epoch in range(1, epochs + 1):  # the code's 1-based epochs; modbal's epoch is epoch - 1
        method.on_epoch_start(epoch - 1)
        for inputs, y in train:
            ref_opt.zero_grad()
            F.cross_entropy(reference(inputs), y).backward()
            if starts <= epoch <= ends:
                for m in modalities:
                    coeff = init[m] * lr_ratio[m]
                    scale_own_gradients(reference, m, coeff)
                    used_ratios.add(round(lr_ratio[m], 12))
            ref_opt.step()

            opt.zero_grad()
            method.loss(model, inputs, y).backward()
            method.after_backward(model)
            opt.step()
        accuracy = own_accuracy(reference, val_inputs, val_y)
        for m in modalities:  # after validation
            if len(lr_memory[m]) < 5:
                lr_memory[m].append(accuracy[m])
            else:
                lr_ratio[m] = accuracy[m] / np.mean(lr_memory[m])
                lr_memory[m] = lr_memory[m][1:]
                lr_memory[m].append(accuracy[m])

        metrics = evaluate(model, [(val_inputs, val_y)])
        source = "mono" if fusion == "mlp" else "head"
        for m in modalities:
            assert metrics[f"{source}_acc/{m}"] == pytest.approx(accuracy[m], abs=1e-12), (epoch, m)
        method.on_epoch_end(epoch - 1, metrics, model, opt)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"epoch {epoch}: {name}")
        nxt = epoch + 1
        expected = {m: init[m] * lr_ratio[m] if starts <= nxt <= ends else 1.0 for m in modalities}
        assert method.factors() == pytest.approx(expected, rel=1e-12), epoch
    assert len(used_ratios) > 2  # the ratio left 1 and moved inside the window


def test_resume_continues_the_schedule():
    modalities = ("audio", "visual")
    model = build("sum", modalities)
    method = MSLR(initial_factors={"audio": 1.3})
    accs = [0.4, 0.5, 0.45, 0.6, 0.55, 0.7, 0.65, 0.72]
    for t in range(4):
        method.on_epoch_end(t, {f"head_acc/{m}": accs[t] for m in modalities}, model, None)
    resumed = MSLR(initial_factors={"audio": 1.3})
    resumed.load_state_dict(method.state_dict())
    for t in range(4, 8):
        for mth in (method, resumed):
            mth.on_epoch_end(t, {f"head_acc/{m}": accs[t] for m in modalities}, model, None)
        assert resumed.factors() == method.factors()
    # the code: after epoch 8 (1-based), ratio = a_8 / mean(a_3..a_7)
    assert resumed.factors()["audio"] == pytest.approx(1.3 * 0.72 / np.mean(accs[2:7]), rel=1e-12)

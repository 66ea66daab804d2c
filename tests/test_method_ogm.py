"""OGM (TPAMI 2024) against the authors' training step (BML_TPAMI2024, code/main.py, ``train`` with
``--use_modulation``; scores from ``Classifier.forward``), written here.

The reference scores both modalities from the concatenation head's slices (detached weights, half
the bias), skips modulation while epoch ≤ 5, and inside the window multiplies the gradient of every
4-D (conv weight) encoder tensor by its coefficient, adding Gaussian noise of the gradient's
standard deviation + 1e-8 for OGM_GE; with OGM+ the weaker modality's coefficient is 4. The noise is
read from a generator seeded like modbal's, tensor by tensor in model order (the original draws
from the global generator in the same order).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _method_runs import assert_resume_exact, plain_step
from torch import nn

from modbal import METHODS, MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods.opm import OGM

C = 4


def make_model(seed=0):
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten()) for m in "av"}
    return MultimodalModel(encoders, ConcatFusion({m: (3,) for m in "av"}, C)).double()


def batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"a": 2 * torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64),
         "v": torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)}
    return x, torch.randint(C, (n,), generator=g)


class OriginalStep:
    def __init__(self, model, alpha, modulation, plus, seed, lr):
        self.model, self.alpha, self.modulation, self.plus = model, alpha, modulation, plus
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, epoch, x, y, starts=0, ends=60):
        model = self.model
        self.opt.zero_grad()
        out_1, out_2 = model.encoders["a"](x["a"]), model.encoders["v"](x["v"])
        w, b = model.fusion.head.weight.clone().detach(), model.fusion.head.bias.clone().detach()
        t1 = torch.mm(out_1, torch.transpose(w[:, :3], 0, 1)) + b / 2
        t2 = torch.mm(out_2, torch.transpose(w[:, 3:], 0, 1)) + b / 2
        with torch.no_grad():
            performance_1 = sum([torch.softmax(t1, 1)[i][int(y[i].item())] for i in range(t1.shape[0])])
            performance_2 = sum([torch.softmax(t2, 1)[i][int(y[i].item())] for i in range(t2.shape[0])])
        out = model.fusion({"a": out_1, "v": out_2})
        F.cross_entropy(out, y).backward()
        self.coeffs = (1.0, 1.0)
        warm_up = 1 if epoch <= 5 else 0
        if warm_up == 0:
            radio_1 = float(performance_1 / performance_2)
            radio_2 = float(performance_2 / performance_1)
            if self.plus:
                coeff_1, coeff_2 = (1, 4) if radio_1 > 1 else (4, 1)
            elif radio_1 > 1:
                coeff_1, coeff_2 = 1 - math.tanh(self.alpha * max(radio_1, 0)), 1
            else:
                coeff_1, coeff_2 = 1, 1 - math.tanh(self.alpha * max(radio_2, 0))
            if starts <= epoch <= ends:
                self.coeffs = (coeff_1, coeff_2)
                for enc, coeff in (("a", coeff_1), ("v", coeff_2)):
                    for parms in model.encoders[enc].parameters():
                        if parms.grad is not None and len(parms.grad.size()) == 4:
                            if self.modulation == "OGM_GE":
                                std = parms.grad.std().item() + 1e-8
                                noise = torch.randn(parms.grad.shape, generator=self.gen, dtype=parms.grad.dtype)
                                parms.grad = parms.grad * coeff + noise * std
                            else:
                                parms.grad *= coeff
        self.opt.step()


@pytest.mark.parametrize("modulation,plus", [("OGM", False), ("OGM_GE", False), ("OGM_GE", True)])
def test_matches_the_original_step(modulation, plus):
    ours = make_model()
    theirs = copy.deepcopy(ours)
    method = OGM(ge=modulation == "OGM_GE", boost=4.0 if plus else None, seed=11)
    ref = OriginalStep(theirs, 0.8, modulation, plus, 11, lr=0.1)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    modulated = 0
    for epoch, step in [(4, 0), (5, 1), (6, 2), (6, 3), (7, 4), (7, 5)]:
        method.on_epoch_start(epoch)
        x, y = batch(seed=step)
        plain_step(ours, method, opt, x, y)
        ref.step(epoch, x, y)
        coefs = tuple(method.statistics()[f"coef/{m}"] for m in "av")
        assert coefs == pytest.approx(ref.coeffs, rel=1e-9)
        modulated += ref.coeffs != (1.0, 1.0)
        for name, p in theirs.state_dict().items():
            # modbal takes the noise's std in float32: agreement to float32 precision with noise
            tol = {"rtol": 1e-6, "atol": 1e-9} if modulation == "OGM_GE" else {"rtol": 1e-9, "atol": 1e-11}
            torch.testing.assert_close(ours.state_dict()[name], p, msg=name, **tol)
    assert modulated == 4  # every step after the warm-up


def test_registered_defaults_and_errors():
    method = METHODS.create("ogm")
    assert isinstance(method, OGM) and method.alpha == 0.8 and (method.start_epoch, method.end_epoch) == (6, 61)
    with pytest.raises(ValueError, match="Invalid boost"):
        OGM(boost=0)
    state = method.state_dict()
    OGM().load_state_dict(state)


def test_runner_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    assert_resume_exact(tmp_path, monkeypatch, {"name": "ogm", "start_epoch": 0, "boost": 4.0, "seed": 3})

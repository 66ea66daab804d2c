"""A model of one's own, used as it is with modbal's methods through ``import modbal``."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import modbal
from modbal.metrics.shape import model_shape_scores
from modbal.registry import METHODS

DIMS = {"audio": 6, "image": 10}


class Head(nn.Module):
    """The user's fusion: concatenate the features, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 3)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat([features["audio"], features["image"]], dim=-1))


class UserNet(nn.Module):
    """A user's model: no modbal base class, just `encoders` and `fusion` attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, 16), nn.ReLU()) for m, d in DIMS.items()})
        self.fusion = Head()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion({m: self.encoders[m](inputs[m]) for m in self.encoders})


class NoSplitNet(nn.Module):
    """A model whose parts have other names: the methods cannot find them by themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_net, self.image_net = nn.Linear(6, 16), nn.Linear(10, 16)
        self.head = Head()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head({"audio": self.audio_net(inputs["audio"]), "image": self.image_net(inputs["image"])})


def batches(n: int = 4, seed: int = 0) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (16,), generator=g)
        inputs = {m: torch.randn(16, d, generator=g) + y[:, None].float() for m, d in DIMS.items()}
        out.append((inputs, y))
    return out


def train(model: nn.Module, method: modbal.Method, steps: list) -> list[float]:
    """The README's own loop, as a user writes it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for inputs, targets in steps:
        loss = method.loss(model, inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        method.after_backward(model)
        optimizer.step()
        method.after_step(model)
        losses.append(loss.item())
    return losses


def test_every_method_class_is_exported_from_modbal():
    for name in modbal.methods.__all__:
        assert getattr(modbal, name) is getattr(modbal.methods, name)
        assert name in modbal.__all__
    for name in ("OGMGE", "MSLR", "MSES", "UniModal", "AGM", "Joint"):
        assert isinstance(getattr(modbal, name), type)


@pytest.mark.parametrize("make", [lambda: modbal.AGM(alpha=1.0), lambda: modbal.OGMGE(alpha=0.5)],
                         ids=["agm", "ogm_ge"])
def test_user_module_trains_as_it_is(make):
    torch.manual_seed(0)
    net = UserNet()
    reference = modbal.MultimodalModel(copy.deepcopy(net.encoders), copy.deepcopy(net.fusion))
    before = copy.deepcopy(net.state_dict())
    method = make()
    losses = train(net, method, batches())
    assert all(torch.isfinite(torch.tensor(losses)))
    stats = method.statistics()
    assert {f"{k}/{m}" for m in DIMS for k in ("kappa" if method.name == "agm" else "coef",)} <= set(stats)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    # the same steps on modbal's own model class with the same weights give the same weights:
    # the user's module got exactly the method's treatment
    train(reference, make(), batches())
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_with_a_user_module_through_the_loop(name):
    params = inspect.signature(METHODS.get(name)).parameters
    kwargs = {"modality": "audio"} if "modality" in params else {}
    required = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        pytest.skip(f"{name} needs {required} (trained models), beyond this test's scope")
    torch.manual_seed(0)
    net = UserNet()
    # methods with heads of their own size them from these two attributes of the fusion
    net.fusion.feature_shapes, net.fusion.num_classes = {m: (16,) for m in DIMS}, 3
    method = METHODS.create(name, **kwargs)
    # ... and register them on the model: give them the view (it shares net's weights), so the
    # heads live on it and its parameters() are net's plus theirs
    model = modbal.adapt(net) if method.build_modules(modbal.adapt(net)) else net
    method.attach(model)
    optimizer = torch.optim.SGD(method.param_groups(model), lr=0.05)
    method.setup(model, optimizer)
    data = batches(3)
    before = copy.deepcopy(net.state_dict())
    state = modbal.train.fit(model, method, optimizer, data, data, epochs=2)
    assert state.epoch >= 1 and state.best_epoch >= 0
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
    metrics = modbal.train.evaluate(model, data, prepare=method.prepare_inputs)
    assert {"acc", "mono_acc/audio", "mono_acc/image"} <= set(metrics)
    shape = model_shape_scores(model, data)
    assert set(shape["shapley"]) == set(DIMS)


def test_module_without_the_split_gets_a_clear_error():
    net, (inputs, targets) = NoSplitNet(), batches(1)[0]
    for method in (modbal.AGM(), modbal.OGMGE()):
        with pytest.raises(TypeError, match=r"NoSplitNet has no `encoders` and no `fusion`.*modbal.adapt"):
            method.loss(net, inputs, targets)
    with pytest.raises(TypeError, match=r"no `encoders`"):
        modbal.MSLR().param_groups(net)
    # naming the parts explicitly adapts it; the view shares the module's parameters
    model = modbal.adapt(net, encoders={"audio": net.audio_net, "image": net.image_net}, fusion=net.head)
    assert {id(p) for p in model.parameters()} == {id(p) for p in net.parameters()}
    before = net.head.linear.weight.detach().clone()
    train(model, modbal.AGM(), batches(2))
    assert not torch.equal(before, net.head.linear.weight)


def test_parameters_outside_encoders_and_fusion_are_refused():
    net = UserNet()
    net.temperature = nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match="temperature"):
        modbal.adapt(net)
    net.temperature.requires_grad_(False)  # frozen: never trained anyway, so allowed
    assert modbal.adapt(net).modalities == ("audio", "image")

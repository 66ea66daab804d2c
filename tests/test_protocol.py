"""The method protocol's shared parts: method-owned modules (attach, aux forward, state), the
epoch-level pass (when the loop calls it, with what), per-loss encoder gradients."""
import json

import pytest
import torch
from torch import nn

from modbal import MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods import EpochData, Method
from modbal.methods.base import ModalityHead, encoder_gradients, method_modules
from modbal.train import LoopState, evaluate_run, fit, run_experiment
from modbal.train import run as run_module


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    encoders = {"a": nn.Sequential(nn.Linear(3, 4), nn.Tanh()), "b": nn.Sequential(nn.Linear(5, 4), nn.Tanh())}
    return MultimodalModel(encoders, ConcatFusion({"a": (4,), "b": (4,)}, 3)).to(dtype)


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({"a": torch.randn(n, 3, generator=g, dtype=torch.float64),
             "b": torch.randn(n, 5, generator=g, dtype=torch.float64)}, torch.randint(3, (n,), generator=g))


class WithHeads(Method):
    name = "with_heads"

    def __init__(self, width=4):
        self.width = width

    def build_modules(self, model):
        return {m: ModalityHead((self.width,), 3) for m in model.modalities}

    def loss(self, model, inputs, targets):
        heads = method_modules(model, self.name)
        logits, outs = model(inputs, aux=lambda f: [heads[m](f[m]) for m in model.modalities])
        return sum(nn.functional.cross_entropy(o, targets) for o in (logits, *outs))


# -- method-owned modules ---------------------------------------------------------------------------
def test_attach_registers_modules_on_the_model_once():
    model = make_model()
    method = WithHeads()
    with pytest.raises(RuntimeError, match=r"call method.attach\(model\) before building the optimizer"):
        method.loss(model, *batch())
    n_before = len(list(model.parameters()))
    method.attach(model)
    heads = method_modules(model)
    assert isinstance(heads, nn.ModuleDict) and set(heads) == {"a", "b"}
    assert heads["a"].linear.weight.dtype == torch.float64  # moved to the model's dtype (and device)
    assert len(list(model.parameters())) == n_before + 4  # the optimizer, DDP and .to() see them
    weight = heads["a"].linear.weight.detach().clone()
    method.attach(model)  # idempotent: the modules (and their trained weights) stay
    assert torch.equal(method_modules(model)["a"].linear.weight, weight)
    with pytest.raises(ValueError, match="another structure"):
        WithHeads(width=5).attach(model)
    Method().attach(model)  # a method without modules leaves a model alone


def test_a_module_of_ones_own_gets_its_modules_through_its_view():
    from modbal import UniModalAssist, adapt

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoders = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)})
            self.fusion = nn.Linear(8, 3)

    net = Net()
    with pytest.raises(ValueError, match="feature_shapes.*and num_classes; Linear lacks them"):
        UniModalAssist().attach(adapt(net))
    net.fusion.feature_shapes, net.fusion.num_classes = {"a": (4,), "b": (4,)}, 3
    with pytest.raises(ValueError, match=r"not a MultimodalModel: train its view, model = modbal.adapt\(model\)"):
        UniModalAssist().attach(net)
    view = adapt(net)
    UniModalAssist().attach(view)
    assert len(list(view.parameters())) == len(list(net.parameters())) + 4


def test_aux_runs_inside_forward_and_changes_nothing_else():
    model = make_model()
    x, _ = batch()
    logits, feats = model(x, aux=lambda f: f)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(feats["a"], model.encoders["a"](x["a"]))
    out, feats = model(x, shapley="features", aux=lambda f: f["b"])
    torch.testing.assert_close(out.mono, model(x, shapley="features").mono)
    torch.testing.assert_close(feats, model.encoders["b"](x["b"]))


def test_modality_head_pools_token_axes():
    head = ModalityHead((7, 4), 3)
    x = torch.randn(2, 7, 4)
    torch.testing.assert_close(head(x), head.linear(x.mean(1)))


# -- per-loss gradients ----------------------------------------------------------------------------------
def test_encoder_gradients_equal_separate_backward_passes_and_leave_grad_alone():
    model = make_model()
    x, y = batch()
    feats = model.encode(x)
    losses = {"fused": nn.functional.cross_entropy(model.fusion(feats), y), "a_only": feats["a"].pow(2).mean()}
    grads = encoder_gradients(model, losses)
    assert all(p.grad is None for p in model.parameters())
    params = [*model.encoders["a"].parameters(), *model.encoders["b"].parameters()]
    for name, loss in losses.items():
        model.zero_grad(set_to_none=True)  # one backward per loss on a fresh graph
        f = model.encode(x)
        again = nn.functional.cross_entropy(model.fusion(f), y) if name == "fused" else f["a"].pow(2).mean()
        again.backward()
        expected = [q.grad.clone() if q.grad is not None else torch.zeros_like(q) for q in params]
        for g, e in zip(grads[name], expected):
            torch.testing.assert_close(g, e)
    assert all(float(g.abs().sum()) == 0 for g in grads["a_only"][2:])  # encoder b not reached: zeros
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()  # the graph was kept for the ordinary backward


# -- the epoch-level pass -----------------------------------------------------------------------------------
class Recorder(Method):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def on_epoch_start(self, epoch):
        self.calls.append(("start", epoch))

    def before_epoch(self, model, data):
        assert isinstance(data, EpochData) and data.optimizer is not None and data.val_loader is not None
        n = sum(len(y) for _, y in data.batches(data.train_loader))
        self.calls.append(("pass", data.epoch, n, str(data.device)))

    def loss(self, model, inputs, targets):
        self.calls.append(("loss",))
        return nn.functional.cross_entropy(model(inputs), targets)


def test_fit_calls_before_epoch_once_per_epoch_with_the_loaders():
    model = make_model(torch.float32)
    loader = [({m: v.float() for m, v in x.items()}, y) for x, y in (batch(seed=s) for s in range(3))]
    method = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(model, method, opt, loader, loader, 2, device="cpu")
    passes = [c for c in method.calls if c[0] == "pass"]
    assert passes == [("pass", 0, 18, "cpu"), ("pass", 1, 18, "cpu")]
    first = method.calls.index(("start", 1))
    assert method.calls[first + 1][:2] == ("pass", 1) and method.calls[first + 2] == ("loss",)
    method.calls.clear()  # resumed inside epoch 1: no pass again (its result lives in the state)
    fit(model, method, opt, loader, loader, 3, device="cpu", state=LoopState(epoch=1, step_in_epoch=1))
    assert [c[:2] for c in method.calls if c[0] == "pass"] == [("pass", 2)]
    capped = Recorder()
    fit(model, capped, opt, loader, loader, 1, device="cpu", max_steps_per_epoch=2)
    assert [c for c in capped.calls if c[0] == "pass"] == [("pass", 0, 12, "cpu")]


# -- the runner ----------------------------------------------------------------------------------------------
def test_runner_checkpoints_and_evaluates_the_methods_modules(tmp_path, monkeypatch):
    config = {
        "dataset": {"name": "synthetic", "num_train": 64, "num_val": 32, "num_test": 32, "num_classes": 3,
                    "bayes_samples": 50,
                    "modalities": {"a": {"dim": 3, "separation": 3.0}, "b": {"dim": 5, "separation": 2.0}}},
        "model": {"encoders": {"*": {"name": "mlp", "hidden": [8], "out_dim": 4}}, "fusion": {"name": "concat"}},
        "method": {"name": "joint"}, "optim": {"lr": 0.05},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu", "tensorboard": False},
    }
    monkeypatch.setattr(run_module, "build_method", lambda cfg: WithHeads())
    summary = run_experiment(config, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert {"method_modules.a.linear.weight", "method_modules.b.linear.bias"} <= set(state)
    assert evaluate_run(tmp_path / "run")["acc"] == pytest.approx(summary["test"]["acc"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "complete"

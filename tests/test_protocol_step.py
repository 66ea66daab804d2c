"""The protocol for methods that change the training scheme: a method-owned step (sub-steps, the
loop's logging and checkpoints between sub-steps, resuming in the middle of a batch), the method's
own evaluation output, and StepContext's scaled backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modbal import MultimodalModel
from modbal.fusions import ConcatFusion
from modbal.methods.base import Method, Prediction, StepContext
from modbal.train import evaluate
from modbal.train.loop import LoopState, fit


def make_model():
    torch.manual_seed(0)
    return MultimodalModel({"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)}, ConcatFusion({"a": (4,), "b": (4,)}, 3))


def data(batches=3, n=6):
    g = torch.Generator().manual_seed(1)
    return [({"a": torch.randn(n, 3, generator=g), "b": torch.randn(n, 5, generator=g)},
             torch.randint(3, (n,), generator=g)) for _ in range(batches)]


class ThreeSteps(Method):
    """One optimizer step per sub-step, each on one encoder's own CE through the fused head."""

    name = "three_steps"
    owns_step = True
    predicts = True

    def __init__(self):
        self.calls = []
        self.hooks = 0

    def substeps(self, model):
        return 3

    def train_step(self, model, inputs, targets, step, substep):
        self.calls.append((step.epoch, step.step_in_epoch, substep))
        with step.autocast():
            loss = F.cross_entropy(model(inputs), targets) * (substep + 1)
        assert step.backward(loss)
        step.step()
        return loss

    def after_backward(self, model):
        self.hooks += 1

    def after_step(self, model):
        self.hooks += 1

    def predict(self, model, inputs):
        logits = model(inputs)
        return Prediction(-logits, torch.stack([-logits / 2, -logits / 2]))


def test_owned_steps_run_every_substep_and_log_their_mean():
    model, method = make_model(), ThreeSteps()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records, checkpoints = [], []
    state = fit(model, method, optimizer, data(), data(), epochs=1, checkpoint_every=2,
                on_step=lambda st, r: records.append(r),
                on_checkpoint=lambda st: checkpoints.append((st.step_in_epoch, st.substep, st.updates)))
    assert method.calls == [(0, b, k) for b in range(3) for k in range(3)]
    assert method.hooks == 0  # after_backward / after_step belong to the runner's own step
    assert state.global_step == 3 and state.updates == 9 and state.substep == 0
    # every 2nd sub-step: inside batches 0 (after its 2nd), 1 (after its 1st and 3rd: the batch end), 2 ...
    assert checkpoints == [(0, 2, 2), (1, 1, 4), (2, 0, 6), (2, 2, 8)]
    assert len(records) == 3 and "acc" in records[0]
    # the logged loss: the mean of the three sub-steps' losses (1×, 2×, 3× one CE)
    model2, method2 = make_model(), ThreeSteps()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    x, y = data()[0]
    losses = []
    for k in range(3):
        losses.append(float(method2.train_step(model2, x, y, StepContext(opt2), k).detach()))
    assert records[0]["loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_a_loop_resumed_between_substeps_continues_with_the_next():
    reference_model, reference = make_model(), ThreeSteps()
    fit(reference_model, reference, torch.optim.SGD(reference_model.parameters(), lr=0.1), data(), data(), epochs=1)

    model, method = make_model(), ThreeSteps()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = {}

    class Stop(Exception):
        pass

    def checkpoint(st):
        saved.update(state=LoopState.from_state(st.state_dict()), model={k: v.clone() for k, v in
                                                                          model.state_dict().items()},
                     optimizer=optimizer.state_dict())
        raise Stop

    with pytest.raises(Stop):
        fit(model, method, optimizer, data(), data(), epochs=1, checkpoint_every=4, on_checkpoint=checkpoint)
    assert (saved["state"].step_in_epoch, saved["state"].substep) == (1, 1)

    class Sampler:  # like the runner's: told the epoch and how many batches are done
        def set_epoch(self, epoch, start):
            self.start = start

    class Loader(list):
        batch_sampler = Sampler()

        def __iter__(self):
            return iter(self[self.batch_sampler.start:])

    resumed_model, resumed = make_model(), ThreeSteps()
    resumed_model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    opt.load_state_dict(saved["optimizer"])
    fit(resumed_model, resumed, opt, Loader(data()), data(), epochs=1, state=saved["state"])
    assert resumed.calls[0] == (0, 1, 1) and len(resumed.calls) == 9 - 4
    for key, value in reference_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0)


def test_evaluation_uses_the_methods_prediction():
    model, method = make_model(), ThreeSteps()
    plain = evaluate(model, data())
    own = evaluate(model, data(), predict=lambda x: method.predict(model, x))
    assert "head_acc/a" in plain and not any(k.startswith("head_") for k in own)
    assert own["loss"] != plain["loss"]  # the negated logits were scored
    assert set(own) >= {"acc", "macro_f1", "loss", "mono_acc/a", "mono_loss/b"}


def test_step_context_skips_an_overflowing_step_under_a_gradient_scaler():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    context = StepContext(optimizer, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()[0]
    assert not context.backward(F.cross_entropy(model(x), y) * float("inf"))
    context.step()  # skipped by the scaler, which lowers its scale
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0 ** 16
    assert context.backward(F.cross_entropy(model(x), y))
    context.step()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_method_without_its_step_or_prediction_says_so():
    class Half(Method):
        owns_step = predicts = True
    with pytest.raises(NotImplementedError, match="train_step"):
        Half().train_step(None, {}, None, None, 0)
    with pytest.raises(NotImplementedError, match="predict"):
        Half().predict(None, {})

"""Encoders: out_shape, finite output on AGM's muted all-zero sample, gradients, the sequence
padding convention, and ResNet18's architecture (parameter count from the formula)."""
from __future__ import annotations

import pytest
import torch

import modbal  # noqa: F401  (fills the registries)
from modbal.encoders import ResNet18Encoder
from modbal.encoders._sequence import sequence_lengths
from modbal.registry import ENCODERS

CASES = [
    ("identity", (3, 4), {}),
    ("mlp", (3, 4), {"hidden": (8,), "out_dim": 5}),
    ("cnn", (12, 12), {"channels": (4, 8)}),
    ("cnn", (3, 10, 8), {"channels": (4,), "batchnorm": False, "out_dim": 6}),
    ("resnet18", (12, 12), {"stem": "small", "width": 4}),
    ("resnet18", (1, 16, 16), {"stem": "small", "width": 4}),
    ("resnet18", (3, 32, 32), {"width": 4}),
    ("resnet18", (3, 3, 8, 8), {"stem": "small", "width": 4}),
    ("transformer_seq", (6, 5), {"dim": 8, "heads": 2, "depth": 1}),
    ("transformer_seq", (6, 5), {"dim": 8, "heads": 2, "depth": 2, "pool": "mean"}),
    ("transformer_seq", (6, 5), {"dim": 8, "heads": 2, "depth": 1, "tokens": True}),
    ("lstm", (6, 5), {"hidden": 8}),
    ("lstm", (6, 5), {"hidden": 8, "layers": 2, "bidirectional": True, "out_dim": 4}),
]
IDS = [f"{n}-{'x'.join(map(str, s))}-{i}" for i, (n, s, _) in enumerate(CASES)]


def test_every_registered_encoder_is_covered() -> None:
    assert set(ENCODERS.names()) <= {name for name, _, _ in CASES}


@pytest.mark.parametrize("name,shape,options", CASES, ids=IDS)
def test_out_shape_zero_sample_and_gradients(name: str, shape: tuple, options: dict) -> None:
    torch.manual_seed(0)
    encoder = ENCODERS.create(name, input_shape=shape, **options)
    x = torch.randn(2, *shape)
    if name in ("transformer_seq", "lstm"):
        x[1, 4:] = 0  # a padded sequence in the batch
    out = encoder(x)
    assert tuple(out.shape) == (2, *encoder.out_shape)
    params = list(encoder.parameters())
    if params:
        out.square().mean().backward()
        for pname, p in encoder.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    # AGM's muting: one all-zero sample in eval mode, with gradients, must stay finite.
    encoder.eval()
    encoder.zero_grad()
    zero = encoder(torch.zeros(1, *shape))
    assert tuple(zero.shape) == (1, *encoder.out_shape)
    assert torch.isfinite(zero).all()
    if params:
        zero.sum().backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


def test_identity_passes_input_through() -> None:
    x = torch.randn(2, 3, 4)
    assert ENCODERS.create("identity", input_shape=(3, 4))(x) is x


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def _bn(c: int) -> int:
    return 2 * c


def resnet18_param_count(in_channels: int, stem_kernel: int, width: int = 64) -> int:
    """ResNet18 without its classifier: stem conv + BN, four stages of two BasicBlocks."""
    total = _conv(in_channels, width, stem_kernel) + _bn(width)
    cin = width
    for i in range(4):
        w = width * 2 ** i
        block1 = _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
        if i > 0:  # stride 2 and a channel change: 1×1 projection shortcut
            block1 += _conv(cin, w, 1) + _bn(w)
        block2 = 2 * (_conv(w, w, 3) + _bn(w))
        total += block1 + block2
        cin = w
    return total


def test_resnet18_parameter_count_matches_the_architecture() -> None:
    expected = resnet18_param_count(3, 7)
    # The well-known ImageNet ResNet18 has 11,689,512 parameters including its 512→1000 classifier.
    assert expected == 11_689_512 - (512 * 1000 + 1000)
    encoder = ResNet18Encoder((3, 224, 224))
    assert sum(p.numel() for p in encoder.parameters()) == expected
    assert encoder.out_shape == (512,)
    small = ResNet18Encoder((1, 28, 28), stem="small")
    assert sum(p.numel() for p in small.parameters()) == resnet18_param_count(1, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.modules())


def test_resnet18_small_stem_on_mnist_sized_input() -> None:
    torch.manual_seed(0)
    encoder = ResNet18Encoder((28, 28), stem="small")
    with torch.no_grad():
        out = encoder(torch.randn(2, 28, 28))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_resnet18_frames_are_averaged_over_time() -> None:
    torch.manual_seed(0)
    encoder = ResNet18Encoder((3, 3, 8, 8), stem="small", width=4).eval()
    x = torch.randn(2, 3, 3, 8, 8)
    with torch.no_grad():
        expected = torch.stack([encoder.trunk(x[:, t]) for t in range(3)]).mean(0)
        torch.testing.assert_close(encoder(x), expected)


def test_sequence_lengths_trailing_zero_convention() -> None:
    x = torch.ones(3, 5, 2)
    x[0, 3:] = 0          # length 3
    x[1, 1] = 0           # an interior zero step still counts: length 5
    x[2] = 0              # all padding: length 0
    assert sequence_lengths(x).tolist() == [3, 5, 0]


@pytest.mark.parametrize("name,options", [
    ("lstm", {"hidden": 8}),
    ("lstm", {"hidden": 8, "bidirectional": True}),
    ("transformer_seq", {"dim": 8, "heads": 2, "depth": 1}),
    ("transformer_seq", {"dim": 8, "heads": 2, "depth": 1, "pool": "mean"}),
])
def test_padding_does_not_change_the_output(name: str, options: dict) -> None:
    torch.manual_seed(0)
    encoder = ENCODERS.create(name, input_shape=(8, 3), **options).eval()
    short = torch.randn(1, 4, 3)
    padded = torch.cat([short, torch.zeros(1, 4, 3)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 8, 3)])  # padded next to a full-length sequence
    with torch.no_grad():
        torch.testing.assert_close(encoder(short)[0], encoder(batch)[0], atol=1e-5, rtol=1e-4)


def test_transformer_seq_tokens_zero_padded_steps() -> None:
    torch.manual_seed(0)
    encoder = ENCODERS.create("transformer_seq", input_shape=(6, 3), dim=8, heads=2, depth=1, tokens=True)
    x = torch.randn(2, 4, 3)
    x[0, 2:] = 0
    out = encoder(x)
    assert out.shape == (2, 6, 8)  # padded up to the declared length
    assert (out[0, 2:] == 0).all() and (out[1, 4:] == 0).all() and (out[1, :4] != 0).any()


def test_bad_shapes_are_clear() -> None:
    with pytest.raises(ValueError, match=r"\(H, W\) or \(C, H, W\)"):
        ENCODERS.create("cnn", input_shape=(10,))
    with pytest.raises(ValueError, match="resnet18"):
        ENCODERS.create("resnet18", input_shape=(10,))
    with pytest.raises(ValueError, match=r"\(T, F\)"):
        ENCODERS.create("lstm", input_shape=(10,))
    with pytest.raises(ValueError, match="stem"):
        ENCODERS.create("resnet18", input_shape=(28, 28), stem="tiny")
    seq = ENCODERS.create("transformer_seq", input_shape=(4, 3), dim=8, heads=2, depth=1)
    with pytest.raises(ValueError, match="more than the 4"):
        seq(torch.randn(1, 5, 3))
    lstm = ENCODERS.create("lstm", input_shape=(4, 3), hidden=4)
    with pytest.raises(ValueError, match=r"\(B, T, 3\)"):
        lstm(torch.randn(1, 4, 2))
    cnn = ENCODERS.create("cnn", input_shape=(3, 8, 8), channels=(4,))
    with pytest.raises(ValueError, match="cnn encoder"):
        cnn(torch.randn(2, 8, 8))

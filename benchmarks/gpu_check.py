"""The body of benchmarks/gpu_check.sh (run it through the script, which checks for CUDA first)."""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time

import torch


def train_every_method(steps: int, amp: str) -> list[tuple[str, str]]:
    from modbal.config import resolve
    from modbal.registry import METHODS
    from modbal.train import run_experiment

    results = []
    base = {
        "dataset": {"name": "synthetic", "num_train": 2048, "num_val": 256, "num_test": 256, "bayes_samples": 100},
        "model": {"encoders": {"*": {"name": "mlp", "hidden": [128], "out_dim": 64}}, "fusion": {"name": "concat"}},
        "optim": {"lr": 0.05},
        "train": {"epochs": 2, "batch_size": 64, "device": "cuda", "amp": amp, "max_steps_per_epoch": steps,
                  "tensorboard": False},
    }
    for name in METHODS.names():
        kwargs = {}
        params = inspect.signature(METHODS.get(name)).parameters
        if "modality" in params and params["modality"].default is inspect.Parameter.empty:
            kwargs["modality"] = "slow"
        cfg = resolve({**base, "method": {"name": name, **kwargs}})
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            try:
                s = run_experiment(cfg, f"{d}/run", quiet=True)
                line = f"ok    test acc {s['test']['acc']:.3f} on {s['device']}"
            except Exception as e:  # report every method, then fail at the end
                line = f"FAIL  {type(e).__name__}: {e}"
        results.append((name, line))
        print(f"  {name:<10} {line}  ({time.perf_counter() - t:.1f}s)", flush=True)
    return results


def step_time(method_name: str, steps: int, warmup: int, batch: int, amp: str) -> float:
    from modbal.build import build_model
    from modbal.registry import METHODS
    from modbal.train.evaluate import autocast

    torch.manual_seed(0)
    device = torch.device("cuda")
    shapes = {"audio": (1, 257, 188), "visual": (3, 224, 224)}
    model = build_model(shapes, 6, {m: {"name": "resnet18"} for m in shapes}, {"name": "concat"}).to(device)
    method = METHODS.create(method_name, **({"alpha": 1.5, "cap": 10.0} if method_name == "agm" else {}))
    opt = torch.optim.SGD(method.param_groups(model)[0]["params"], lr=1e-3, momentum=0.9, weight_decay=1e-4)
    inputs = {m: torch.randn(batch, *s, device=device) for m, s in shapes.items()}
    targets = torch.randint(6, (batch,), device=device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t = time.perf_counter()
        with autocast(device, amp):
            loss = method.loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(model)
        opt.step()
        method.after_step(model)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="training steps per method and epoch")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    args = parser.parse_args()
    print(f"gpu_check: {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    t0 = time.perf_counter()
    print("1) short CUDA training of every registered method (synthetic task):", flush=True)
    results = train_every_method(args.steps, args.amp)
    print(f"2) step time on CREMA-D shapes (resnet18 x2, audio 1x257x188, frame 3x224x224, batch 64, {args.amp}):",
          flush=True)
    joint = step_time("joint", args.timing_steps, 5, 64, args.amp)
    agm = step_time("agm", args.timing_steps, 5, 64, args.amp)
    print(f"  joint {joint * 1000:.1f} ms/step   agm {agm * 1000:.1f} ms/step   ratio agm/joint {agm / joint:.2f}")
    failed = [n for n, line in results if line.startswith("FAIL")]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all methods trained'} "
          f"({time.perf_counter() - t0:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

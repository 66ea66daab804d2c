"""AGM's training-step cost relative to joint training, measured side by side in one run.

Encoders of realistic cost: the paper's ResNet18s on AV-MNIST shapes (audio spectrogram
1×112×112, image 1×28×28; M = 3 adds a second 1×28×28 image stream), concat late fusion, batch 32,
SGD. Each repetition times one step of every variant in turn (interleaved, so machine load hits
all of them alike); the table reports medians and ratios to joint training.

    python benchmarks/step_time.py [--reps 15] [--threads 2] [--fusions concat,sum,maxout,...] [--methods ugm,pmr]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from modbal import AGM, MLA, PMR, UGM, UME, UMT, GBlending, Joint, ReconBoost, Relearning, UniModalAssist, Valuation
from modbal.build import build_model
from modbal.methods import OGM, OPM, InfoReg, MMPareto
from modbal.methods.base import EpochData, StepContext

SHAPES = {"audio": (1, 112, 112), "image": (1, 28, 28), "image2": (1, 28, 28)}
#: ``--clock``: wall time, or this process's CPU time (robust to other processes' load on the machine)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def make(num_modalities: int, batch: int, fusion: str = "concat", seed: int = 0):
    names = list(SHAPES)[:num_modalities]
    torch.manual_seed(seed)
    encoder = {"name": "identity"} if fusion == "early" else {"name": "resnet18"}
    model = build_model({m: SHAPES[m] for m in names}, 10, {m: dict(encoder) for m in names}, {"name": fusion})
    inputs = {m: torch.rand(batch, *SHAPES[m]) for m in names}
    targets = torch.randint(10, (batch,))
    return model, inputs, targets


def step(model, method, optimizer, inputs, targets) -> float:
    start = clock()
    if method.owns_step:  # all of a batch's sub-steps (MLA: one optimizer step per modality)
        for k in range(method.substeps(model)):
            method.train_step(model, inputs, targets, StepContext(optimizer, steps_per_epoch=1), k)
        return clock() - start
    loss = method.loss(model, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(model)
    optimizer.step()
    return clock() - start


def time_variants(variants: dict, m_total: int, fusion: str, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-step times of each variant (a fresh model each), interleaved over the repetitions."""
    runs = {}
    for name, method in variants.items():
        model, inputs, targets = make(m_total, args.batch, fusion)
        if callable(method) and not hasattr(method, "loss"):  # built from the model (teachers of its shape)
            method = method(model)
        method.attach(model)
        method.setup(model, None)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        data = [(inputs, targets)]
        method.before_epoch(model, EpochData(0, data, data, optimizer=optimizer))  # PMR's prototypes (untimed)
        runs[name] = (model, method, optimizer, inputs, targets)
    times = {name: [] for name in variants}
    for rep in range(args.warmup + args.reps):
        for name, run in runs.items():
            elapsed = step(*run)
            if rep >= args.warmup:
                times[name].append(elapsed)
    return times


def teacher_copies(whole: bool):
    """UMT/UME built with teachers shaped like the model (fresh copies: their cost, not their training)."""
    def build(model):
        if whole:
            return UME(teachers={m: copy.deepcopy(model) for m in model.modalities})
        return UMT(teachers={m: copy.deepcopy(model.encoders[m]) for m in model.modalities})
    return build


#: other methods, each timed per training step (one batch) beside joint training
OTHERS = {"mla": lambda: MLA(), "reconboost": lambda: ReconBoost(), "relearning": lambda: Relearning(),
          "umt": lambda: teacher_copies(False), "ume": lambda: teacher_copies(True),
          "valuation": lambda: Valuation(),  # its per-step cost is joint's; the valuation pass runs per epoch
          "unimodal_assist": lambda: UniModalAssist(), "pmr": lambda: PMR(),
          "gblend": lambda: GBlending(epochs=1),  # G-Blending: the step with its weights (estimate untimed)
          "mmpareto": lambda: MMPareto(), "opm": lambda: OPM(start_epoch=0, p_exe=1.0),  # OPM: a modulated batch
          "ogm": lambda: OGM(start_epoch=0), "inforeg": lambda: InfoReg(),
          "ugm": lambda: UGM(), "ugm experts": lambda: UGM(heads="assist", predict="with_experts")}


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over repetitions of the variant's step time over joint's in the same repetition."""
    return statistics.median(a / b for a, b in zip(times[name], times["joint"]))


def timing_parser(description: str) -> argparse.ArgumentParser:
    """The options every step-time benchmark takes (repetitions, warm-up, batch, threads, clock)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    return parser


def main() -> None:
    parser = timing_parser(__doc__.splitlines()[0])
    parser.add_argument("--fusions", default="",
                        help="also time AGM (features) vs joint per fusion, e.g. concat,maxout")
    parser.add_argument("--methods", default=",".join(OTHERS),
                        help=f"the other methods to time beside joint (default: all of {', '.join(OTHERS)})")
    args = parser.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(OTHERS) - {""})
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(OTHERS)}")
    others = {name: OTHERS[name] for name in args.methods.split(",") if name}
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.reps} interleaved repetitions (medians)\n")
    print("| M | joint ms | AGM features ms | ratio | AGM inputs (paper code) ms | ratio |")
    print("|---|---|---|---|---|---|")
    for m_total in (2, 3):
        times = time_variants({"joint": Joint(), "features": AGM(alpha=1.0, muting="features"),
                               "inputs": AGM(alpha=1.0, muting="inputs")}, m_total, "concat", args)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"| {m_total} | {med['joint']:.1f} | {med['features']:.1f} | {paired_ratio(times, 'features'):.3f} "
              f"| {med['inputs']:.1f} | {paired_ratio(times, 'inputs'):.3f} |")
    print("\nOther methods (concat, per training step; ReconBoost: its first stage's boosting step; UME updates "
          "nothing):\n")
    print("| M | method | joint ms | method ms | ratio |")
    print("|---|---|---|---|---|")
    for m_total in (2, 3):
        times = time_variants({"joint": Joint(), **{n: make_method() for n, make_method in others.items()}},
                              m_total, "concat", args)
        for name in others:
            print(f"| {m_total} | {name} | {statistics.median(times['joint']) * 1e3:.1f} | "
                  f"{statistics.median(times[name]) * 1e3:.1f} | {paired_ratio(times, name):.3f} |")
    if args.fusions:
        print("\nPer fusion (M = 2, same encoders; `early` uses identity encoders, the fusion is the network):\n")
        print("| fusion | joint ms | AGM features ms | ratio |")
        print("|---|---|---|---|")
        for fusion in args.fusions.split(","):
            times = time_variants({"joint": Joint(), "features": AGM(alpha=1.0)}, 2, fusion, args)
            print(f"| {fusion} | {statistics.median(times['joint']) * 1e3:.1f} | "
                  f"{statistics.median(times['features']) * 1e3:.1f} | {paired_ratio(times, 'features'):.3f} |")

if __name__ == "__main__":
    main()

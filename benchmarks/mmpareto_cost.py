"""MMPareto's training-step cost: modbal's two backward passes against the authors' M + 2, side by side.

Same shapes as ``step_time.py`` (ResNet18 encoders on AV-MNIST shapes, concat fusion, batch 32,
SGD). Variants, timed interleaved in every repetition: joint training; ``mmpareto`` (one
``autograd.grad`` pass for the uni-modal losses plus the loop's backward); and the same update
computed with the original's passes (each loss backpropagated on its own with
``backward(retain_graph=True)``, the encoder gradients cloned, ``zero_grad``, then the summed
backward). The table reports medians and per-repetition ratios to joint training.

    python benchmarks/mmpareto_cost.py [--reps 15] [--threads 2] [--clock wall|cpu]
"""
from __future__ import annotations

import statistics

import step_time
import torch
import torch.nn.functional as F
from step_time import paired_ratio, time_variants

from modbal import Joint, MMPareto
from modbal.methods.base import encoder_parameters, method_modules


class OriginalPasses(MMPareto):
    """MMPareto's update, with the uni-modal gradients from the authors' separate backward passes."""

    def loss(self, model, inputs, targets):
        heads = method_modules(model)
        logits, mono = model(inputs, aux=lambda f: [heads[m](f[m]) for m in model.modalities])
        losses = [F.cross_entropy(logits, targets)] + [F.cross_entropy(o, targets) for o in mono]
        params = encoder_parameters(model)
        grads = []
        for loss in losses:  # L_mm, then each L_m: M + 1 backward passes
            model.zero_grad()
            loss.backward(retain_graph=True)
            grads.append({m: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params[m]]
                          for m in model.modalities})
        model.zero_grad()
        self._g_uni = {m: grads[1 + i][m] for i, m in enumerate(model.modalities)}
        return sum(losses)  # the loop's backward: the (M + 2)-th pass


def main() -> None:
    args = step_time.timing_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    step_time.clock = step_time.CLOCKS[args.clock]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.clock} clock, "
          f"{args.reps} interleaved repetitions (medians)\n")
    print("| M | joint ms | MMPareto ms | ratio | original passes ms | ratio |")
    print("|---|---|---|---|---|---|")
    for m_total in (2, 3):
        times = time_variants({"joint": Joint(), "mmpareto": MMPareto(), "original": OriginalPasses()},
                              m_total, "concat", args)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"| {m_total} | {med['joint']:.1f} | {med['mmpareto']:.1f} | {paired_ratio(times, 'mmpareto'):.3f} "
              f"| {med['original']:.1f} | {paired_ratio(times, 'original'):.3f} |")


if __name__ == "__main__":
    main()

"""``privfl bench dp``: DP-SGD accuracy and cost on MNIST (or EMNIST letters).

Runs, on the Tramer–Boneh tanh CNN (26k parameters; Tramèr & Boneh, ICLR 2021) with
Poisson sampling, expected batch 2000, 40 epochs, clip 0.1, SGD lr 2 momentum 0.9, δ=1e-5:

* a single model without DP, with DP-SGD at ε=3 and at ε=1.5;
* the per-step cost of DP-SGD (privfl's book-keeping clipping, the default, and Opacus'
  hooks, functorch, expanded weights, ghost clipping) against non-private SGD on the same
  model and batch;
* three hospitals (IID thirds of the train set) running FedAvg with client DP-SGD at the
  same ε: an in-process FedAvg loop over :func:`privfl.clients.dp_sgd.dp_sgd_round` (the
  function the ClientApp calls), not a Flower simulation.

The data stay on the device as tensors. ``--quick`` shrinks everything to run on a CPU in
minutes. EMNIST: ``--set data.dataset=emnist-letters data.root=/path``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from flwr.app import RecordDict
from torch import nn

from privfl.clients.dp_sgd import dp_sgd_round
from privfl.config import Scenario
from privfl.data import ImageSet, load_dataset
from privfl.dp import KeyStream, seed_secret
from privfl.dp.sgd import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    run_dp_sgd_steps,
    train_dp_sgd,
)
from privfl.training import resolve_device

# The reference EMNIST-letters figures, printed beside ours.
REFERENCE = {"no DP": 0.90, "ε=3": 0.82, "ε=1.5": 0.78}
TARGET_MNIST = {"no DP": 0.99, "ε=3": 0.97, "ε=1.5": 0.95}


class TramerBonehCNN(nn.Module):
    """The tanh CNN of Tramèr & Boneh (2021) for 28×28 inputs (26,010 parameters at 10
    classes)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.Tanh(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.1307) / 0.3081)


def _accuracy(model: nn.Module, data: ImageSet, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), 5000):
            x = data.images[i : i + 5000].to(device)
            correct += int((model(x).argmax(1).cpu() == data.labels[i : i + 5000]).sum())
    return correct / len(data)


def _train_plain(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int,
    batch: int,
    lr: float,
    momentum: float,
    seed: int,
    device: torch.device,
) -> None:
    x, y = data.images.to(device), data.labels.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch):
            idx = idx.to(device)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def _dp_steps(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, kw: dict, k: int
) -> None:
    run_dp_sgd_steps(model, images, labels, steps=k, **kw)


def _step_times(
    num_classes: int, data: ImageSet, batch: int, device: torch.device, steps: int
) -> dict[str, float]:
    """Milliseconds per optimiser step, same model and (expected) batch: about ``steps``
    steps of each engine in three interleaved blocks, the fastest block counting (the
    machine may be shared)."""
    x, y = data.images[:batch].to(device), data.labels[:batch].to(device)
    per_block = max(1, round(steps / 3))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    plain = TramerBonehCNN(num_classes).to(device)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)

    def plain_steps(k: int) -> None:
        for _ in range(k):
            plain_opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(plain(x), y).backward()
            plain_opt.step()

    images, labels = data.images[: batch * 4].to(device), data.labels[: batch * 4].to(device)
    runs: dict[str, Callable[[int], object]] = {"non-private": plain_steps}
    out: dict[str, float] = {}
    for mode in GRAD_SAMPLE_MODES:
        model = TramerBonehCNN(num_classes).to(device)
        kw = dict(
            sample_rate=0.25,
            noise_multiplier=1.0,
            clip=0.1,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            sampling=KeyStream(bytes(32)),
            noise=KeyStream(bytes([1]) * 32),
            grad_sample_mode=mode,
        )
        runs[f"DP-SGD {mode}"] = partial(_dp_steps, model, images, labels, kw)
    best = dict.fromkeys(runs, math.inf)
    for block in range(3):
        for label, run in runs.items():
            if label in out:
                continue
            try:
                if block == 0:
                    run(2)  # warm-up
                sync()
                t = time.perf_counter()
                run(per_block)
                sync()
                best[label] = min(best[label], (time.perf_counter() - t) / per_block * 1e3)
            except Exception as exc:
                out[label] = float("nan")
                print(f"  {label}: unavailable ({type(exc).__name__}: {exc})")
    return {label: out.get(label, best[label]) for label in runs}


def _federated(
    train: ImageSet,
    test: ImageSet,
    num_classes: int,
    *,
    epsilon: float,
    rounds: int,
    local_epochs: int,
    batch: int,
    device: torch.device,
) -> tuple[float, float]:
    parties = 3
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    shards = [train.subset(order[p::parties]) for p in range(parties)]
    sc = Scenario.from_dict(
        {
            "scenario": {"rounds": rounds, "seed": 0},
            "data": {"parties": parties},
            "training": {
                "local_epochs": local_epochs,
                "batch_size": max(1, batch // parties),
                "lr": 2.0,
                "momentum": 0.9,
            },
            "defense": {"dp": {"mode": "client", "epsilon": epsilon, "clip": 0.1}},
        }
    )
    glob = TramerBonehCNN(num_classes).to(device)
    states = [RecordDict() for _ in range(parties)]
    eps = 0.0
    for rnd in range(1, rounds + 1):
        weights, sums = [], None
        for p in range(parties):
            local = TramerBonehCNN(num_classes).to(device)
            local.load_state_dict(glob.state_dict())
            n, _, e = dp_sgd_round(
                local,
                shards[p],
                sc,
                party=p,
                server_round=rnd,
                state=states[p],
                device=device,
                noise_secret=seed_secret(sc),
            )
            eps = max(eps, e)
            sd = {k: v.detach() * n for k, v in local.state_dict().items()}
            sums = sd if sums is None else {k: sums[k] + sd[k] for k in sums}
            weights.append(n)
        glob.load_state_dict({k: v / sum(weights) for k, v in sums.items()})
    return _accuracy(glob, test, device), eps


def main(argv: list[str]) -> int:
    """Entry point of ``privfl bench dp``; prints the table, returns the exit code."""
    ap = argparse.ArgumentParser(prog="privfl bench dp", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset, few epochs (CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--data-root",
        default="",
        help="data.root of every run (default: $PRIVFL_DATA, else the MNIST sample shipped "
        "with privfl; the full MNIST or EMNIST needs a folder holding MNIST/raw or EMNIST/raw)",
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="K=V", help="scenario overrides")
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--epochs", type=int, default=0, help="epochs of the central runs")
    ap.add_argument(
        "--parts",
        default="central,fl,steps",
        help="comma-separated: central (no DP, ε=3, ε=1.5), fl (3 hospitals), steps (cost)",
    )
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    warnings.filterwarnings("ignore", message="Optimal order")
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Secure RNG")

    sc = Scenario.from_dict({"data": {"root": args.data_root}}).replace(args.set)
    train, test, num_classes = load_dataset(sc.data)
    device = resolve_device(args.device)
    epochs, batch, fl_rounds, fl_local = 40, 2000, 10, 4
    if args.quick:
        g = torch.Generator().manual_seed(0)
        train = train.subset(torch.randperm(len(train), generator=g)[:12_000])
        test = test.subset(torch.arange(min(2000, len(test))))
        epochs, batch, fl_rounds, fl_local = 4, 400, 2, 2
    epochs = args.epochs or epochs
    print(
        f"dataset {sc.data.dataset}: {len(train)} train / {len(test)} test, {num_classes} classes, "
        f"device {device}, {epochs} epochs, expected batch {batch}"
    )

    rows: dict[str, dict[str, float]] = {}
    print(
        f"\n{'run':24} {'acc':>7} {'ε spent':>8} {'σ':>6} {'time s':>7} "
        f"{'EMNIST ref':>10} {'MNIST target':>12}",
        flush=True,
    )

    def report(label: str, row: dict[str, float]) -> None:
        rows[label] = row
        key = label.removeprefix("FL 3 hospitals ").strip() if label.startswith("FL") else label
        ref = REFERENCE.get(key)
        tgt = TARGET_MNIST.get(key) if not label.startswith("FL") else None
        print(
            f"{label:24} {row['acc']:7.2%} {row['eps']:8.3f} {row.get('sigma', float('nan')):6.2f} "
            f"{row['s']:7.1f} {'' if ref is None else f'{ref:.0%}':>10} "
            f"{'' if tgt is None else f'>= {tgt:.0%}':>12}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": rows}, indent=2))

    if "central" in parts:
        for label, eps in (("ε=1.5", 1.5), ("ε=3", 3.0)):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = TramerBonehCNN(num_classes)
            res = train_dp_sgd(
                model,
                train,
                epochs=epochs,
                batch_size=batch,
                lr=2.0,
                momentum=0.9,
                epsilon=eps,
                delta=1e-5,
                clip=0.1,
                seed=0,
                device=device,
                accountant=sc.defense.dp.accountant,
            )
            report(
                label,
                {
                    "acc": _accuracy(model, test, device),
                    "eps": res.epsilon,
                    "sigma": res.noise_multiplier,
                    "s": time.perf_counter() - t0,
                },
            )
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = TramerBonehCNN(num_classes).to(device)
        # Non-private baseline: the usual small-batch SGD (large-batch lr 2 needs clipping).
        _train_plain(
            model, train, epochs=epochs, batch=128, lr=0.05, momentum=0.9, seed=0, device=device
        )
        report(
            "no DP",
            {
                "acc": _accuracy(model, test, device),
                "eps": float("inf"),
                "s": time.perf_counter() - t0,
            },
        )
    if "fl" in parts:
        for label, eps in (("FL 3 hospitals ε=3", 3.0), ("FL 3 hospitals ε=1.5", 1.5)):
            t0 = time.perf_counter()
            acc, e = _federated(
                train,
                test,
                num_classes,
                epsilon=eps,
                rounds=fl_rounds,
                local_epochs=fl_local,
                batch=batch,
                device=device,
            )
            report(label, {"acc": acc, "eps": e, "s": time.perf_counter() - t0})
    if "steps" not in parts:
        return 0
    times = _step_times(num_classes, train, batch, device, steps=3 if args.quick else 20)

    base = times["non-private"]
    print(f"\n{'per-step cost (batch ' + str(batch) + ')':32} {'ms':>8} {'× non-private':>14}")
    for label, ms in times.items():
        default = " (default)" if label == f"DP-SGD {DEFAULT_GRAD_SAMPLE_MODE}" else ""
        print(f"{label + default:32} {ms:8.1f} {ms / base:14.2f}")
    ratio = times[f"DP-SGD {DEFAULT_GRAD_SAMPLE_MODE}"] / base
    print(
        f"default DP-SGD ({DEFAULT_GRAD_SAMPLE_MODE}): {ratio:.2f}× a non-private step "
        f"(target <= 2×: {'met' if ratio <= 2.0 else 'NOT met'})"
    )
    if args.quick:
        print("\n--quick: subset and few epochs; the targets apply to the full run")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "step_ms": times}, indent=2))
    return 0

"""``privfl bench seed``: the reference attack figures, reproduced end to end.

Every row is a real run of a shipped reference scenario through Flower (or, for the
single-model membership target, in-process), printed beside the reference figure reported
on EMNIST.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from privfl.runner import run_scenario

# (scenario, reference figure, group)
ROWS: list[tuple[str, str, str]] = [
    ("dlg_batch1", "DLG: batch of 1 recovered exactly", "dlg"),
    ("dlg_batch7", "DLG: 3 of a batch of 7", "dlg"),
    ("dlg_secagg", "DLG under secure aggregation: nothing", "dlg"),
    ("imprint_secagg", "imprint: all but one of the n·B samples", "imprint"),
    ("imprint_participant", "imprint by a participant: (not reported)", "imprint"),
    ("imprint_dpsgd", "imprint with DP at ε=1.5: nothing", "imprint"),
    ("mia_small_hospitals", "QMIA: 97% precision (ResNet-50, ImageNet)", "mia"),
    ("mia_small_hospitals_dpsgd", "DP-SGD pushes MIA to chance", "mia"),
    ("mia_federated", "MIA on a federated global model: (not reported)", "mia"),
]

KEY_METRICS = (
    "psnr_mean",
    "ssim_mean",
    "auc",
    "tpr_at_0.1pct_fpr",
    "tpr_at_1pct_fpr",
    "precision",
    "expected_fraction",
    "seconds",
)


def _summarise(attack: dict[str, Any]) -> str:
    m = attack.get("metrics", {})
    parts = [f"{k}={m[k]:.3g}" for k in KEY_METRICS if isinstance(m.get(k), int | float)]
    return ", ".join(parts)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="privfl bench seed", description=__doc__)
    p.add_argument(
        "--only", default="dlg,imprint,mia", help="comma-separated groups: dlg, imprint, mia"
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="run each scenario with seeds 0..N-1 and report each"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override applied to every scenario (e.g. data.root=/data/mnist)",
    )
    args = p.parse_args(argv)
    groups = {g.strip() for g in args.only.split(",") if g.strip()}

    print(
        f"{'scenario':<26} {'seed':>4} {'attack (role)':<44} {'recovered':>10} "
        f"{'accuracy':>8} {'wall s':>7}  metrics"
    )
    summary: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, reference, group in ROWS:
            if group not in groups:
                continue
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                res = run_scenario(
                    name,
                    Path(tmp) / f"{name}-{seed}",
                    overrides=[*args.set, f"scenario.seed={seed}"],
                    progress=False,
                )
                wall = time.perf_counter() - t0
                acc = res["final"].get("accuracy")
                acc_s = "–" if acc is None else f"{acc:.1%}"
                for a in res["attacks"]:
                    label = f"{a['name']} ({a['role']}→{a['target']})"
                    print(
                        f"{name:<26} {seed:>4} {label:<44} "
                        f"{a['recovered']:>4}/{a['total']:<5} {acc_s:>8} {wall:>7.1f}  "
                        f"{_summarise(a)}"
                    )
                    if a["total"]:
                        summary.setdefault(f"{name} {a['target']}", []).append(
                            a["recovered"] / a["total"]
                        )
            print(f"{'':<26}      reference: {reference}")
    if args.seeds > 1:
        print("\nrecovered fraction over seeds (mean, min, max):")
        for key, vals in summary.items():
            print(f"  {key:<44} {statistics.mean(vals):.2f} {min(vals):.2f} {max(vals):.2f}")
    return 0

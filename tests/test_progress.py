"""Progress of long phases: silent by default, one line per phase in logs, real counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privfl import progress
from privfl.attacks.gradient_inversion import AttackerKnowledge, dlg, inverting_gradients


@pytest.fixture
def mode():
    before = progress.mode()
    yield progress.configure
    progress.configure(before)


def test_library_is_silent_unless_asked(capsys):
    assert progress.mode() == "off"
    with progress.phase("quiet", total=3) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""


def test_plain_mode_prints_one_line_per_finished_phase(mode, capsys):
    mode("plain")
    with progress.phase("shadow models", total=4) as bar:
        for _ in range(4):
            bar.advance(status="ok")
    with progress.phase("target model"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("privfl: shadow models 4/4 (") and lines[0].endswith(", ok)")
    assert lines[1].startswith("privfl: target model (")
    with pytest.raises(ValueError, match="progress mode"):
        progress.configure("loud")


def test_rich_mode_draws_and_stops(mode):
    mode("rich")
    with progress.phase("bar", total=2) as bar:
        bar.advance(2)
        assert bar._bar is not None and bar._bar.live.is_started
    assert not bar._bar.live.is_started


def _recording(monkeypatch):
    seen: list[tuple[str, int, int | None]] = []
    real = progress.Phase._finish

    def finish(self, failed):
        seen.append((self.description, self.completed, self.total))
        real(self, failed)

    monkeypatch.setattr(progress.Phase, "_finish", finish)
    return seen


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    loss = nn.functional.cross_entropy(model(x), y)
    target = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    kn = AttackerKnowledge(batch_size=2, input_shape=(1, 4, 4), num_classes=3)
    return model, target, kn, y


def test_dlg_reports_every_lbfgs_phase_to_its_budget(monkeypatch):
    seen = _recording(monkeypatch)
    model, target, kn, y = _case()
    dlg(model, target, kn, labels=y, iterations=30, restarts=2, warmup=10, segment=4)
    names = [s[0] for s in seen]
    assert names[:2] == [
        "gradient inversion: DLG random start 1/2, L-BFGS",
        "gradient inversion: DLG random start 2/2, L-BFGS",
    ]
    assert names[-1] == "gradient inversion: DLG polish, L-BFGS"
    assert all(done == total for _, done, total in seen)
    assert sum(total for *_, total in seen) >= 2 * 10 + 20


def test_inverting_gradients_reports_each_restart(monkeypatch):
    seen = _recording(monkeypatch)
    model, target, kn, y = _case()
    inverting_gradients(model, target, kn, labels=y, iterations=5, restarts=2)
    assert [(done, total) for _, done, total in seen] == [(5, 5), (5, 5)]

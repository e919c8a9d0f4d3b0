"""Your own model and data: ``model.name = "module:factory"`` and ``data.dataset =
"module:loader"`` (colour images and tabular rows) through the scenario loader, secure
aggregation and the imprint attack; CIFAR-10's pickle layout; loader errors."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from privfl import run_scenario
from privfl.architecture import build_model
from privfl.attacks.imprint import (
    ImprintBlock,
    RiggedModel,
    bin_edges,
    measurement_vector,
    reconstruct_from_update,
)
from privfl.clients.app import make_client_app
from privfl.config import Scenario, ScenarioError, load_scenario, resolve_scenario_path
from privfl.data import DataError, flwr_datasets_partition, load_dataset, load_federation
from privfl.errors import UserError
from privfl.evaluation.imprint import evaluate_imprint
from privfl.flower.loopback import LoopbackGrid
from privfl.metrics.images import image_grid_figure, psnr
from privfl.models import build_task_model
from privfl.server import run_federation

torch.set_num_threads(1)

MODULE = "privfl_test_user_plugins"

# What a user writes: a model factory and loaders returning numpy arrays or torch Datasets.
USER_MODULE = textwrap.dedent(
    """
    import math

    import numpy as np
    import torch
    from torch import nn


    def tiny_cnn(input_shape, num_classes):
        c, h, w = input_shape
        return nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(4),
            nn.Flatten(),
            nn.Linear(4 * (h // 4) * (w // 4), num_classes),
        )


    def tiny_mlp(input_shape, num_classes):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), 16), nn.ReLU(),
            nn.Linear(16, num_classes),
        )


    def wrong_outputs(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


    def not_a_module(input_shape, num_classes):
        return "a model"


    def ignores_the_shape(input_shape, num_classes):
        return nn.Linear(7, num_classes)


    def _colour(n, rng):
        # Four classes: a bright band in channel y % 3, top or bottom half by y // 3.
        y = rng.integers(0, 4, n)
        x = rng.uniform(0.0, 0.4, (n, 3, 32, 32)).astype(np.float32)
        for i, c in enumerate(y):
            top = 16 * (c // 3)
            x[i, c % 3, top : top + 16] += 0.5
        return x, y.astype(np.int64)


    def colour_images(root, seed):
        rng = np.random.default_rng(seed)
        return (*_colour(160, rng), *_colour(60, rng))


    def rows(root, seed):
        # Standardised features (negative values allowed); the class is a linear rule.
        rng = np.random.default_rng(seed)
        w = rng.normal(size=(12, 3))

        def make(n):
            x = rng.normal(size=(n, 12)).astype(np.float32)
            return x, (x @ w).argmax(1).astype(np.int64)

        return (*make(300), *make(80))


    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = torch.from_numpy(x), y

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])


    def torch_sets(root, seed):
        a, b, c, d = colour_images(root, seed)
        return Pairs(a, b), Pairs(c, d)


    def float64(root, seed):
        a, b, c, d = rows(root, seed)
        return a.astype(np.float64), b, c, d


    def with_nan(root, seed):
        a, b, c, d = rows(root, seed)
        c[3, 2] = np.nan
        return a, b, c, d


    def three(root, seed):
        return rows(root, seed)[:3]


    def float_labels(root, seed):
        a, b, c, d = rows(root, seed)
        return a, b.astype(np.float32), c, d


    def too_bright(root, seed):
        a, b, c, d = colour_images(root, seed)
        return a * 2, b, c, d


    def shapes_differ(root, seed):
        a, b, c, d = colour_images(root, seed)
        return a, b, c[:, :, :16], d


    def raises(root, seed):
        raise OSError(f"no such file: {root}/table.csv")
    """
)


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """The user's module on ``PYTHONPATH`` (as a user would put it there), importable here
    and in any process started from here."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{MODULE}.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(folder), prepend=":")
    yield folder
    mp.undo()
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


def _scenario(dataset: str, model: str, *extra: str) -> Scenario:
    return Scenario.from_dict({}).replace(
        [
            f'data.dataset="{MODULE}:{dataset}"',
            f'model.name="{MODULE}:{model}"',
            "data.parties=2",
            "data.partition=iid",
            "scenario.rounds=2",
            "training.batch_size=16",
            "training.lr=0.2",
            "training.momentum=0.9",
            *extra,
        ]
    )


def _run(tmp_path, sc: Scenario) -> dict:
    """The server and parties of ``sc`` in this process (Flower messages, no Ray)."""
    nodes = {100 + p: p for p in range(sc.data.parties)}
    grid = LoopbackGrid(make_client_app(sc), nodes)
    run_federation(grid, sc, tmp_path / "run", progress=False)
    return json.loads((tmp_path / "run" / "results.json").read_text())


# --------------------------------------------------------------------------- models


def test_builtin_models_adapt_to_the_sample_shape():
    for name in ("cnn", "lenet", "mlp"):
        model = build_task_model(name, 7, 16, input_shape=(3, 32, 20))
        assert model(torch.rand(2, 3, 32, 20)).shape == (2, 7)
    assert build_task_model("mlp", 4, 8, input_shape=(12,))(torch.randn(5, 12)).shape == (5, 4)
    with pytest.raises(ScenarioError, match=r"model\.name: 'cnn' takes images.*\(12,\)"):
        build_task_model("cnn", 4, input_shape=(12,))


def test_user_model_factory_is_checked_and_seeded(user_module):
    model = build_task_model(f"{MODULE}:tiny_cnn", 4, input_shape=(3, 32, 32))
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 4)
    with pytest.raises(ScenarioError, match=r"model\.name: .*\(2, 5\), expected .*\(2, 4\)"):
        build_task_model(f"{MODULE}:wrong_outputs", 4, input_shape=(3, 32, 32))
    with pytest.raises(ScenarioError, match=r"model\.name: .*returned a str"):
        build_task_model(f"{MODULE}:not_a_module", 4, input_shape=(3, 32, 32))
    with pytest.raises(ScenarioError, match=r"model\.name: .*tiny_cnn\(\(12,\), 4\) raised"):
        build_task_model(f"{MODULE}:tiny_cnn", 4, input_shape=(12,))
    with pytest.raises(ScenarioError, match=r"model\.name: .*fails on a batch of shape"):
        build_task_model(f"{MODULE}:ignores_the_shape", 4, input_shape=(12,))
    with pytest.raises(ScenarioError, match=r"model\.name: .*no attribute 'resnet'"):
        build_task_model(f"{MODULE}:resnet", 4)
    sc = _scenario("colour_images", "tiny_cnn")
    a, b = build_model(sc, 4).state_dict(), build_model(sc, 4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- loaders


def test_user_loader_through_the_scenario_loader(user_module, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        f'[data]\ndataset = "{MODULE}:colour_images"\nparties = 2\n'
        f'[model]\nname = "{MODULE}:tiny_cnn"\n'
    )
    sc = load_scenario(path)
    fed = load_federation(sc)
    assert fed.num_classes == 4 and fed.train_pool.sample_shape == (3, 32, 32)
    assert len(fed.train_pool) == 160 and len(fed.public) + len(fed.server_test) == 60
    # Same seed, same bytes; the loader is handed the scenario's seed.
    train, _, k = load_dataset(sc.data, seed=sc.scenario.seed)
    assert k == 4 and torch.equal(train.images, fed.train_pool.images)
    other, _, _ = load_dataset(sc.data, seed=1)
    assert not torch.equal(other.images, train.images)


def test_torch_dataset_pair_is_accepted(user_module):
    arrays = load_dataset(_scenario("colour_images", "tiny_cnn").data, seed=0)
    sets = load_dataset(_scenario("torch_sets", "tiny_cnn").data, seed=0)
    for a, b in zip(arrays[:2], sets[:2], strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert arrays[2] == sets[2] == 4


@pytest.mark.parametrize(
    ("loader", "error", "match"),
    [
        ("float64", DataError, r"train_x must be float32, got float64"),
        ("with_nan", DataError, r"test_x holds NaN"),
        ("three", DataError, r"returned 3 values; expected"),
        ("float_labels", DataError, r"train_y must hold integer class labels"),
        ("too_bright", DataError, r"train_x images must lie in \[0, 1\]"),
        ("shapes_differ", DataError, r"train_x samples have shape \(3, 32, 32\), test_x"),
        ("raises", DataError, r"the loader raised OSError: no such file"),
        ("missing", ScenarioError, r"no attribute 'missing'"),
    ],
)
def test_loader_errors_name_the_key(user_module, loader, error, match):
    sc = _scenario(loader, "tiny_mlp")
    with pytest.raises(error, match=match) as err:
        load_dataset(sc.data, seed=0)
    assert str(err.value).startswith("data.dataset") and isinstance(err.value, UserError)


def test_validating_a_scenario_imports_nothing(tmp_path, monkeypatch):
    # Parties parse the scenario in every server message: naming a module there must not
    # make them import it (they build models and load data from their own copy only).
    (tmp_path / "privfl_never_imported.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {
        "model": {"name": "privfl_never_imported:build"},
        "data": {"dataset": "privfl_never_imported:load"},
    }
    Scenario.from_json(Scenario.from_dict(raw).to_json())
    assert "privfl_never_imported" not in sys.modules


def test_loader_module_that_does_not_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "privfl_broken_loader.py").write_text("import not_a_real_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sc = Scenario.from_dict({"data": {"dataset": "privfl_broken_loader:load"}})
    with pytest.raises(ScenarioError, match=r"data\.dataset: importing 'privfl_broken_loader'"):
        load_federation(sc)
    sc = Scenario.from_dict({"data": {"dataset": "privfl_no_such_module:load"}})
    with pytest.raises(ScenarioError, match=r"data\.dataset: no module named"):
        load_federation(sc)


# --------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder, n_per_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's ``cifar-10-batches-py`` layout, pickled the way the original is."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": y}, f, protocol=2)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def test_cifar10_pickle_layout_loads(tmp_path):
    x, y = _write_cifar(tmp_path / "cifar-10-batches-py", 6)
    sc = Scenario.from_dict({"data": {"dataset": "cifar10", "root": str(tmp_path), "parties": 2}})
    fed = load_federation(sc)
    assert fed.num_classes == 10 and fed.train_pool.sample_shape == (3, 32, 32)
    assert len(fed.train_pool) == 30 and len(fed.public) + len(fed.server_test) == 6
    # Row-major RGB planes of 32 x 32, scaled to [0, 1].
    want = torch.from_numpy(x[:30].reshape(30, 3, 32, 32)).float() / 255
    assert torch.equal(fed.train_pool.images, want)
    assert fed.train_pool.labels.tolist() == y[:30].tolist()
    # The model follows the data's shape.
    assert build_model(sc, 10)(fed.public.images).shape == (len(fed.public), 10)


def test_cifar10_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.root: no cifar10 files"):
        load_dataset(
            Scenario.from_dict({"data": {"dataset": "cifar10", "root": str(tmp_path)}}).data
        )
    with pytest.raises(DataError, match=r"data\.dataset = 'cifar10' needs data\.root"):
        load_dataset(Scenario.from_dict({"data": {"dataset": "cifar10"}}).data)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder, 2)
    # A pickle that would run code is refused, not executed.
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR batch.*refusing"):
        load_dataset(
            Scenario.from_dict({"data": {"dataset": "cifar10", "root": str(tmp_path)}}).data
        )


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_any_torchvision_dataset_on_disk(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    via_class = load_dataset(
        Scenario.from_dict({"data": {"dataset": "torchvision:MNIST", "root": str(tmp_path)}}).data
    )
    builtin = load_dataset(Scenario.from_dict({"data": {"root": str(tmp_path)}}).data)
    for a, b in zip(via_class[:2], builtin[:2], strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert via_class[2] == builtin[2] == 10
    for name, match in (
        ("torchvision:NoSuchSet", r"torchvision\.datasets has no dataset class 'NoSuchSet'"),
        ("torchvision:FakeData", r"the class takes neither train= nor split="),
        ("torchvision:CIFAR10", r"torchvision could not read it"),
    ):
        data = Scenario.from_dict({"data": {"dataset": name, "root": str(tmp_path)}}).data
        with pytest.raises(UserError, match=rf"data\.dataset = {name}: {match}"):
            load_dataset(data)


def test_flwr_datasets_partitioner_is_optional():
    sc = Scenario.from_dict({"data": {"partitioner": "flwr-datasets", "partition": "dirichlet"}})
    try:
        import flwr_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ScenarioError, match=r"data\.partitioner: .*install flwr-datasets"):
            load_federation(sc)
        return
    fed = load_federation(sc)
    parts = [p.indices for p in fed.parties]
    assert sum(len(p) for p in parts) == len(fed.train_pool)
    assert len(np.unique(np.concatenate(parts))) == len(fed.train_pool)
    again = flwr_datasets_partition(
        fed.train_pool.labels.numpy(), 3, "dirichlet", alpha=0.5, shards_per_party=2, seed=0
    )
    assert all(np.array_equal(np.sort(p), q) for p, q in zip(parts, again, strict=True))


# --------------------------------------------------------------------------- federated runs


@pytest.mark.parametrize(("loader", "model"), [("colour_images", "tiny_cnn"), ("rows", "tiny_mlp")])
def test_secure_aggregation_run_on_user_model_and_data(user_module, tmp_path, loader, model):
    sc = _scenario(loader, model, 'defense.secure_aggregation="additive"')
    res = _run(tmp_path, sc)
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]
    assert not any(r.get("faults") for r in res["rounds"])
    # Both tasks are learnable: two rounds beat chance (1/4 and 1/3) clearly.
    assert res["final"]["accuracy"] > 0.7
    assert res["config"]["model"]["name"] == f"{MODULE}:{model}"


@pytest.mark.parametrize(("loader", "model"), [("colour_images", "tiny_cnn"), ("rows", "tiny_mlp")])
def test_dp_sgd_inside_secure_aggregation_on_user_model_and_data(
    user_module, tmp_path, loader, model
):
    sc = _scenario(
        loader,
        model,
        'defense.secure_aggregation="masking"',
        'defense.dp.mode="client"',
        "defense.dp.epsilon=8.0",
    )
    res = _run(tmp_path, sc)
    assert not any(r.get("faults") for r in res["rounds"])
    # Opacus' per-sample gradients ran on the user's layers and the budget was met.
    assert 7.0 < res["final"]["epsilon"] <= 8.0


def test_imprint_recovers_colour_images_exactly():
    gen = torch.Generator().manual_seed(0)
    shape = (3, 32, 32)
    truth = torch.rand(12, *shape, generator=gen) * (torch.rand(12, 1, 1, 1, generator=gen) + 0.2)
    truth = truth.clamp(0, 1)
    labels = torch.randint(0, 4, (12,), generator=gen)
    a = measurement_vector("random", seed=1, image_shape=shape)
    m = truth.flatten(1) @ a
    s = m.sort().values
    edges = torch.cat([s[:1] - 1.0, (s[1:] + s[:-1]) / 2])  # one sample per bin
    torch.manual_seed(0)
    model = RiggedModel(
        ImprintBlock(a, edges, image_shape=shape),
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)),
    )
    updates = []
    for part in (slice(0, 5), slice(5, 12)):  # two parties, one SGD step each
        model.zero_grad()
        nn.functional.cross_entropy(model(truth[part]), labels[part]).backward()
        updates.append({k: -0.5 * p.grad.double() for k, p in model.named_parameters()})
    aggregate = {k: 0.4 * updates[0][k] + 0.6 * updates[1][k] for k in updates[0]}
    rec = reconstruct_from_update(aggregate, model.info)
    assert rec.images.shape == (12, *shape) and rec.collisions == 0
    nearest = (rec.images[:, None] - truth[None]).abs().flatten(2).amax(-1)
    assert nearest.min(1).values.max() < 1e-4
    assert sorted(nearest.argmin(1).tolist()) == list(range(12))
    assert bool((psnr(rec.images, truth[nearest.argmin(1)]) > 60).all())


def test_imprint_bins_tabular_rows():
    # Rows are not pixels: readouts keep their sign; 'dct' needs images.
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(6, 10, generator=gen)
    a = measurement_vector("random", seed=3, image_shape=(10,))
    s = (rows @ a).sort().values
    block = ImprintBlock(a, torch.cat([s[:1] - 1.0, (s[1:] + s[:-1]) / 2]), image_shape=(10,))
    model = RiggedModel(block, nn.Linear(10, 3))
    nn.functional.cross_entropy(model(rows), torch.arange(6) % 3).backward()
    update = {k: -p.grad.double() for k, p in model.named_parameters()}
    rec = reconstruct_from_update(update, model.info)
    assert rec.images.shape == (6, 10) and float(rec.images.min()) < 0
    err = (rec.images[:, None] - rows[None]).abs().amax(-1).min(1).values
    assert err.max() < 1e-4
    with pytest.raises(ValueError, match="'dct' needs images"):
        measurement_vector("dct", image_shape=(10,))
    assert bin_edges(rows @ a, 3).shape == (3,)
    # Scored like images (PSNR per row), without SSIM, which needs a 2-D neighbourhood.
    sc = Scenario.from_dict({"attack": {"kind": "imprint"}})
    report = evaluate_imprint(
        rec.images[:4],
        rows,
        scenario=sc,
        role="malicious-server",
        bins=6,
        expected=0.5,
        seconds=0.0,
        collisions=0,
    )
    assert (report.recovered, report.total) == (4, 6) and report.metrics["psnr_mean"] > 60


def test_image_grids_draw_any_channel_count():
    for channels in (1, 2, 3, 4):
        images = torch.rand(3, channels, 8, 8)
        fig = image_grid_figure(images, images.flip(0), perm=[2, 1, 0])
        drawn = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
        assert len(drawn) == 6
        assert drawn[0].shape == ((8, 8, channels) if channels in (3, 4) else (8, 8))


def test_malicious_server_reads_colour_images_out_of_the_secure_aggregate(user_module, tmp_path):
    sc = _scenario(
        "colour_images",
        "tiny_cnn",
        'defense.secure_aggregation="masking"',
        'attack.kind="imprint"',
        "attack.imprint.round=2",
        "attack.imprint.local_steps=1",
        "attack.imprint.batch_size=4",
        "attack.imprint.lr=1.0",
        "attack.imprint.bins=64",
        "attack.imprint.public_samples=30",
        'attack.imprint.measurement="random"',
        "attack.imprint.probe_scale=0.05",  # small probes: the block barely disturbs training
    )
    res = _run(tmp_path, sc)
    assert not any(r.get("faults") for r in res["rounds"])
    (attack,) = res["attacks"]
    assert attack["name"] == "imprint" and attack["total"] == 8
    # 8 samples in 64 bins: about 7 alone in theirs, each recovered exactly.
    assert attack["recovered"] >= 4
    assert attack["metrics"]["psnr_mean"] > 40
    assert (tmp_path / "run" / "imprint_malicious-server.png").is_file()


def test_malicious_participant_reads_colour_images_of_the_others(user_module, tmp_path):
    sc = _scenario(
        "colour_images",
        "tiny_cnn",
        "data.parties=3",
        "data.samples_per_party=40",
        "training.batch_size=4",
        "training.local_steps=1",
        'defense.secure_aggregation="additive"',
        'attack.kind="imprint"',
        'attack.imprint.role="malicious-participant"',
        "attack.imprint.participant=0",
        "attack.imprint.round=1",
        "attack.imprint.bins=64",
        "attack.imprint.public_samples=30",
        'attack.imprint.measurement="random"',
        "attack.imprint.probe_scale=0.05",
    )
    res = _run(tmp_path, sc)
    (attack,) = res["attacks"]
    # The two other parties' 4 + 4 samples, read off two consecutive global models.
    assert attack["role"] == "malicious-participant" and attack["total"] == 8
    assert attack["recovered"] >= 4 and attack["metrics"]["psnr_mean"] > 40


def test_dlg_recovers_a_colour_image_from_one_update(user_module, tmp_path):
    # iDLG on the sigmoid LeNet, which adapts to 3 x 32 x 32; one party's batch of 1.
    sc = load_scenario(
        resolve_scenario_path("dlg_batch1"),
        [
            f'data.dataset="{MODULE}:colour_images"',
            "attack.gradient_inversion.auxiliary_samples=30",
            "attack.gradient_inversion.restarts=1",
        ],
    )
    res = _run(tmp_path, sc)
    (attack,) = res["attacks"]
    assert attack["name"] == "gradient-inversion" and attack["total"] == 1
    assert attack["recovered"] == 1 and attack["metrics"]["psnr_mean"] > 18


@pytest.mark.parametrize(("loader", "model"), [("colour_images", "tiny_cnn"), ("rows", "tiny_mlp")])
def test_membership_inference_on_user_model_and_data(user_module, tmp_path, loader, model):
    sc = _scenario(
        loader,
        model,
        "scenario.rounds=1",
        'attack.kind="membership-inference"',
        "attack.membership.members=40",
        "attack.membership.eval_samples=20",
        "attack.membership.public_samples=30",
        "attack.membership.shadow_models=2",
        "attack.membership.epochs=3",
        "attack.membership.qmia_epochs=3",
        "attack.membership.qmia_mimics=1",
        "attack.membership.operating_fpr=0.1",
    )
    run_federation(None, sc, tmp_path / "mia", progress=False)
    res = json.loads((tmp_path / "mia" / "results.json").read_text())
    # QMIA (its regressor and mimic), LOSS and LiRA (its shadows) all ran on this shape.
    assert len(res["attacks"]) == 3
    assert all(0.0 <= a["metrics"]["auc"] <= 1.0 for a in res["attacks"])


@pytest.mark.slow
def test_simulation_engine_imports_the_user_module_in_every_party(user_module, tmp_path):
    # Ray's workers are separate processes: they find the module through PYTHONPATH.
    sc = _scenario("colour_images", "tiny_cnn", 'defense.secure_aggregation="additive"')
    res = run_scenario(sc, tmp_path / "ray", progress=False)
    assert [r["round"] for r in res["rounds"]] == [0, 1, 2]
    assert not any(r.get("faults") for r in res["rounds"])
    assert res["final"]["accuracy"] == _run(tmp_path, sc)["final"]["accuracy"]

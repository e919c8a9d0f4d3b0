"""The one path of an update: Δ, side records and the server's transcript."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from privfl.flower import side, wire
from privfl.flower.loopback import LoopbackGrid
from privfl.flower.npy import as_numpy
from privfl.flower.transcript import RecordingGrid, Transcript
from privfl.flower.update import Update, UpdateError, delta_arrays, flat_delta, with_delta


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _sent() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return _record(
        w=rng.normal(size=(3, 2)).astype(np.float32), b=rng.normal(size=4).astype(np.float32)
    )


def test_flat_delta_is_local_minus_global_in_float64():
    sent = _sent()
    local = _record(w=sent["w"].numpy() + 0.5, b=sent["b"].numpy() - 1.0)
    d = flat_delta(sent, local)
    want = np.concatenate(
        [
            (local["w"].numpy().astype(np.float64) - sent["w"].numpy()).ravel(),
            (local["b"].numpy().astype(np.float64) - sent["b"].numpy()).ravel(),
        ]
    )
    assert d.dtype == np.float64 and np.array_equal(d, want)
    arrays = delta_arrays(sent, local)
    assert arrays["w"].shape == (3, 2) and np.array_equal(arrays["b"].ravel(), want[6:])


def test_with_delta_undoes_flat_delta_bit_for_bit():
    sent = _sent()
    local = _record(w=sent["w"].numpy() * 1.5, b=sent["b"].numpy() + 3.0)
    back = with_delta(sent, flat_delta(sent, local))
    for k in ("w", "b"):
        assert back[k].numpy().dtype == np.float32
        assert np.array_equal(back[k].numpy(), local[k].numpy())


def test_a_mismatched_update_names_what_is_wrong():
    sent = _sent()
    with pytest.raises(UpdateError, match="local weights have keys"):
        flat_delta(sent, _record(w=sent["w"].numpy()))
    with pytest.raises(UpdateError, match=r"'b' has shape \(5,\), expected \(4,\)"):
        flat_delta(sent, _record(w=sent["w"].numpy(), b=np.zeros(5, np.float32)))
    with pytest.raises(UpdateError, match="update has 3 entries"):
        with_delta(sent, np.zeros(3))


def test_an_update_reads_and_writes_a_reply():
    sent = _sent()
    local = _record(w=sent["w"].numpy() + 1.0, b=sent["b"].numpy())
    content = RecordDict(
        {
            "arrays": local,
            "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.5}),
            side.key(side.EPSILON): ConfigRecord({"epsilon": 1.0}),
        }
    )
    upd = Update.from_reply(sent, content)
    assert upd.weight == 12 and set(upd.side) == {"privfl.side.dp-epsilon"}
    upd.delta = upd.delta * 0.5
    upd.write(sent, content)
    assert np.allclose(content["arrays"]["w"].numpy(), sent["w"].numpy() + 0.5)
    del content["metrics"]
    with pytest.raises(UpdateError, match="lacks its 'metrics'"):
        Update.from_reply(sent, content)


def test_side_record_names_and_node_tags():
    k = side.key("imprint")
    assert k == "privfl.side.imprint" and side.node_of(k) is None
    t = side.tagged(k, 17)
    assert t == "privfl.side.17.imprint" and side.name_of(t) == "imprint"
    assert side.tagged(t, 0) == t  # already names its node: kept through every layer
    assert side.node_of(t) == 17 and side.is_side(t) and not side.is_side("arrays")
    with pytest.raises(ValueError, match="starts with a letter"):
        side.key("3x")


def _echo(msg: Message, context: Context) -> Message:
    party = int(context.node_config["partition-id"])
    content = RecordDict({"metrics": MetricRecord({"party": party})})
    content[side.key("note")] = ConfigRecord({"party": party})
    return Message(content, reply_to=msg)


def test_the_recording_grid_keeps_what_the_server_received_by_party():
    nodes = {10: 0, 11: 1, 12: 2}
    grid = LoopbackGrid(_echo, nodes)
    rec = RecordingGrid(grid, Transcript(nodes, watch=[1, 2]))
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 4})}),
            dst_node_id=n,
            message_type="train",
        )
        for n in nodes
    ]
    replies = list(rec.send_and_receive(msgs))
    assert len(replies) == 3
    (ex,) = rec.transcript.exchanges(4, "train")
    assert set(ex.sent) == set(ex.received) == {1, 2}  # watched parties only
    assert ex.received[2]["metrics"]["party"] == 2
    assert ex.config(1)["server-round"] == 4
    # A snapshot: changing the live reply later does not change the record.
    replies[0].content["metrics"]["party"] = 99
    assert all(c["metrics"]["party"] != 99 for c in ex.received.values())
    # The loopback grid refuses push/pull: no half-open exchange is left behind.
    with pytest.raises(NotImplementedError):
        rec.push_messages(msgs)
    assert len(rec.transcript.exchanges(4)) == 1
    collected = side.collect(replies)
    assert set(collected) == {f"privfl.side.{n}.note" for n in nodes}


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(6, dtype=">i4"),
        np.zeros((0, 5), dtype=np.int64),
        np.array(3.5),
        np.arange(7, dtype=np.uint32),
    ],
)
def test_as_numpy_reads_what_array_numpy_reads(value):
    arr = Array(value)
    got = as_numpy(arr)
    want = arr.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert not got.flags.writeable  # a view of the Array's own bytes


def test_as_numpy_refuses_a_truncated_payload():
    arr = Array(np.arange(10, dtype=np.float64))
    cut = Array(dtype=arr.dtype, shape=arr.shape, stype=arr.stype, data=arr.data[:-8])
    with pytest.raises(ValueError, match="holds 72 data bytes"):
        as_numpy(cut)


def test_party_lists_travel_packed_and_plain():
    packed = wire.pack_ids([0, 7, 999])
    assert isinstance(packed, bytes) and wire.ids(packed) == [0, 7, 999]
    assert wire.ids([3, 1]) == [3, 1]
    assert ConfigRecord({"p": packed})["p"] == packed
    with pytest.raises(ValueError, match="not a multiple of 4"):
        wire.ids(b"\x00\x01\x02")


def test_loopback_counts_the_bytes_flower_serialises():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from privfl.flower.loopback import message_bytes

    cfg = ConfigRecord({"p": wire.pack_ids([1, 2, 3]), "cts": [b"a" * 90, b"b" * 90]})
    msg = Message(
        RecordDict({"arrays": _sent(), "config": cfg}), dst_node_id=1, message_type="train"
    )
    # One id computation per object (as Flower's grids push), the same bytes.
    want = sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())
    assert message_bytes(msg) == want > 6 * 4 + 4 * 4 + 180

"""An in-process Flower Grid: delivers messages straight to a ClientApp.

Used by the tests and the benchmark to run the real message stages (strategy, mods,
handlers, serialised records) without Ray or a SuperLink. Message content is deep-copied
both ways (no shared objects between server and nodes) and the byte counts are the
sizes of the serialised Flower objects.
"""

from __future__ import annotations

import copy
import itertools
import traceback
from collections.abc import Callable, Iterable
from types import SimpleNamespace

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.task_identity import TaskIdentity

from privfl.flower.wire import copy_content

DropRule = Callable[[int, str], bool]


def message_bytes(msg: Message) -> int:
    """Serialised size of a message and everything it carries.

    Each object's id is computed once, as Flower's own grids do when they push a
    message (a parent's id otherwise re-serialises every child below it)."""
    with no_object_id_recompute():
        return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


class LoopbackGrid(Grid):
    """A Grid over ``apps(node_id) -> ClientApp`` with per-node persistent Contexts.

    Parameters
    ----------
    app : Callable[[Message, Context], Message]
        The ClientApp every node runs.
    partitions : dict[int, int]
        Node id -> ``partition-id``.
    drop : DropRule, optional
        ``drop(node_id, message_type)`` True: that node does not answer that message.
    """

    def __init__(
        self,
        app: Callable[[Message, Context], Message],
        partitions: dict[int, int],
        *,
        drop: DropRule | None = None,
        run_id: int = 1,
    ) -> None:
        self.app = app
        self.drop = drop or (lambda _n, _t: False)
        self.contexts = {
            n: Context(
                run_id=run_id,
                node_id=n,
                node_config={"partition-id": p},
                state=RecordDict(),
                run_config={},
            )
            for n, p in partitions.items()
        }
        self.bytes_down: dict[int, int] = dict.fromkeys(partitions, 0)
        self.bytes_up: dict[int, int] = dict.fromkeys(partitions, 0)
        self.round_trips = 0
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0

    def set_run(self, run_id: int) -> None:
        TaskIdentity.run_id = run_id

    @property
    def run(self) -> SimpleNamespace:
        """The run as Flower's legacy workflows read it (``run.run_id``)."""
        return SimpleNamespace(run_id=TaskIdentity.run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid only supports send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Deliver each message to its node; a dropped node gives no reply."""
        self.round_trips += 1
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.bytes_down[node] += message_bytes(msg)
            if self.drop(node, msg.metadata.message_type):
                continue
            delivered = Message(copy_content(msg.content), metadata=copy.copy(msg.metadata))
            try:
                reply = self.app(delivered, self.contexts[node])
            except Exception as exc:  # a failing ClientApp becomes an error reply
                self.errors.append(f"node {node}: {exc}")
                reply = Message(Error(code=0, reason=traceback.format_exc()), reply_to=msg)
            self.bytes_up[node] += message_bytes(reply)
            if reply.has_content():
                reply = Message(copy_content(reply.content), metadata=copy.copy(reply.metadata))
            replies.append(reply)
        return replies

"""A hospital's node on Flower's deployment engine: the SuperNode and a warm ClientApp runner.

``python -m privfl.node supernode ARGS`` is ``flower-supernode ARGS`` with a short idle
poll; ``python -m privfl.node clientapp --runtime-api HOST:PORT`` runs privfl's ClientApp
for a SuperNode started with ``--isolation process``, one message after another in one
long-lived process.

Why not Flower's defaults: in Flower 1.42 a SuperNode in ``subprocess`` isolation starts
a fresh ``flwr-clientapp`` process for every message, which imports torch and loads the
data again (seconds on a small machine, for each of a round's several messages), and
its pull loop sleeps a fixed 3 s whenever the SuperLink has nothing for it, so every
exchange of a round waits up to 3 s more. The runner here serves the same Runtime API
calls as ``flwr-clientapp`` (acquire a task, pull its message and context, push the reply
and the context back), so the node's state lives in the SuperNode exactly as with
Flower's runner; only the process and its imports are kept between messages. A plain
``flower-supernode`` in the default isolation runs the same ClientApp, more slowly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    pull_and_inflate_object_from_tree,
    pull_objects,
)
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode import start_client_internal
from flwr.supernode.cli.flower_supernode import flower_supernode
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

# Seconds a SuperNode sleeps when the SuperLink had no message for it (Flower: 3 s).
IDLE_POLL_S = 0.05
# The runner's wait between asking its SuperNode for a task.
TASK_POLL_S = 0.01
# First retry and longest wait while a message's objects are still arriving (Flower: 1 s, 10 s).
OBJECT_RETRY_S = 0.005
OBJECT_RETRY_CAP_S = 0.1


class _ShortSleep:
    """The ``time`` module with ``sleep`` capped, for Flower's fixed idle waits."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_object_retries(module: Any) -> None:
    """Make ``module``'s object pulls retry after 5 ms (growing to 0.1 s), not after 1 s.

    A message is listed before all its objects have arrived (the sender pushes the
    message, then its objects); whoever polls quickly then finds objects missing and,
    with Flower's defaults, waits 1 s, then 2 s. Flower has no option for these waits;
    the modules call ``pull_objects`` by the name they imported.
    """
    module.pull_objects = functools.partial(
        pull_objects, initial_backoff=OBJECT_RETRY_S, backoff_cap=OBJECT_RETRY_CAP_S
    )


def run_supernode(argv: list[str], idle_poll: float = IDLE_POLL_S) -> None:
    """``flower-supernode argv`` with an idle wait of ``idle_poll`` s (not 3 s) and short
    object-pull retries."""
    # Flower has no option for this wait; its loop reads ``time`` from its module.
    start_client_internal.time = _ShortSleep(idle_poll)  # type: ignore[assignment]
    shorten_object_retries(start_client_internal)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _runtime_client(address: str, component: str, token: str | None = None) -> Any:
    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on the node's own loopback
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def pull_task_input(client: Any, times: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The task's message and context, as Flower's ``pull_task_input`` with a short retry.

    The SuperNode hands out a task while it is still fetching the message's objects from
    the SuperLink; Flower's object pull then backs off from 1 s (1 s, 2 s, ...), which
    a warm runner, asking at once, would pay on nearly every message.
    """
    times = {} if times is None else times
    t0 = time.perf_counter()
    res = client.PullTaskInput(PullTaskInputRequest())
    times["pull-task"] = time.perf_counter() - t0
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    times["pull-message"] = time.perf_counter() - t0
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode handed out a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=OBJECT_RETRY_S,
        backoff_cap=OBJECT_RETRY_CAP_S,
    )
    times["pull-objects"] = time.perf_counter() - t0
    # The deflated message does not carry its own ID (its object ID).
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context


def run_task(address: str, token: str, app: Callable[..., Any], timings: str | None = None) -> None:
    """Run one task the SuperNode handed out: its message through ``app``, reply pushed back.

    ``timings``: a file to which a JSON line with the task's phases (seconds) is appended.
    """
    t0 = time.perf_counter()
    client = _runtime_client(address, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    times: dict[str, Any] = {"start": time.time()}
    try:
        message, context = pull_task_input(client, times)
        times["type"] = message.metadata.message_type
        times["round"] = message.metadata.group_id
        t1 = time.perf_counter()
        times["pull"] = t1 - t0
        try:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # reported to the server, as flwr-clientapp does
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
            details = reason
        t2 = time.perf_counter()
        times["app"] = t2 - t1
        push_message(client, reply, context)
    finally:
        push_task_output(client, context, status, details)
        heartbeat.stop()
        client.close()
    times["push"] = time.perf_counter() - t2
    times["end"] = time.time()
    if timings is not None:
        with open(timings, "a") as fh:
            fh.write(json.dumps(times) + "\n")


def serve_clientapp(address: str, poll: float = TASK_POLL_S, timings: str | None = None) -> None:
    """Acquire the SuperNode's ClientApp tasks and run each in this process, forever."""
    # Imported here: the SuperNode's process, which shares this module, never loads torch.
    from privfl.clients.app import app

    acquirer = _runtime_client(address, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        res = acquirer.AcquireTask(request)
        if res.HasField("task") and res.token:
            try:
                run_task(address, res.token, app, timings)
            except Exception:  # one failed exchange (its task is marked failed) is not fatal
                traceback.print_exc()
        else:
            time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    """``python -m privfl.node supernode ARGS`` | ``clientapp --runtime-api HOST:PORT``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:
        run_supernode(argv[1:])
        return
    p = argparse.ArgumentParser(prog="python -m privfl.node", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("supernode", help="flower-supernode with a short idle poll")
    c = sub.add_parser("clientapp", help="run privfl's ClientApp for a SuperNode")
    c.add_argument("--runtime-api", required=True, metavar="HOST:PORT")
    c.add_argument("--timings", metavar="FILE", help="append each task's phase times here")
    args = p.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    serve_clientapp(args.runtime_api, timings=args.timings)


if __name__ == "__main__":
    main()

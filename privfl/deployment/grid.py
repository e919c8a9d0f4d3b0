"""The ServerApp's grid on a SuperLink: a short, growing wait between polls for replies."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message

from privfl.flower.transcript import GridProxy

# The ServerApp's wait between asking the SuperLink for replies: a tenth of the time
# spent so far, within these bounds (Flower's HTTP grid waits a fixed 3 s).
_POLL_MIN_S = 0.005
_POLL_MAX_S = 0.2


class PollingGrid(GridProxy):
    """The SuperLink's grid with a short, growing wait between polls for replies."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` passed."""
        pending = set(self.grid.push_messages(messages))
        start = time.monotonic()
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            spent = time.monotonic() - start
            if not pending or (timeout is not None and spent >= timeout):
                break
            time.sleep(min(max(0.1 * spent, _POLL_MIN_S), _POLL_MAX_S))
        return replies

"""Conversations over HTTP: `/v1/ask` follow-ups that continue an earlier answer.

An answer returns a conversation id; a question sent with it is answered with the earlier turns in
its prompt, so it extends that conversation's own path in the KV cache instead of starting over.
The server keeps the most recently used conversations (a bounded LRU, like a chat server's
sessions), and one question at a time per conversation: a turn must see the previous one.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from ragcache.answer import Conversation
from ragcache.errors import InvalidRequestError
from serve.errors import NotFoundError


class ConversationBusyError(InvalidRequestError):
    """A question of this conversation is still being answered."""

    http_status = 409


class Conversations:
    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def open(self, conversation_id: str | None) -> tuple[str, Conversation]:
        """The conversation to answer in (a new one for None), marked busy until `release`.

        Raises NotFoundError (404) for an id this server does not hold (never issued, or pushed
        out by newer ones), ConversationBusyError (409) while its previous question runs.
        """
        with self._lock:
            if conversation_id is None:
                conversation_id = uuid.uuid4().hex
                self._items[conversation_id] = Conversation()
                # The least recently used idle ones go; a busy one stays until its turn ends.
                excess = len(self._items) - self.capacity
                for old in [c for c in self._items if c not in self._busy][: max(0, excess)]:
                    self._items.pop(old)
            elif conversation_id not in self._items:
                raise NotFoundError(
                    f"no conversation {conversation_id[:64]!r} on this server",
                    hint="it expired or was never issued: ask without `conversation` to start one",
                )
            if conversation_id in self._busy:
                raise ConversationBusyError(
                    "the previous question of this conversation is still being answered",
                    hint="wait for its answer, then ask the follow-up",
                )
            self._busy.add(conversation_id)
            self._items.move_to_end(conversation_id)
            return conversation_id, self._items[conversation_id]

    def release(self, conversation_id: str) -> None:
        with self._lock:
            self._busy.discard(conversation_id)

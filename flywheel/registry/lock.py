"""The lock that serialises alias moves, kept in the registry itself.

A registered model named ``<name>--alias-lock``, whose creation is atomic in every MLflow
store (a unique name). Processes on different machines (two KFP pods) share no file
system, so a file lock would not do. A lock older than ``registry.lock_stale_s`` is from a
dead process and is broken.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from flywheel.config import RegistryConfig
from flywheel.errors import RegistryError
from flywheel.registry.adapter import Conflict, MlflowAdapter, NotFoundError
from flywheel.registry.history import default_actor

log = logging.getLogger(__name__)

LOCK_SUFFIX = "--alias-lock"
OWNER_TAG = "flywheel.lock.owner"
SINCE_TAG = "flywheel.lock.since"


@contextmanager
def alias_lock(store: MlflowAdapter, name: str, cfg: RegistryConfig) -> Iterator[None]:
    """Hold the alias-move lock of registered model `name` for the block."""
    lock = f"{name}{LOCK_SUFFIX}"
    client = store.client
    owner = f"{default_actor()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + cfg.lock_timeout_s
    delay = 0.05
    while True:
        try:
            store.call(
                "acquire the alias lock",
                client.create_registered_model,
                lock,
                tags={OWNER_TAG: owner, SINCE_TAG: repr(time.time())},
                description=f"Transient lock serialising alias moves of {name}.",
            )
            break
        except Conflict:
            pass
        except NotFoundError:
            # MLflow's SQL store answers a duplicate name by reading the existing model;
            # when its holder released it in between, that read is a 404: free again.
            continue
        try:
            held = store.call("read the alias lock", client.get_registered_model, lock)
        except NotFoundError:
            continue  # released meanwhile: try again at once
        since = float(held.tags.get(SINCE_TAG, "0") or 0)
        age = time.time() - since
        if age > cfg.lock_stale_s:
            # Its owner died mid-move. Two breakers racing here could both delete and
            # re-create; the window is one round trip after a crash, accepted.
            log.warning(
                "breaking a stale alias lock (%s, %.0fs old)", held.tags.get(OWNER_TAG), age
            )
            with suppress(NotFoundError):
                store.call("break a stale lock", client.delete_registered_model, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"another alias move of {name} holds the lock "
                f"({held.tags.get(OWNER_TAG)}, {age:.0f}s); gave up after "
                f"{cfg.lock_timeout_s:g}s (registry.lock_timeout_s)"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    try:
        yield
    finally:
        try:
            store.call("release the alias lock", client.delete_registered_model, lock)
        except RegistryError as exc:
            log.warning(
                "could not release %s (%s); it expires after %gs", lock, exc, cfg.lock_stale_s
            )

"""A tokenizer or model named by hub id: can it load now, and must it stay off the network?

`from_pretrained('org/name')` without a network retries for ~25 s and logs a warning per
try before it fails. One bounded request tells the same in about a second, so a stage that
needs a hub id asks here first and fails with one line naming the field. Users with a
network still load through `from_pretrained` and the hub, unchanged; users offline with a
cached copy load it from the cache without the retries.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HubAccess:
    problem: str | None  # why it cannot load now (one line), or None
    local_only: bool  # load with local_files_only=True (a local path, or the cache offline)


def _cached(name: str, files: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)


def _probe(name: str, timeout: float) -> str | None:
    """None when the hub answers for `name`; else why not, in a few words.

    In a daemon thread with a deadline: the HTTP timeout does not bound a DNS lookup.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    result: list[str | None] = []

    def ask() -> None:
        try:
            HfApi().model_info(name, timeout=timeout)
            result.append(None)
        except GatedRepoError:
            result.append("gated: accept its terms on the hub and log in (`hf auth login`)")
        except RepositoryNotFoundError:
            result.append("no such repository on the hub (or a private one: log in)")
        except Exception as exc:  # httpx/requests errors, timeouts: the hub is not reachable
            text = " ".join(str(exc).split())[:160] or type(exc).__name__
            result.append(f"unreachable: {text}")

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return result[0] if result else f"unreachable: no answer in {timeout:.0f} s"


def access(name: str, files: tuple[str, ...] = ("config.json",)) -> HubAccess:
    """How `from_pretrained(name)` can load `name` (a local path or a hub id) right now.

    `files`: what a cached copy must hold (a tokenizer's or a model's config file).
    """
    from huggingface_hub import constants, is_offline_mode

    from flywheel.config import _existing_path_or_hub_id  # the profile's own rule

    if Path(name).expanduser().exists():
        return HubAccess(None, local_only=True)
    try:
        _existing_path_or_hub_id(name)
    except ValueError as exc:  # path-like and missing: no hub lookup can help
        return HubAccess(str(exc), local_only=True)
    cached = _cached(name, files)
    if is_offline_mode():
        if cached:
            return HubAccess(None, local_only=True)
        return HubAccess(
            "not a local path, and not in the Hugging Face cache while HF_HUB_OFFLINE is set; "
            f"download it first (`hf download {name}`) or name a local directory",
            local_only=True,
        )
    why = _probe(name, PROBE_TIMEOUT_S)
    if why is None:
        return HubAccess(None, local_only=False)
    if why.startswith("unreachable") and cached:
        return HubAccess(None, local_only=True)  # offline with a cached copy: use it
    where = f"the Hugging Face Hub ({constants.ENDPOINT})"
    if why.startswith("unreachable"):
        why = (
            f"{where} is {why}, and no copy is cached; name a local directory or download it first"
        )
    else:
        why = f"{where}: {why}"
    return HubAccess(f"not a local path; {why}", local_only=False)

"""Offline-first access to the Hugging Face hub.

With no network, huggingface_hub retries each request with back-off for minutes before failing. One quick
connection test at start-up tells us; when the hub cannot be reached, the libraries are switched to offline
mode (their local cache only), so a missing model or dataset fails in seconds with a clear line.
"""

import os
import socket
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def go_offline_if_unreachable(*names):
    """Call before transformers, diffusers or datasets are imported: they read the offline flag at import.

    Only names that are neither embedded nor local paths need the hub; with none of those, nothing is probed.
    """
    if any(is_hub_id(n) for n in names) and not is_offline() and not hub_reachable():
        for variable in OFFLINE_VARIABLES:
            os.environ[variable] = "1"


def is_hub_id(name) -> bool:
    """Neither embedded nor an existing local path: only such a name is looked up on the hub."""
    from colossal_sd.embedded import is_embedded

    return bool(name) and not is_embedded(name) and not os.path.exists(os.path.expanduser(name))


def load_failure(kind: str, name: str, error: BaseException, local_form: str, source=None) -> str:
    """One line on why a model or dataset could not be loaded, and what to give instead.

    `source` is what was loaded (default: `name`). A local one gets the broken file (and line) at fault: the
    hub has nothing to do with it.
    """
    from colossal_sd.errors import first_line

    source = source or name
    if not is_hub_id(source):
        from colossal_sd.local_files import explain
        return f"cannot load {kind} '{name}': {explain(source, error)}"
    if is_offline():
        return f"cannot load {kind} '{name}': the hub is unreachable and it is not in the local cache; give a {local_form}"
    return f"cannot load {kind} '{name}': {first_line(error)} (check the name, or give a {local_form})"

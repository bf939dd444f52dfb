"""The Hugging Face hub, for a model or dataset named by its id: is it in the cache, can the hub be
reached, and what to say when neither (no network, offline mode, no such, private or gated model); where
the hub's host does not resolve, the process reads the cache only, for the call that found it so."""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

from qlora.errors import UserError


def check_hub_model(repo_id: str) -> None:
    """Before anything loads: a hub id's config.json is in the Hugging Face cache or can be fetched, else a
    UserError that says why (no network, no such or a private model, a gated one, not a transformers
    model) and what to do. Where the hub's host does not resolve and the model is cached, this process
    goes offline, so that transformers reads the cache instead of retrying the network for every file."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError)
    from huggingface_hub.utils import validate_repo_id

    from qlora.models import say

    key = f"model.name_or_path={repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"{key}: not a folder here, and not a valid hub id ({str(e).splitlines()[0]})") from None
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    offline = constants.HF_HUB_OFFLINE
    unreachable = hub_unreachable()
    if cached:
        if unreachable:
            go_offline()
            say(f"the Hugging Face hub cannot be reached ({unreachable}): reading {repo_id} from the cache")
        return
    fix = (f"fetch it where there is a network (`hf download {repo_id}`) and copy the Hugging Face cache "
           f"({constants.HF_HUB_CACHE}) here, or give a model folder")
    if offline or unreachable:
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached: {unreachable}"
        raise UserError(f"{key}: not in the Hugging Face cache, and {why}; {fix}")
    try:
        hf_hub_download(repo_id, "config.json")
    except GatedRepoError:
        raise UserError(f"{key}: a gated model; accept its terms at {constants.ENDPOINT}/{repo_id}, then log in "
                        "(`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{key}: no such model on the Hugging Face hub, or a private one; check the name, or log "
                        "in (`hf auth login`, or set HF_TOKEN)") from None
    except RemoteEntryNotFoundError:
        raise UserError(f"{key}: the hub repository has no config.json, so it is not a transformers model (for a "
                        "GGUF-only repository, download its .gguf file and give that path)") from None
    except (LocalEntryNotFoundError, OSError) as e:  # the network failed on the way (after the hub's retries)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{key}: could not fetch its config.json from the hub ({reason}); {fix}") from None


def go_offline() -> None:
    """This process reads the Hugging Face caches only, as under HF_HUB_OFFLINE=1: huggingface_hub,
    transformers and datasets read the switch at each call. Online, each file they look for on a hub that
    cannot be reached is retried for about 25 s before they fall back to the cache."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:  # else datasets takes it from huggingface_hub when imported
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    # PEFT, saving an adapter, looks the base's config.json up online to see whether the vocabulary grew,
    # and says twice that it cannot; embeddings that grow are trained and saved as lora.modules_to_save
    for message in ("Unable to fetch remote file", "Could not find a config file in"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


@contextmanager
def hub_switch_restored() -> Iterator[None]:
    """Whatever go_offline sets within, the process's offline switch is as before after it: a notebook's
    next call, once the network is back, asks the hub again (and is not told HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    datasets_was = getattr(sys.modules.get("datasets.config"), "HF_HUB_OFFLINE", was)  # its own env variable
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was
        if "datasets.config" in sys.modules:
            sys.modules["datasets.config"].HF_HUB_OFFLINE = datasets_was


def hub_unreachable() -> Optional[str]:
    """Why the hub cannot be reached at all (its host name does not resolve), or None. Under offline mode,
    which asks nothing of the hub, and behind a proxy, which resolves names itself, nothing is judged."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(k) for k in proxies):
        return None
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} does not resolve"
    return None

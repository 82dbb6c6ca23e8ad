"""`preftune push RUN_DIR --repo OWNER/NAME`: upload final/ (or final-merged/) to the Hugging Face hub.

Everything that can be checked here is checked before the network is used: the folder, the repository id, offline
mode (HF_HUB_OFFLINE), a token, and whether the hub answers at all (a short TCP probe; without it a network that
drops packets would hang in the hub client, which sets no timeout). A failure is then one line naming the step
that failed (a UserError), never a traceback or a retry loop.

The model card: a folder without README.md, or with the card training wrote and nobody edited since, gets the
card again with the repository id in its loading code; an edited card is uploaded as it is.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from preftune.errors import UserError
from preftune.files import write_file_atomically
from preftune.modelcard import ADAPTER_CONFIG, CARD, HUB_ID, model_card_text
from preftune.rundir import FINAL, FINAL_MERGED

PROBE_TIMEOUT_S = 3.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def push(run_dir: str | Path, repo: str, *, private: bool = False, merged: bool = False) -> str:
    """Create `repo` if missing (private with `private`; else the hub's default for its owner) and upload the
    folder → a one-line summary naming the repository's address."""
    run_dir = Path(run_dir)
    folder = folder_to_push(run_dir, merged)
    if not HUB_ID.match(repo):
        raise UserError(f"--repo {repo!r}: expected a hub model id OWNER/NAME (letters, digits, - _ .)")
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise UserError(f"push to {repo}: offline mode (HF_HUB_OFFLINE) is on; unset it to upload")
    if not get_token():
        raise UserError(f"push to {repo}: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    if not hub_reachable(constants.ENDPOINT):
        raise UserError(f"push to {repo}: cannot reach the Hugging Face hub ({constants.ENDPOINT})")
    refresh_card(run_dir, folder, merged, repo)
    api = HfApi()
    url = _hub_call(
        f"creating the repository {repo}", lambda: api.create_repo(repo, private=private or None, exist_ok=True)
    )
    _hub_call(
        f"uploading {folder} to {repo}",
        lambda: api.upload_folder(
            repo_id=repo, folder_path=str(folder), commit_message=f"preftune push {folder.name}/"
        ),
    )
    return f"pushed {folder} to {url or repo}"


def folder_to_push(run_dir: Path, merged: bool) -> Path:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder (expected a run folder written by `preftune train`)")
    folder = run_dir / (FINAL_MERGED if merged else FINAL)
    if not folder.is_dir():
        written = "by a LoRA run with --merge" if merged else "when the run finishes"
        raise UserError(f"{folder}: missing; it is written {written}")
    return folder


def refresh_card(run_dir: Path, folder: Path, merged: bool, repo: str) -> None:
    """Write the card with the repository id when the folder has none, or has a card preftune wrote and nobody
    edited since (the text the run folder gives now, naming the folder or the repository its code already loads,
    from an earlier push): an edited card is the user's and stays."""
    card, adapter = folder / CARD, (folder / ADAPTER_CONFIG).is_file()
    try:
        present = card.read_text(encoding="utf-8") if card.exists() else None
    except (OSError, UnicodeDecodeError):
        return
    if present is not None:
        named = re.search(r"from_pretrained\('([^'\\]*)'\)", present)
        unedited = {model_card_text(run_dir, adapter, merged=merged, repo_id=r) for r in {None, named and named[1]}}
        if present not in unedited:
            return
    write_file_atomically(card, model_card_text(run_dir, adapter, merged=merged, repo_id=repo))


def hub_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the hub within `timeout` seconds. Behind a proxy (HTTPS_PROXY, ALL_PROXY) only the proxy
    can tell: no probe, the client's own error then says what failed."""
    if any(os.environ.get(name) for name in _PROXIES):
        return True
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _hub_call(what: str, call):
    """`call()`, its connection and HTTP errors as one line: "<what> failed: <the error's first line>"."""
    from huggingface_hub import errors

    # OSError: requests' errors (huggingface_hub < 1) and HfHubHTTPError; HTTPError: httpx's (connection errors).
    failures = (OSError, getattr(errors, "HTTPError", OSError))
    try:
        return call()
    except failures as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"push: {what} failed: {first}") from None

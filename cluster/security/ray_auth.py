"""Ray's token authentication, kept on for every Ray that kimi-cluster starts or joins.

Anyone who reaches an open Ray cluster's GCS port (6379) or its dashboard's Jobs API (8265) can run code on
every node, the hole behind the ShadowRay attacks. Ray (2.52 and later) refuses callers without the cluster's
token when RAY_AUTH_MODE=token; the token lives in ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH, or
$RAY_AUTH_TOKEN), where Ray's own tools (`ray status`, `ray job submit`) find it too.

- A Ray of our own (`serve --workers`, or no ray_address) starts in token mode, with a token made here,
  readable by its owner only, if there is none.
- Before joining a running cluster, token mode is turned on when a token is at hand; after joining, the
  cluster is asked once, without the token, whether it answers anyway, and its dashboard's address is read:
  an open cluster or a dashboard beyond loopback gets one warning saying how to close it.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from cluster.addresses import is_loopback
from cluster.transport import ask_ray_without_token

MODE, TOKEN, TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
README = "see the README's \"Security\" section"


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_at_hand() -> bool:
    """Whether Ray would find a token: in $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names, or its default."""
    if os.environ.get(TOKEN):
        return True
    path = Path(os.environ[TOKEN_PATH]) if os.environ.get(TOKEN_PATH) else default_token_path()
    return path.is_file() and path.stat().st_size > 0


def write_token(path: Path) -> None:
    """A new random token, in a file created readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))


def prepare_local() -> list[str]:
    """Before starting a Ray of our own: token mode, and a token. Returns warnings for the user."""
    if os.environ.get(MODE, "").lower() == "disabled":
        return [f"{MODE}=disabled: the Ray cluster started here accepts work from anyone who reaches its ports; "
                f"unset it to keep Ray's token authentication ({README})"]
    _set_mode()
    if not token_at_hand():
        write_token(default_token_path())
    return _loose_token_file()


def prepare_remote() -> None:
    """Before joining a running cluster: token mode when a token is at hand (a cluster that has one asks)."""
    if MODE not in os.environ and token_at_hand():
        _set_mode()


def exposure_warnings(gcs_address: str, dashboard_url: str | None) -> list[str]:
    """What the cluster just joined leaves open to the network, said with how to close it."""
    warnings = []
    if answers_without_token(gcs_address):
        warnings.append(f"the Ray cluster at {gcs_address} answers callers without a token: anyone who reaches it "
                        f"can run code on every node. Start Ray with {MODE}=token on every node, with the token "
                        f"in ~/.ray/auth_token ({README})")
    host = (dashboard_url or "").split("://")[-1].rsplit(":", 1)[0]
    if host and not is_loopback(host):
        warnings.append(f"Ray's dashboard (and its Jobs API, which runs code) listens on {dashboard_url}, beyond "
                        "this machine: start the head without --dashboard-host=0.0.0.0 and reach it over SSH with "
                        f"`ray dashboard configs/ray-cluster.yaml` ({README})")
    return warnings + _loose_token_file()


def answers_without_token(gcs_address: str) -> bool:
    return ask_ray_without_token(gcs_address) == "OK"


def refuses_without_token(gcs_address: str) -> bool:
    return ask_ray_without_token(gcs_address) == "UNAUTHENTICATED"


def _set_mode() -> None:
    from ray._raylet import Config
    os.environ[MODE] = "token"
    Config.initialize("")  # Ray caches its settings: read the mode again, as Ray itself does when it sets it


def _loose_token_file() -> list[str]:
    path = Path(os.environ[TOKEN_PATH]) if os.environ.get(TOKEN_PATH) else default_token_path()
    if path.is_file() and path.stat().st_mode & 0o077:
        return [f"{path} (Ray's token) can be read by other users of this machine: chmod 600 {path}"]
    return []

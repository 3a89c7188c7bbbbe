"""nimble-edge: an embedded federated-learning orchestrator for edge gateways.

One process on a small box hosts models and training plans in one SQLite
file, hands them to nearby devices that ask to join a training cycle, and
averages the diffs they report into the next checkpoint. Nothing else runs:
no broker, no database server, no cloud.

Run it::

    python nimble_edge.py serve --db edge.sqlite --port 7000
    python nimble_edge.py demo        # the whole loop on real data
    python nimble_edge.py check-plan training_plan.cbor

Routes (bodies are CBOR; control messages may also be JSON)::

    POST /model-centric/host-training   admin   store a process, open cycle 1
    POST /model-centric/authenticate    worker  get a worker_id
    POST /model-centric/cycle-request   worker  join the open cycle
    GET  /model-centric/get-model       worker  the cycle's checkpoint
    GET  /model-centric/get-plan        worker  a plan of the process
    POST /model-centric/report          worker  a diff; idempotent per key
    GET  /model-centric/retrieve-model  admin   a checkpoint by number
    GET  /status                        anyone  processes and cycle progress
    GET  /health                        anyone  liveness

Sections, in order: settings and limits; errors; encoding; federation; HTTP;
CLI. The records and the store live beside this file, in ``nimble_store.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import hmac
import json
import logging
import math
import os
import platform
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import cbor2
import httpx
import jwt
import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from nimble_store import (  # Store and its helpers: importable from here too
    Assignment,
    Cycle,
    Process,
    Queries,
    StorageError,
    Store,
    WorkerAssignment,
    migration_files,  # noqa: F401
    process_gone,
    split_sql,  # noqa: F401
)
from plan_runtime.aggregation import (
    Accumulator,
    AggregationError,
    AveragingPlan,
    is_finite,
    load_averaging_plan,
    make_aggregator,
)
from plan_runtime.http import ServerError
from plan_runtime.mobile import MOBILE_FORMS
from plan_runtime.plan import Plan, PlanError
from plan_runtime.state import (
    ALIGN_BYTES as STATE_ALIGN_BYTES,
)
from plan_runtime.state import (
    StateError,
    decode_message,
    decode_state,
    encode_state,
    layout_state,
    load_views,
    state_spec,
)

__version__ = "0.1.0"

logger = logging.getLogger("nimble_edge")
cycle_logger = logging.getLogger("nimble_edge.cycle")
http_logger = logging.getLogger("nimble_edge.http")


# ============================================================ settings and limits

KIB = 1024
TOKEN_HASH_ROUNDS = 200_000
MIB = 1024 * KIB

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
DEFAULT_DB = "nimble-edge.sqlite"
LOG_LEVELS = ["debug", "info", "warning", "error"]


# Keys a server_config may hold, with their defaults. Unknown keys are
# refused by name so that a typo never silently changes nothing.
SERVER_CONFIG_DEFAULTS: dict[str, Any] = {
    "num_cycles": 0,
    "cycle_length": 3600,
    "min_diffs": 1,
    "max_diffs": None,
    "max_workers": None,
    "on_deadline": "extend",
    "minimum_upload_speed": 0,
    "minimum_download_speed": 0,
    "do_not_reuse_workers_until_cycle": 0,
    "pool_selection": "iterate",
    "selection_probability": 0.5,
    "assignment_timeout": None,
    "authentication": None,
}

# The speed-test routes move at most this much per request, in chunks of
# SPEED_TEST_CHUNK bytes, so a probe never holds more than one chunk.
SPEED_TEST_DEFAULT_BYTES = 1 * MIB
SPEED_TEST_MAX_BYTES = 32 * MIB
SPEED_TEST_CHUNK = 64 * KIB
# A hosted model may have at most this many tensors; it bounds how many CBOR
# items the server decodes for one upload.
MAX_MODEL_TENSORS = 100_000
# Ten years: longer cycles would give timeouts no client can represent.
MAX_CYCLE_LENGTH_S = 315_360_000
# The most items (values, list entries, map entries) a control message holds,
# in CBOR or JSON; a report's diff is one item, its tensors are not counted.
MESSAGE_MAX_ITEMS = 4096
# Counts in a server_config (cycles, diffs, workers) stay within 32 bits, so
# that every client and every CBOR or JSON library reads them back as they are.
MAX_CONFIG_WHOLE = 2**31 - 1


@dataclass(frozen=True)
class Settings:
    """What a server needs to start; every field has a CLI flag and env var."""

    db_path: Path
    admin_token: str | None = None
    max_host_bytes: int = 512 * MIB
    max_message_bytes: int = 64 * KIB
    report_margin_bytes: int = 64 * KIB
    body_idle_timeout_s: float = 30.0
    max_processes: int = 100
    max_workers_per_process: int = 100_000
    max_open_assignments: int = 10_000
    keep_diffs: bool = False
    max_retry_s: int = 60
    clock_interval_s: float = 30.0
    max_plan_memory_bytes: int = 1024 * MIB


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Every thread that allocates (the request threads, SQLite's, the hashing
# and decoding threads) would otherwise get an arena of its own, each keeping
# freed buffers; two arenas serve them all with little contention.
MALLOC_ARENAS = 2


def tune_runtime(threads: int, malloc_cache_bytes: int) -> str:
    """Set torch's thread count and glibc's malloc thresholds for serving.

    One torch thread: the server's tensor work (decoding, adding a diff into
    a running sum, a cycle's division) is memory-bound, and a second thread
    only contends with the event loop and SQLite for two cores; measured
    here, two threads beside a busy process ran several times slower.

    glibc serves every allocation over 128 KiB-32 MiB (its adaptive mmap
    threshold) with a fresh mmap, so each received body and each tensor of
    that size pays page faults for all its pages, then a munmap. Raising
    the mmap and trim thresholds to ``malloc_cache_bytes`` makes such
    blocks come from the heap and be reused; the cost is that up to that
    much freed memory stays with the process instead of going back to the
    system. 0 leaves glibc's defaults; other C libraries are left alone.

    Returns:
        What was applied, for the start-up log.
    """
    torch.set_num_threads(threads)
    applied = f"{threads} torch thread{'s' if threads != 1 else ''}"
    if malloc_cache_bytes <= 0:
        return applied + ", default malloc"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return applied + ", default malloc (no glibc mallopt here)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    size = min(malloc_cache_bytes, 2**31 - 1)
    if not (
        mallopt(M_MMAP_THRESHOLD, size)
        and mallopt(M_TRIM_THRESHOLD, size)
        and mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    ):
        return applied + ", default malloc (mallopt refused the thresholds)"
    return applied + f", malloc keeps up to {size // MIB} MiB for reuse"


# ============================================================ errors


class ApiError(Exception):
    """An error a client caused or must know about; becomes the envelope.

    ``message`` says what failed, what was received and what is expected;
    ``code`` is stable and documented in the README.
    """

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, code, message)


def conflict(message: str, code: str) -> ApiError:
    return ApiError(409, code, message)


def limit_reached(message: str) -> ApiError:
    return ApiError(429, "limit_reached", message)


# ============================================================ encoding

JSON_TYPE = "application/json"
CBOR_TYPE = "application/cbor"


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type names JSON (media types ignore case)."""
    return content_type.lower().startswith(JSON_TYPE)


def is_cbor_type(content_type: str) -> bool:
    return content_type.lower().startswith(CBOR_TYPE)


def wants_json(request: Request) -> bool:
    """Whether a response should be JSON: the client sent or asked for it.

    The routes people open by hand (/status, /health) answer JSON unless
    CBOR is asked for; the model-centric routes answer CBOR unless JSON is.
    """
    content_type = request.headers.get("content-type", "")
    accept = request.headers.get("accept", "").lower()
    if CBOR_TYPE in accept:
        return False
    if not request.url.path.startswith("/model-centric/"):
        return True
    return is_json_type(content_type) or JSON_TYPE in accept


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode_body(payload: Any, *, as_json: bool) -> tuple[bytes, str]:
    if as_json:
        text = json.dumps(payload, default=_json_default, allow_nan=False)
        return text.encode(), JSON_TYPE
    return cbor2.dumps(payload), CBOR_TYPE


def check_text(value: Any) -> None:
    """Refuse strings that cannot be stored: JSON's lone surrogate escapes.

    Raises:
        ApiError: 400 naming the problem.
    """
    # A loop, not recursion: JSON nests as deep as its parser allows.
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise bad_request(
                    f"body holds a string with a lone UTF-16 surrogate "
                    f"({item[exc.start]!r}); send valid Unicode text",
                    "invalid_body",
                ) from exc


def decode_body(
    data: bytes | bytearray | memoryview, content_type: str, *, views: bool = False
) -> Any:
    """Decode a control message, CBOR unless the client said JSON.

    With ``views``, CBOR byte strings come back as views of ``data``
    rather than copies (a report's diff).

    Raises:
        ApiError: 400 for a malformed body, 415 for another media type.
    """
    if is_json_type(content_type):
        text = bytes(data) if isinstance(data, memoryview) else data
        # Every item but the first follows a comma or opens a list or map, so
        # this bounds the items (commas inside strings count too) before the
        # parser builds one object per item, as CBOR's item budget does.
        items = text.count(b",") + text.count(b"[") + text.count(b"{")
        if items > MESSAGE_MAX_ITEMS:
            raise bad_request(
                f"JSON body holds about {items} items; a message holds at most "
                f"{MESSAGE_MAX_ITEMS}",
                "invalid_body",
            )
        try:
            body = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise bad_request(f"body is not valid JSON: {exc}", "invalid_body") from exc
        check_text(body)
        return body
    if content_type and not is_cbor_type(content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type!r:.60} is not supported; send "
            f"{CBOR_TYPE} (or {JSON_TYPE} for control messages)",
        )
    try:
        return load_views(data) if views else decode_message(data)
    except StateError as exc:
        raise bad_request(f"body is not valid CBOR: {exc}", "invalid_body") from exc


def field_of(
    body: Any, name: str, kind: type | tuple[type, ...], *, default: Any = ...
) -> Any:
    """Return ``body[name]`` checked against ``kind``; ``default`` when optional.

    Raises:
        ApiError: 400 naming the field, what it holds and what it should hold.
    """
    if not isinstance(body, dict):
        raise bad_request(
            f"body must be a map; got {type(body).__name__}", "invalid_body"
        )
    if name not in body or body[name] is None:
        if default is not ...:
            return default
        raise bad_request(f'"{name}" is required', "missing_field")
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    is_bool = isinstance(value, bool) and bool not in kinds
    if is_bool or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise bad_request(
            f'"{name}" must be {expected}; got {type(value).__name__}', "invalid_field"
        )
    return value


def number_param(params: Mapping[str, str], name: str) -> int:
    """A query parameter that must be a whole number (an id or a checkpoint).

    Raises:
        ApiError: 400 unless it is 1 to 15 ASCII digits.
    """
    value = params.get(name, "")
    if not (value.isascii() and value.isdigit() and len(value) <= 15):
        raise bad_request(
            f'"{name}" must be a whole number; got {value!r:.40}', "invalid_field"
        )
    return int(value)


def is_number(value: Any) -> bool:
    """A finite int or float, never a bool, and no larger than a float holds."""
    if type(value) is int:
        return abs(value) <= 2**63
    return type(value) is float and math.isfinite(value)


def check_config_value(value: Any, where: str, depth: int = 0) -> None:
    """A config value must survive JSON both ways: str keys, finite numbers.

    Raises:
        ApiError: 400 naming where the value is and what it holds.
    """
    if depth > 16:
        raise bad_request(f"{where} nests deeper than 16 levels", "invalid_config")
    if value is None or isinstance(value, (bool, str)) or is_number(value):
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            check_config_value(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise bad_request(
                    f"{where} has a key that is not a string: {key!r:.40}",
                    "invalid_config",
                )
            check_config_value(item, f"{where}.{key}", depth + 1)
        return
    raise bad_request(
        f"{where} must hold only null, booleans, finite numbers, strings, lists "
        f"and maps; got {type(value).__name__}",
        "invalid_config",
    )


def bytes_field(body: Any, name: str, *, default: Any = ...) -> Any:
    """A byte-string field; JSON clients send base64 text instead."""
    value = field_of(body, name, (bytes, memoryview, str), default=default)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise bad_request(f'"{name}" is not valid base64', "invalid_field") from exc
    return value


def hash_token(token: str, salt: bytes | None = None) -> str:
    """The admin token as stored: salted PBKDF2, slow to guess from a stolen file."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", token.encode(), salt, TOKEN_HASH_ROUNDS)
    return f"pbkdf2_sha256${TOKEN_HASH_ROUNDS}${salt.hex()}${digest.hex()}"


def token_matches(token: str, stored: str) -> bool:
    """Whether ``token`` is the one ``stored`` was made from (constant time)."""
    _, rounds, salt, digest = stored.split("$")
    derived = hashlib.pbkdf2_hmac(
        "sha256", token.encode(), bytes.fromhex(salt), int(rounds)
    )
    return hmac.compare_digest(derived.hex(), digest)


_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = frozenset({"ES256", "ES384", "ES512"})
_AUTH_KEYS = frozenset(
    {"type", "secret", "pub_key", "algorithms", "audience", "issuer", "require_exp"}
)


def _public_key_algorithms(pem: str) -> frozenset[str]:
    """The JWT algorithms that a PEM public key can verify: its family only."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise bad_request(
            '"pub_key" must be a PEM public key ("-----BEGIN PUBLIC KEY-----...")',
            "invalid_config",
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_ALGORITHMS
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset({"EdDSA"})
    raise bad_request(
        '"pub_key" must be an RSA, EC or Ed25519 public key', "invalid_config"
    )


def check_auth_config(config: Any) -> dict[str, Any]:
    """Validate ``server_config["authentication"]``; return it normalised.

    Raises:
        ApiError: 400 for a missing key, a key of the wrong family for the
            algorithms, or an algorithm that is not accepted (never ``none``).
            Messages never quote the secret or the key.
    """
    if not isinstance(config, dict) or config.get("type") != "jwt":
        raise bad_request(
            '"authentication" must be {"type": "jwt", "secret" or "pub_key": ...}',
            "invalid_config",
        )
    unknown = sorted(set(config) - _AUTH_KEYS)
    if unknown:
        raise bad_request(
            f'"authentication" has unknown key {unknown[0]!r:.40}; known keys: '
            f"{', '.join(sorted(_AUTH_KEYS))}",
            "invalid_config",
        )
    has_secret = isinstance(config.get("secret"), str) and config["secret"] != ""
    has_key = isinstance(config.get("pub_key"), str) and config["pub_key"] != ""
    if has_secret == has_key:
        raise bad_request(
            '"authentication" needs exactly one of "secret" (HMAC) or "pub_key" (PEM)',
            "invalid_config",
        )
    if has_secret and "-----BEGIN" in config["secret"]:
        raise bad_request(
            '"secret" looks like a PEM key; put a public key in "pub_key", and use '
            '"secret" only for a shared HMAC secret',
            "invalid_config",
        )
    if has_secret and len(config["secret"].encode()) < 32:
        raise bad_request(
            '"secret" must be at least 32 bytes (RFC 7518 section 3.2); got '
            f"{len(config['secret'].encode())}",
            "invalid_config",
        )

    family = (
        _HMAC_ALGORITHMS if has_secret else _public_key_algorithms(config["pub_key"])
    )
    # The usual algorithm of each key family, as the README promises.
    usual = ("HS256", "RS256", "ES256", "EdDSA")
    default = next(name for name in usual if name in family)
    algorithms = config.get("algorithms") or [default]
    is_list = isinstance(algorithms, list) and all(
        isinstance(a, str) for a in algorithms
    )
    if not is_list or not set(algorithms) <= family:
        raise bad_request(
            f'"algorithms" must be a list drawn from {sorted(family)} for this key; '
            f"got {algorithms!r:.80}",
            "invalid_config",
        )

    audience = config.get("audience")
    if audience is not None and not (
        isinstance(audience, str)
        or (isinstance(audience, list) and all(isinstance(a, str) for a in audience))
    ):
        raise bad_request(
            '"audience" must be a string or a list of strings', "invalid_config"
        )
    if config.get("issuer") is not None and not isinstance(config["issuer"], str):
        raise bad_request('"issuer" must be a string', "invalid_config")
    if not isinstance(config.get("require_exp", False), bool):
        raise bad_request('"require_exp" must be true or false', "invalid_config")
    return {
        **config,
        "algorithms": algorithms,
        "require_exp": config.get("require_exp", False),
    }


def verify_worker_token(token: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Check a worker's JWT against a process's auth config; return its claims.

    Raises:
        ApiError: 401 when the token is missing, forged, expired or meant for
            another audience or issuer. The token itself is never echoed.
    """
    if not isinstance(token, str) or not token:
        raise ApiError(401, "unauthorized", '"auth_token" is required by this process')
    key = config.get("secret") or config.get("pub_key")
    options: dict[str, Any] = {"require": ["exp"] if config["require_exp"] else []}
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=config["algorithms"],
            audience=config.get("audience"),
            issuer=config.get("issuer"),
            options=options,
        )
    except jwt.PyJWTError as exc:
        raise ApiError(
            401, "unauthorized", f"auth_token was refused: {type(exc).__name__}"
        ) from exc
    try:
        check_text(claims)
    except ApiError as exc:
        raise ApiError(
            401, "unauthorized", "auth_token was refused: its claims are not text"
        ) from exc
    return claims


# ============================================================ federation


def check_server_config(raw: Any) -> dict[str, Any]:
    """Validate a server_config and fill in defaults.

    Raises:
        ApiError: 400 naming the key, the value received and what is expected.
    """
    if not isinstance(raw, dict):
        raise bad_request("server_config must be a map", "invalid_config")
    unknown = sorted(set(raw) - set(SERVER_CONFIG_DEFAULTS), key=str)
    if unknown:
        raise bad_request(
            f"server_config has unknown key {unknown[0]!r:.60}; known keys: "
            f"{', '.join(SERVER_CONFIG_DEFAULTS)}",
            "invalid_config",
        )
    config = {
        **SERVER_CONFIG_DEFAULTS,
        **{k: v for k, v in raw.items() if v is not None},
    }

    def require(key: str, ok: bool, expected: str) -> None:
        if not ok:
            shown = config[key] if key != "authentication" else "..."
            raise bad_request(
                f'"{key}" must be {expected}; got {shown!r:.60}', "invalid_config"
            )

    def whole(key: str, minimum: int) -> bool:
        value = config[key]
        return type(value) is int and minimum <= value <= MAX_CONFIG_WHOLE

    def number(key: str) -> bool:
        return is_number(config[key])

    up_to = f"to {MAX_CONFIG_WHOLE}"
    require(
        "num_cycles",
        whole("num_cycles", 0),
        f"a whole number from 0 {up_to} (0: no limit)",
    )
    require(
        "cycle_length",
        number("cycle_length") and 1 <= config["cycle_length"] <= MAX_CYCLE_LENGTH_S,
        f"a number of seconds from 1 to {MAX_CYCLE_LENGTH_S}",
    )
    require("min_diffs", whole("min_diffs", 1), f"a whole number from 1 {up_to}")
    for key in ("max_diffs", "max_workers"):
        require(
            key,
            config[key] is None or whole(key, 1),
            f"a whole number from 1 {up_to}, or null for no limit",
        )
    # Each worker reports at most once per cycle, so a cycle has no more
    # diffs than assignments: these would leave cycles that cannot close.
    for smaller, larger in (("min_diffs", "max_diffs"), ("min_diffs", "max_workers")):
        low, high = config[smaller], config[larger]
        if low is not None and high is not None and high < low:
            raise bad_request(
                f'"{larger}" ({high}) must not be below "{smaller}" ({low}): a '
                "cycle could never close on its diffs",
                "invalid_config",
            )
    require(
        "on_deadline",
        config["on_deadline"] in ("extend", "close"),
        '"extend" or "close"',
    )
    for key in ("minimum_upload_speed", "minimum_download_speed"):
        require(
            key,
            number(key) and config[key] >= 0,
            "a number of megabits per second >= 0 (0: no speed test)",
        )
    require(
        "do_not_reuse_workers_until_cycle",
        whole("do_not_reuse_workers_until_cycle", 0),
        f"a whole number of cycles from 0 {up_to} (0: reuse at once)",
    )
    require(
        "pool_selection",
        config["pool_selection"] in ("iterate", "random"),
        '"iterate" or "random"',
    )
    probability = config["selection_probability"]
    require(
        "selection_probability",
        number("selection_probability") and 0 < probability <= 1,
        "a number in (0, 1]",
    )
    timeout = config["assignment_timeout"]
    require(
        "assignment_timeout",
        timeout is None or (number("assignment_timeout") and 1 <= timeout),
        "a number of seconds >= 1, or null: an assignment holds its slot until "
        "the cycle closes",
    )
    if config["authentication"] is not None:
        config["authentication"] = check_auth_config(config["authentication"])
    return config


Spec = list[tuple[str, str, tuple[int, ...]]]


def check_diff(diff_bytes: bytes, spec: Spec) -> dict[str, torch.Tensor]:
    """Decode a diff and check it against the checkpoint's tensor spec.

    Raises:
        ApiError: 400 naming the first tensor whose name, order, dtype or
            shape differs, or that holds NaN or infinity.
    """
    try:
        diff = decode_state(diff_bytes, copy=False, max_tensors=len(spec))
    except StateError as exc:
        raise bad_request(
            f"diff is not a valid state document: {exc}", "invalid_diff"
        ) from exc
    got = state_spec(diff)
    if len(got) != len(spec):
        raise bad_request(
            f"diff has {len(got)} tensors; the checkpoint has {len(spec)}",
            "invalid_diff",
        )
    for position, (expected, received) in enumerate(zip(spec, got)):
        if expected != received:
            raise bad_request(
                f"diff tensor {position} is {received[0]!r} {received[1]} "
                f"{list(received[2])}; expected {expected[0]!r} {expected[1]} "
                f"{list(expected[2])}",
                "invalid_diff",
            )
    for name, tensor in diff.items():
        if not is_finite(tensor):
            raise bad_request(
                f"diff tensor {name!r} holds NaN or infinity", "invalid_diff"
            )
    return diff


def check_model(data: bytes) -> dict[str, torch.Tensor]:
    """Decode a hosted model and insist that it holds tensors."""
    try:
        model = decode_state(data, copy=False, max_tensors=MAX_MODEL_TENSORS)
    except StateError as exc:
        raise bad_request(
            f"model is not a valid state document: {exc}", "invalid_model"
        ) from exc
    if not model:
        raise bad_request("model holds no tensors", "invalid_model")
    for name, tensor in model.items():
        if not is_finite(tensor):
            raise bad_request(
                f"model tensor {name!r:.60} holds NaN or infinity", "invalid_model"
            )
    return model


# receive_operations_as values, and the plan name suffix each one serves.
PLAN_FORMS = {"list": "", "torchscript": ":ts", "pte": ":pte"}
# How each mobile form's files begin: TorchScript archives are zip files,
# ExecuTorch programs carry a flatbuffer identifier at byte 4.
_FORM_MAGIC = {"ts": (0, b"PK\x03\x04"), "pte": (4, b"ET")}


def check_plan(name: str, data: bytes, max_memory_bytes: int) -> None:
    """Load a hosted plan through the safe loader; refuse it if it fails.

    A mobile form (``name:ts``, ``name:pte``) is kept as opaque bytes: the
    server never loads or runs it, so only the kind of file is checked.
    """
    base, colon, form = name.partition(":")
    if colon:
        if form not in MOBILE_FORMS or not base:
            raise bad_request(
                f"plan {name!r:.60}: mobile forms are named <plan>:ts (TorchScript) "
                "or <plan>:pte (ExecuTorch)",
                "invalid_plan",
            )
        offset, magic = _FORM_MAGIC[form]
        if data[offset : offset + len(magic)] != magic:
            raise bad_request(
                f"plan {name!r:.60} is not a {form} file (it does not start as one)",
                "invalid_plan",
            )
        return
    try:
        Plan.from_bytes(data, max_memory_bytes=max_memory_bytes)
    except PlanError as exc:
        raise bad_request(
            f"plan {name!r:.60} is not a valid plan: {exc}", "invalid_plan"
        ) from exc


def check_averaging_plan(
    data: bytes,
    model: Mapping[str, torch.Tensor],
    server_config: dict[str, Any],
    max_memory_bytes: int,
) -> AveragingPlan:
    """Load a hosted averaging plan and check it fits the model and config.

    Raises:
        ApiError: 400 when the plan does not load, fits neither averaging
            form for this model, or (cycle form) takes fewer diffs than
            ``max_diffs`` lets a cycle have.
    """
    try:
        averaging = load_averaging_plan(
            data, state_spec(model), max_memory_bytes=max_memory_bytes
        )
    except PlanError as exc:
        raise bad_request(
            f"averaging plan is not usable: {exc}", "invalid_plan"
        ) from exc
    rows = averaging.max_diffs
    max_diffs = server_config["max_diffs"]
    if rows is not None and (max_diffs is None or max_diffs > rows):
        raise bad_request(
            f'"max_diffs" must be at most {rows} with this averaging plan (its '
            f"diffs input has {rows} rows); got {max_diffs!r}",
            "invalid_config",
        )
    return averaging


def check_metrics(raw: Any) -> dict[str, float]:
    """Optional report metrics: at most 64 names mapped to finite numbers."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > 64:
        raise bad_request(
            '"metrics" must be a map of at most 64 names to numbers', "invalid_field"
        )
    metrics = {}
    for key, value in raw.items():
        if not isinstance(key, str) or len(key) > 100 or not is_number(value):
            raise bad_request(
                f'"metrics" must map names to finite numbers; got {key!r:.40}: '
                f"{value!r:.40}",
                "invalid_field",
            )
        metrics[key] = float(value)
    return metrics


def sha256_digest(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def short_id(worker_id: str) -> str:
    """A worker id for logs: enough to tell workers apart, never the whole id.

    With an open process the worker id is all a worker shows when it asks
    for a cycle or reports, so logs hold only its first characters.
    """
    return worker_id[:8] + "…"


def slots_since(config: Mapping[str, Any], now: float) -> float | None:
    """When the oldest unreported assignment still holding a slot was made.

    None when assignments hold their slots until the cycle closes (no
    ``assignment_timeout``).
    """
    timeout = config["assignment_timeout"]
    return None if timeout is None else now - timeout


def seconds_until(moment: float, now: float) -> int:
    """Whole seconds from ``now`` until ``moment``, never negative."""
    return max(0, math.ceil(moment - now))


@dataclass(frozen=True)
class Blob:
    """Stored bytes, served as they are, with the ETag that names them."""

    data: bytes | memoryview
    etag: str

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Blob:
        view = data if isinstance(data, bytes) else memoryview(data).toreadonly()
        return cls(view, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')


@dataclass(frozen=True)
class CachedCheckpoint:
    id: int
    number: int
    blob: Blob


@dataclass(eq=False)
class RunningSum:
    """A cycle's built-in average, kept as its reports arrive.

    Each accepted diff is added once it is durable, so closing the cycle is
    one division and one subtraction. ``included`` names the assignments
    already in the sum; the close adds, from the store, any report that is
    not (one accepted just before a restart, or while the close began).
    """

    process_id: int
    checkpoint_number: int
    accumulator: Accumulator | None = None
    included: set[int] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    is_closed: bool = False


def show_new_token(token: str, db_path: Path) -> None:
    """Show a newly created admin token once, never in a log.

    Only its hash is kept, so a lost token is replaced by setting
    NIMBLE_EDGE_ADMIN_TOKEN. On a terminal it is printed there; when stderr
    is not one (a service, ``serve > log 2>&1``) it would land in a log
    file, so it goes into a file beside the database that only this user
    can read, and the log says where.
    """
    if sys.stderr.isatty():
        print(
            "A new admin token was created; it is shown only this once:\n"
            f"    NIMBLE_EDGE_ADMIN_TOKEN={token}",
            file=sys.stderr,
            flush=True,
        )
        return
    path = db_path.with_name(db_path.name + ".admin-token")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    logger.warning(
        "A new admin token was created and written to %s (readable by this "
        "user only); keep it elsewhere and delete that file",
        path,
    )


class Federation:
    """Processes, admission, cycles and aggregation: the rules, no SQL or HTTP."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self._specs: dict[int, Spec] = {}
        # The newest checkpoint of each process and every plan served, as
        # bytes ready to send; one lock so that a cold cache reads each once.
        self._checkpoints: dict[int, CachedCheckpoint] = {}
        self._plans: dict[tuple[int, int, str], Blob] = {}
        self._cache_lock = asyncio.Lock()
        self._sums: dict[int, RunningSum] = {}
        self._hosts_averaging: dict[int, bool] = {}
        self._generations: dict[int, int] = {}
        self._clock_wakeup = asyncio.Event()
        self._clock_task: asyncio.Task[None] | None = None
        self._warned_open: set[int] = set()
        self._admin_hash: str | None = None
        # SHA-256 digests of tokens already checked against the slow hash.
        self._verified_tokens: set[bytes] = set()
        self._verify_lock = asyncio.Lock()
        self._selection_key = b""
        self._largest_model_bytes = 0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.store.open()
        await self._load_secrets()
        self._largest_model_bytes = await self.store.read.largest_model_bytes()
        # Cycles that filled up just before a crash are closed now; the clock
        # re-arms every other deadline from the database.
        await self.close_due_cycles()
        self._clock_task = asyncio.create_task(self._clock(), name="cycle-clock")

    async def stop(self) -> None:
        if self._clock_task is not None:
            self._clock_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock_task
        await self.store.close()

    async def _load_secrets(self) -> None:
        token = self.settings.admin_token
        async with self.store.transaction() as queries:
            key = await queries.setting("selection_key")
            if key is None:
                key = secrets.token_hex(32)
                await queries.set_setting("selection_key", key)
            self._selection_key = bytes.fromhex(key)
            stored = await queries.setting("admin_token")
            if token or stored is None:
                is_new = not token
                token = token or secrets.token_urlsafe(32)
                self._admin_hash = await asyncio.to_thread(hash_token, token)
                self._verified_tokens.add(hashlib.sha256(token.encode()).digest())
                await queries.set_setting("admin_token", self._admin_hash)
            else:
                self._admin_hash = stored
                is_new = False
        if is_new:
            show_new_token(token, self.store.path)

    async def check_admin(self, authorization: str | None) -> None:
        """Raise 401 unless the header carries the admin token.

        The stored hash is slow on purpose; a token that passed it once is
        remembered (as a digest) so that the admin client stays fast, and
        checks run one at a time in a thread so that guesses cannot stall
        the server.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or self._admin_hash is None:
            raise ApiError(
                401,
                "unauthorized",
                "this route needs 'Authorization: Bearer <admin token>'",
            )
        digest = hashlib.sha256(token.encode()).digest()
        if digest in self._verified_tokens:
            return
        async with self._verify_lock:
            matches = await asyncio.to_thread(token_matches, token, self._admin_hash)
        if not matches:
            raise ApiError(401, "unauthorized", "the admin token was not accepted")
        self._verified_tokens.add(digest)

    # ------------------------------------------------------------ processes

    async def host(self, body: Any) -> dict[str, Any]:
        """Store a process with its first checkpoint, and open cycle 1."""
        client_config = field_of(body, "client_config", dict)
        check_config_value(client_config, "client_config")
        name = field_of(client_config, "name", str)
        version = field_of(client_config, "version", str)
        if not 0 < len(name) <= 200 or not 0 < len(version) <= 200:
            raise bad_request(
                "name and version must be 1 to 200 characters", "invalid_config"
            )
        server_config = check_server_config(field_of(body, "server_config", dict))
        model_bytes = bytes_field(body, "model")
        plans = field_of(body, "plans", dict, default={})
        protocols = field_of(body, "protocols", dict, default={})
        averaging_bytes = bytes_field(body, "averaging_plan", default=None)

        for kind, names in (("plans", plans), ("protocols", protocols)):
            for key in names:
                if not isinstance(key, str) or not 0 < len(key) <= 200:
                    raise bad_request(
                        f"{kind} must be named by strings of 1 to 200 characters; "
                        f"got {key!r:.40}",
                        "invalid_field",
                    )
        model = await asyncio.to_thread(check_model, model_bytes)
        plan_blobs = await self._check_plans(plans)
        if averaging_bytes is not None:
            await asyncio.to_thread(
                check_averaging_plan,
                averaging_bytes,
                model,
                server_config,
                self.settings.max_plan_memory_bytes,
            )
        protocol_blobs = {key: bytes_field(protocols, key) for key in protocols}

        now = time.time()
        async with self.store.transaction() as queries:
            if await queries.process(name, version) is not None:
                raise conflict(
                    f"process {name}@{version} is already hosted; host it under a "
                    "new version, or delete it first",
                    "process_exists",
                )
            if await queries.process_count() >= self.settings.max_processes:
                raise limit_reached(
                    f"this server hosts its limit of {self.settings.max_processes} "
                    "processes; delete one, or raise --max-processes"
                )
            process_id = await queries.insert_process(
                name, version, client_config, server_config, now
            )
            for plan_name, blob in plan_blobs.items():
                await queries.insert_plan(process_id, plan_name, blob)
            if averaging_bytes is not None:
                await queries.set_averaging_plan(process_id, averaging_bytes)
            for protocol_name, blob in protocol_blobs.items():
                await queries.insert_protocol(process_id, protocol_name, blob)
            await queries.insert_checkpoint(process_id, 1, model_bytes, now)
            await queries.insert_cycle(
                process_id, 1, 1, now, now + server_config["cycle_length"]
            )
            process = await queries.process_by_id(process_id)

        self._specs[process_id] = state_spec(model)
        self._largest_model_bytes = max(self._largest_model_bytes, len(model_bytes))
        self._clock_wakeup.set()
        logger.info(
            "Process %s hosted: %d tensors, %d plans, cycle 1 open",
            process.label,
            len(model),
            len(plan_blobs),
        )
        if server_config["authentication"] is None:
            self._warn_open(process)
        return {"status": "success", "process_id": process_id}

    async def check_worker(self, worker_id: Any) -> None:
        """Raise 401 unless ``worker_id`` has authenticated with some process."""
        known = isinstance(worker_id, str) and (
            await self.store.read.worker_process_id(worker_id) is not None
        )
        if not known:
            raise ApiError(
                401, "unknown_worker", "worker_id is not known; authenticate first"
            )

    async def _check_plans(self, plans: dict[str, Any]) -> dict[str, bytes]:
        """Every plan through the safe loader; every mobile form beside its plan."""
        blobs = {name: bytes_field(plans, name) for name in plans}
        for name, blob in blobs.items():
            limit = self.settings.max_plan_memory_bytes
            await asyncio.to_thread(check_plan, name, blob, limit)
            base = name.partition(":")[0]
            if base not in blobs:
                raise bad_request(
                    f"plan {name!r:.60} is a form of plan {base!r:.60}, which is "
                    "not in this upload; send the portable plan too",
                    "invalid_plan",
                )
        return blobs

    def _warn_open(self, process: Process) -> None:
        if process.id not in self._warned_open:
            self._warned_open.add(process.id)
            logger.warning(
                "Process %s has no worker authentication: any device on the "
                "network may join its cycles",
                process.label,
            )

    async def find_process(self, name: Any, version: Any) -> Process:
        """The process by name and version; the newest version when none is given.

        Raises:
            ApiError: 404 when nothing is hosted under that name and version.
        """
        if not isinstance(name, str):
            raise bad_request("the process name must be a string", "invalid_field")
        if version is not None and not isinstance(version, str):
            raise bad_request('"version" must be a string', "invalid_field")
        process = await self.store.read.process(name, version)
        if process is None:
            shown = name if version is None else f"{name}@{version}"
            raise not_found(f"no process {shown!r:.120} is hosted", "process_not_found")
        return process

    async def _spec(self, process_id: int) -> Spec:
        spec = self._specs.get(process_id)
        if spec is None:
            generation = self._generation(process_id)
            found = await self.store.read.checkpoint(process_id, 1)
            if found is None:
                raise process_gone()
            model = await asyncio.to_thread(decode_state, found[1], copy=False)
            spec = state_spec(model)
            if self._generation(process_id) == generation:
                self._specs[process_id] = spec
        return spec

    # ------------------------------------------------------------ cached bytes

    async def checkpoint_of(
        self, process_id: int, number: int
    ) -> CachedCheckpoint | None:
        """A checkpoint as bytes ready to send; the newest of each process stays.

        Checkpoints never change, so each is read and hashed once however
        many workers download it; a cold cache after a restart is filled by
        one reader while the others wait.
        """
        cached = self._checkpoints.get(process_id)
        if cached is not None and cached.number == number:
            return cached
        async with self._cache_lock:
            cached = self._checkpoints.get(process_id)
            if cached is not None and cached.number == number:
                return cached
            generation = self._generation(process_id)
            found = await self.store.read.checkpoint(process_id, number)
            if found is None:
                return None
            blob = await asyncio.to_thread(Blob.of, found[1])
            loaded = CachedCheckpoint(found[0], number, blob)
            is_current = self._generation(process_id) == generation
            if is_current and (cached is None or number > cached.number):
                self._checkpoints[process_id] = loaded
        return loaded

    async def plan_of(self, process_id: int, plan_id: int, suffix: str) -> Blob | None:
        """A plan (or one of its forms) as bytes ready to send."""
        key = (process_id, plan_id, suffix)
        blob = self._plans.get(key)
        if blob is None:
            generation = self._generation(process_id)
            found = await self.store.read.plan(plan_id, process_id, suffix)
            if found is None:
                return None
            blob = await asyncio.to_thread(Blob.of, found)
            if self._generation(process_id) == generation:
                self._plans[key] = blob
        return blob

    def _generation(self, process_id: int) -> int:
        """How many times a process id's caches were dropped.

        A cache is filled across awaits; a fill that began before a reset
        (which keeps the process's id) or a delete must not store what it
        read once the caches were dropped.
        """
        return self._generations.get(process_id, 0)

    def _forget(self, process_id: int) -> None:
        """Drop what is cached of a process that was deleted or reset."""
        self._generations[process_id] = self._generation(process_id) + 1
        self._specs.pop(process_id, None)
        self._checkpoints.pop(process_id, None)
        self._hosts_averaging.pop(process_id, None)
        for key in [key for key in self._plans if key[0] == process_id]:
            del self._plans[key]
        for cycle_id, running in list(self._sums.items()):
            if running.process_id == process_id:
                running.is_closed = True
                del self._sums[cycle_id]

    # ------------------------------------------------------------ running sums

    async def _running_sum(self, queries: Queries, cycle: Cycle) -> RunningSum | None:
        """The cycle's running sum, made on its first report.

        None when the process hosts an averaging plan: those run over the
        stored diffs at the close.
        """
        process_id = cycle.process_id
        if process_id not in self._hosts_averaging:
            hosted = await queries.averaging_plan(process_id)
            self._hosts_averaging[process_id] = hosted is not None
        if self._hosts_averaging[process_id]:
            return None
        running = self._sums.get(cycle.id)
        if running is None:
            running = RunningSum(process_id, cycle.checkpoint_number)
            self._sums[cycle.id] = running
        return running

    async def _accumulator(self, running: RunningSum) -> Accumulator:
        cached = await self.checkpoint_of(running.process_id, running.checkpoint_number)
        if cached is None:
            raise process_gone()
        base = await asyncio.to_thread(decode_state, cached.blob.data, copy=False)
        return await asyncio.to_thread(Accumulator, base)

    async def _add_to_sum(
        self,
        running: RunningSum,
        assignment_id: int,
        diff: Mapping[str, torch.Tensor],
        weight: int,
    ) -> None:
        """Add a durable diff to its cycle's sum, unless the close came first."""
        async with running.lock:
            if running.is_closed or assignment_id in running.included:
                return
            try:
                if running.accumulator is None:
                    running.accumulator = await self._accumulator(running)
                await asyncio.to_thread(running.accumulator.add, diff, weight)
            except StorageError:
                # Deleted or reset since the report was stored: no sum to keep.
                running.is_closed = True
                return
            except Exception:
                # Half added or not at all: the close rebuilds the sum from
                # the stored diffs, so nothing acknowledged is lost.
                cycle_logger.error(
                    "Adding a diff to the running sum failed", exc_info=True
                )
                running.accumulator = None
                running.included.clear()
                return
            running.included.add(assignment_id)

    async def _finish_sum(self, queries: Queries, cycle: Cycle) -> bytearray:
        """The next checkpoint from the running sum and any diff it lacks."""
        running = self._sums.pop(cycle.id, None)
        if running is None:
            running = RunningSum(cycle.process_id, cycle.checkpoint_number)
        async with running.lock:
            running.is_closed = True
            accumulator = running.accumulator or await self._accumulator(running)
            running.accumulator = None

        for assignment_id in await queries.report_ids(cycle.id):
            if assignment_id not in running.included:
                diff, weight = await queries.report_diff(assignment_id)
                await asyncio.to_thread(accumulator.add_encoded, diff, weight)
        spec = [(name, t.dtype, tuple(t.shape)) for name, t in accumulator.base.items()]
        buffer, views = layout_state(spec)
        await asyncio.to_thread(accumulator.result, out=views)
        return buffer

    def max_report_bytes(self) -> int:
        """The largest report any hosted process can legitimately send."""
        margin = self.settings.report_margin_bytes
        return int(self._largest_model_bytes * 1.01) + margin

    # ------------------------------------------------------------ workers

    async def authenticate(self, body: Any) -> dict[str, Any]:
        """Give a worker its id for a process, checking its token if required."""
        process = await self.find_process(
            field_of(body, "model_name", str),
            field_of(body, "model_version", str, default=None),
        )
        auth = process.server_config["authentication"]
        subject = None
        if auth is not None:
            claims = verify_worker_token(body.get("auth_token"), auth)
            subject = claims.get("sub") if isinstance(claims.get("sub"), str) else None
        else:
            self._warn_open(process)

        # A worker lost to a power cut authenticates again: no sync needed.
        async with self.store.transaction(is_synced=False) as queries:
            worker_id = None
            if subject is not None:
                worker_id = await queries.worker_by_subject(process.id, subject)
            if worker_id is None:
                limit = self.settings.max_workers_per_process
                if await queries.worker_count(process.id) >= limit:
                    raise limit_reached(
                        f"{process.label} has its limit of {limit} workers; raise "
                        "--max-workers-per-process, or host the process anew"
                    )
                worker_id = uuid.uuid4().hex
                await queries.insert_worker(worker_id, process.id, subject, time.time())
        config = process.server_config
        requires_speed_test = bool(
            config["minimum_upload_speed"] or config["minimum_download_speed"]
        )
        return {
            "status": "success",
            "worker_id": worker_id,
            "requires_speed_test": requires_speed_test,
        }

    async def cycle_request(self, body: Any) -> dict[str, Any]:
        """Admit a worker to the open cycle, or say why not and when to retry.

        The rules apply in this order: training complete, cycle over, already
        assigned (or the same assignment again), too slow, not eligible (reuse
        rule, then random selection), full.
        """
        worker_id = field_of(body, "worker_id", str)
        process = await self.find_process(
            field_of(body, "model", str), field_of(body, "version", str, default=None)
        )
        speeds = self._speeds(body, process)
        now = time.time()
        # An assignment is synced by the report that uses it, which is synced
        # before it is acknowledged; one lost to a power cut before that is
        # asked for again.
        async with self.store.transaction(is_synced=False) as queries:
            if await queries.worker_process_id(worker_id) != process.id:
                raise ApiError(
                    401,
                    "unknown_worker",
                    f"worker_id is not known for {process.label}; authenticate first",
                )
            if (await queries.process_by_id(process.id)).completed_at is not None:
                return {"status": "rejected", "reason": "training complete"}
            cycle = await queries.open_cycle(process.id)
            assert cycle is not None, f"{process.label} has no open cycle"

            existing = await queries.assignment_in(cycle.id, worker_id)
            since = slots_since(process.server_config, now)
            if (
                existing is not None
                and not existing.has_reported
                and (since is None or existing.assigned_at >= since)
            ):
                request_key = existing.request_key
            else:
                reason = await self._refusal(
                    queries, process, cycle, worker_id, existing, speeds, now
                )
                if reason is not None:
                    http_logger.debug(
                        "Worker %s not admitted to cycle %d of %s: %s",
                        short_id(worker_id),
                        cycle.number,
                        process.label,
                        reason,
                    )
                    return {
                        "status": "rejected",
                        "reason": reason,
                        "timeout": self._retry_s(reason, cycle, now),
                    }
                if existing is not None:
                    # Its worker came back after it expired, and a slot is
                    # free: the same assignment holds one again.
                    request_key = existing.request_key
                    await queries.renew_assignment(request_key, now)
                else:
                    request_key = secrets.token_urlsafe(24)
                    await queries.insert_assignment(
                        cycle.id, worker_id, request_key, now
                    )
            model_id = await queries.checkpoint_id(process.id, cycle.checkpoint_number)
            assert model_id is not None, f"cycle {cycle.id} has no checkpoint"
            plans = await queries.plan_ids(process.id)
            protocols = await queries.protocol_ids(process.id)

        http_logger.debug(
            "Worker %s assigned to cycle %d of %s",
            short_id(worker_id),
            cycle.number,
            process.label,
        )
        return {
            "status": "accepted",
            "request_key": request_key,
            "model": process.name,
            "version": process.version,
            "model_id": model_id,
            "cycle": cycle.number,
            "plans": plans,
            "protocols": protocols,
            "client_config": process.client_config,
            "timeout": seconds_until(cycle.deadline_at, now),
        }

    @staticmethod
    def _speeds(body: Any, process: Process) -> tuple[float, float] | None:
        """The worker's measured (download, upload) in Mbit/s, when required.

        Raises:
            ApiError: 400 when the process needs a speed test and the request
                carries no numbers; the worker library then runs the test.
        """
        config = process.server_config
        if not (config["minimum_download_speed"] or config["minimum_upload_speed"]):
            return None
        speeds = []
        for key in ("download", "upload"):
            value = field_of(body, key, (int, float), default=None)
            if value is None or not is_number(value) or value < 0:
                shown = "" if value is None else f"; got {value!r:.40}"
                raise bad_request(
                    f"{process.label} needs a speed test: send {key!r} as the "
                    "measured megabits per second, a finite number from 0 (see "
                    f"/model-centric/speed-test){shown}",
                    "missing_field" if value is None else "invalid_field",
                )
            speeds.append(float(value))
        return speeds[0], speeds[1]

    async def _refusal(
        self,
        queries: Queries,
        process: Process,
        cycle: Cycle,
        worker_id: str,
        existing: WorkerAssignment | None,
        speeds: tuple[float, float] | None,
        now: float,
    ) -> str | None:
        """Why a worker may not get a new assignment in ``cycle``, or None.

        ``existing`` is the worker's assignment in the cycle: reported, or
        unreported past ``assignment_timeout`` (it then needs a free slot).
        """
        config = process.server_config
        reports = await queries.report_count(cycle.id)
        is_full = config["max_diffs"] is not None and reports >= config["max_diffs"]
        if cycle.deadline_at <= now or is_full:
            # The clock or the closing report is about to end this cycle.
            return "cycle over"
        if existing is not None and existing.has_reported:
            return "already assigned"
        if existing is None:
            # A worker back for its expired assignment passed these already.
            reason = await self._ineligibility(
                queries, config, cycle, worker_id, speeds
            )
            if reason is not None:
                return reason
        most = config["max_workers"] or self.settings.max_open_assignments
        held = await queries.assignment_count(cycle.id, slots_since(config, now))
        return "full" if held >= most else None

    async def _ineligibility(
        self,
        queries: Queries,
        config: dict[str, Any],
        cycle: Cycle,
        worker_id: str,
        speeds: tuple[float, float] | None,
    ) -> str | None:
        """Why a new worker may not join ``cycle`` whatever its slots, or None."""
        if speeds is not None and (
            speeds[0] < config["minimum_download_speed"]
            or speeds[1] < config["minimum_upload_speed"]
        ):
            return "too slow"

        last = await queries.last_cycle_of(worker_id)
        wait = config["do_not_reuse_workers_until_cycle"]
        if last is not None and cycle.number < last + wait:
            return "not eligible"
        if config["pool_selection"] == "random" and not self._selected(
            worker_id, cycle, config["selection_probability"]
        ):
            return "not eligible"
        return None

    def _selected(self, worker_id: str, cycle: Cycle, probability: float) -> bool:
        # A keyed hash gives every (worker, cycle) one fixed draw: asking again
        # cannot re-roll it, and workers cannot predict it without the key.
        digest = hmac.new(
            self._selection_key, f"{cycle.id}:{worker_id}".encode(), hashlib.sha256
        ).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < probability

    def _retry_s(self, reason: str, cycle: Cycle, now: float) -> int:
        """When to ask again: at most ``max_retry_s``, at least 1 second.

        Never past the deadline, and never longer than the cap: a cycle can
        close early (``max_diffs``) and a slot can free up (an assignment
        expires), and a worker that sleeps until the deadline would miss both.
        """
        if reason == "cycle over":
            return 1
        left = seconds_until(cycle.deadline_at, now)
        return max(1, min(left, self.settings.max_retry_s))

    async def _assignment(self, worker_id: Any, request_key: Any) -> Assignment:
        if not isinstance(worker_id, str) or not isinstance(request_key, str):
            raise bad_request(
                '"worker_id" and "request_key" are required', "missing_field"
            )
        assignment = await self.store.read.assignment(request_key)
        # compare_digest refuses non-ASCII str, so compare bytes.
        if assignment is None or not hmac.compare_digest(
            assignment.worker_id.encode(), worker_id.encode()
        ):
            raise ApiError(
                403,
                "unknown_assignment",
                "request_key does not belong to this worker_id",
            )
        return assignment

    async def get_model(self, params: Mapping[str, str]) -> Blob:
        """The checkpoint an assigned worker trains on, while its cycle is open."""
        assignment = await self._assignment(
            params.get("worker_id"), params.get("request_key")
        )
        cycle = assignment.cycle
        if cycle.closed_at is not None:
            raise self._closed(cycle)
        found = await self.checkpoint_of(cycle.process_id, cycle.checkpoint_number)
        if found is None:
            raise process_gone()
        model_id = params.get("model_id")
        if model_id is not None and model_id != str(found.id):
            # Compared as text: any other value, whatever it holds, is wrong.
            raise not_found(
                f"model_id {model_id!r:.40} is not this cycle's model ({found.id})",
                "model_not_found",
            )
        return found.blob

    async def get_plan(self, params: Mapping[str, str]) -> Blob:
        """A plan of the worker's process, in the form it asks for."""
        assignment = await self._assignment(
            params.get("worker_id"), params.get("request_key")
        )
        if assignment.cycle.closed_at is not None:
            raise self._closed(assignment.cycle)
        form = params.get("receive_operations_as", "list")
        if form not in PLAN_FORMS:
            raise not_found(
                f"receive_operations_as={form!r:.40} is not a plan form; ask for "
                f"one of {', '.join(PLAN_FORMS)}",
                "plan_not_found",
            )
        plan_id = number_param(params, "plan_id")
        plan = await self.plan_of(
            assignment.cycle.process_id, plan_id, PLAN_FORMS[form]
        )
        if plan is None:
            raise not_found(
                f"plan {plan_id} is not a plan of this process hosted as "
                f"receive_operations_as={form}",
                "plan_not_found",
            )
        return plan

    async def report(self, body: Any) -> dict[str, Any]:
        """Accept a diff once per assignment; durable before it is acknowledged."""
        assignment = await self._assignment(
            body.get("worker_id"), body.get("request_key")
        )
        diff_bytes = bytes_field(body, "diff")
        num_samples = field_of(body, "num_samples", int, default=1)
        if not 1 <= num_samples <= 2**53:
            raise bad_request(
                f'"num_samples" must be a positive integer; got {num_samples}',
                "invalid_field",
            )
        metrics = check_metrics(body.get("metrics"))
        cycle = assignment.cycle

        # Validation decodes the whole diff, so it runs before the write lock
        # is taken; a retry of an accepted report skips it. The tensors map
        # the received body, and go into the running sum once stored. The
        # digest is computed meanwhile on the other core (hashlib and torch
        # both let go of the GIL).
        hashing = asyncio.create_task(asyncio.to_thread(sha256_digest, diff_bytes))
        tensors = None
        try:
            if await self.store.read.report_of(assignment.id) is None:
                if cycle.closed_at is not None:
                    raise self._closed(cycle)
                spec = await self._spec(cycle.process_id)
                tensors = await asyncio.to_thread(check_diff, diff_bytes, spec)
        finally:
            digest = await hashing

        async with self.store.transaction() as queries:
            previous = await queries.report_of(assignment.id)
            if previous is not None:
                if previous != (digest, num_samples):
                    raise conflict(
                        "a different report was already accepted for this request_key",
                        "report_conflict",
                    )
                return {"status": "success", "cycle": cycle.number, "duplicate": True}
            current = await queries.cycle(cycle.id)
            if current is None or current.closed_at is not None or tensors is None:
                raise self._closed(cycle)
            process = await queries.process_by_id(cycle.process_id)
            max_diffs = process.server_config["max_diffs"]
            count = await queries.report_count(cycle.id)
            # Reports queued behind the one that filled the cycle would
            # otherwise slip in before it closes.
            if max_diffs is not None and count >= max_diffs:
                raise conflict(
                    f"cycle {cycle.number} already has its {max_diffs} diffs; "
                    "request a new cycle",
                    "cycle_closed",
                )
            await queries.insert_report(
                assignment, diff_bytes, digest, num_samples, metrics, time.time()
            )
            count += 1
            running = await self._running_sum(queries, cycle)
        if running is not None:
            await self._add_to_sum(running, assignment.id, tensors, num_samples)
        http_logger.debug(
            "Report for cycle %d of %s accepted: %d bytes, %d samples",
            cycle.number,
            process.label,
            len(diff_bytes),
            num_samples,
        )

        if max_diffs is not None and count >= max_diffs:
            # The report is already durable; a failure to close is logged and
            # retried by the clock, never turned into an error for this worker.
            try:
                await self.close_cycle(cycle.id)
            except Exception:
                cycle_logger.error(
                    "Closing cycle %d of %s failed",
                    cycle.number,
                    process.label,
                    exc_info=True,
                )
        return {"status": "success", "cycle": cycle.number}

    @staticmethod
    def _closed(cycle: Cycle) -> ApiError:
        return conflict(
            f"cycle {cycle.number} has closed; request a new cycle", "cycle_closed"
        )

    # ------------------------------------------------------------ cycles

    async def close_cycle(self, cycle_id: int, *, discard: bool = False) -> bool:
        """Average a cycle's diffs into the next checkpoint; open the next cycle.

        Everything happens in one transaction: the new checkpoint, the closed
        cycle and the next cycle are written together or not at all. With
        ``discard`` the cycle closes without a new checkpoint (the
        ``on_deadline: "close"`` rule) and its diffs are not averaged.

        Returns:
            False when the cycle was already closed (by a concurrent report,
            or the clock) or has no diffs, True when this call closed it.
        """
        started = time.perf_counter()
        async with self.store.transaction() as queries:
            cycle = await queries.cycle(cycle_id)
            if cycle is None or cycle.closed_at is not None:
                return False
            process = await queries.process_by_id(cycle.process_id)
            generation = self._generation(process.id)
            count = 0 if discard else await queries.report_count(cycle.id)
            if count == 0 and not discard:
                return False
            encoded, error = None, None
            if count:
                encoded, error = await self._average(queries, process, cycle)
            else:
                running = self._sums.pop(cycle.id, None)
                if running is not None:
                    running.is_closed = True

            now = time.time()
            checkpoint_number, checkpoint_id = cycle.checkpoint_number, 0
            if encoded is not None:
                checkpoint_number += 1
                checkpoint_id = await queries.insert_checkpoint(
                    process.id, checkpoint_number, encoded, now
                )
            await queries.close_cycle(cycle.id, now, 0 if encoded is None else count)
            if error is not None:
                await queries.set_averaging_error(cycle.id, error)
            if not self.settings.keep_diffs:
                await queries.drop_diffs(cycle.id)
            num_cycles = process.server_config["num_cycles"]
            is_last = bool(num_cycles) and cycle.number >= num_cycles
            if is_last:
                await queries.complete_process(process.id, now)
            else:
                await queries.insert_cycle(
                    process.id,
                    cycle.number + 1,
                    checkpoint_number,
                    now,
                    now + process.server_config["cycle_length"],
                )

        self._clock_wakeup.set()
        if encoded is not None:
            # The next cycle's workers download this: it is served from here.
            blob = await asyncio.to_thread(Blob.of, encoded)
            cached = CachedCheckpoint(checkpoint_id, checkpoint_number, blob)
            if self._generation(process.id) == generation:
                self._checkpoints[process.id] = cached
        if error is not None:
            cycle_logger.warning(
                "Cycle %d of %s closed without a new checkpoint: %s",
                cycle.number,
                process.label,
                error,
            )
        elif discard:
            cycle_logger.info(
                "Cycle %d of %s closed without a new checkpoint",
                cycle.number,
                process.label,
            )
        else:
            cycle_logger.info(
                "Cycle %d of %s completed: %d diffs averaged into checkpoint %d "
                "in %.2f s",
                cycle.number,
                process.label,
                count,
                checkpoint_number,
                time.perf_counter() - started,
            )
        if is_last:
            cycle_logger.info(
                "Process %s completed: %d of %d cycles",
                process.label,
                cycle.number,
                num_cycles,
            )
        return True

    async def _average(
        self, queries: Queries, process: Process, cycle: Cycle
    ) -> tuple[bytes | bytearray | None, str | None]:
        """``(next checkpoint, None)``, or ``(None, why)`` if averaging fails.

        The built-in mean finishes the cycle's running sum. A hosted plan
        reads the diffs from the store, one at a time, as many times as it
        asks (a cycle plan over a large model reads them in windows).
        """
        hosted = await queries.averaging_plan(process.id)
        try:
            if hosted is None:
                return await self._finish_sum(queries, cycle), None
            cached = await self.checkpoint_of(process.id, cycle.checkpoint_number)
            assert cached is not None, f"cycle {cycle.id} has no checkpoint"
            state = await asyncio.to_thread(decode_state, cached.blob.data, copy=False)
            averaging = await asyncio.to_thread(
                load_averaging_plan,
                hosted,
                state_spec(state),
                max_memory_bytes=self.settings.max_plan_memory_bytes,
            )
            aggregator = make_aggregator(state, averaging)
            for index in range(aggregator.passes):
                aggregator.begin_pass(index)
                async for diff, num_samples in queries.reports(cycle.id):
                    await asyncio.to_thread(aggregator.add_encoded, diff, num_samples)
                await asyncio.to_thread(aggregator.end_pass)
            new_state = await asyncio.to_thread(aggregator.result)
            return await asyncio.to_thread(encode_state, new_state), None
        except (AggregationError, PlanError) as exc:
            return None, str(exc)

    async def close_due_cycles(self) -> float | None:
        """Close or extend every open cycle that is full or past its deadline.

        Returns:
            The earliest deadline still ahead, or None when no cycle is open.
        """
        now = time.time()
        next_deadline = None
        for cycle, process, reports in await self.store.read.open_cycles():
            try:
                deadline = await self._tend(cycle, process, reports, now)
            except StorageError as exc:
                # Deleted or reset since the scan began: nothing left to tend.
                if exc.code != "process_not_found":
                    raise
                continue
            if deadline is not None:
                next_deadline = min(deadline, next_deadline or deadline)
        return next_deadline

    async def _tend(
        self, cycle: Cycle, process: Process, reports: int, now: float
    ) -> float | None:
        """Close or extend one open cycle; return its deadline if it stays open."""
        config = process.server_config
        is_full = config["max_diffs"] is not None and reports >= config["max_diffs"]
        is_due = cycle.deadline_at <= now
        if is_full or (is_due and reports >= config["min_diffs"]):
            await self.close_cycle(cycle.id)
            return None
        if is_due and config["on_deadline"] == "close":
            cycle_logger.info(
                "Cycle %d of %s reached its deadline with %d (out of %d) diffs",
                cycle.number,
                process.label,
                reports,
                config["min_diffs"],
            )
            await self.close_cycle(cycle.id, discard=True)
            return None

        deadline = cycle.deadline_at
        if is_due:
            deadline = now + config["cycle_length"]
            async with self.store.transaction() as queries:
                await queries.set_deadline(cycle.id, deadline)
            cycle_logger.debug(
                "Cycle %d of %s extended: %d (out of %d) diffs by its deadline",
                cycle.number,
                process.label,
                reports,
                config["min_diffs"],
            )
        return deadline

    async def _clock(self) -> None:
        """Close cycles on time by the server's own clock, not only on reports."""
        while True:
            self._clock_wakeup.clear()
            try:
                next_deadline = await self.close_due_cycles()
            except Exception:
                cycle_logger.error("Checking cycle deadlines failed", exc_info=True)
                next_deadline = None
            wait_s = self.settings.clock_interval_s
            if next_deadline is not None:
                wait_s = min(wait_s, max(0.0, next_deadline - time.time()) + 0.01)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._clock_wakeup.wait(), timeout=wait_s)

    # ------------------------------------------------------------ admin reads

    async def retrieve(self, params: Mapping[str, str]) -> Blob:
        """A checkpoint of a process by number, or the latest one."""
        if "name" not in params:
            raise bad_request('"name" is required: the process name', "missing_field")
        process = await self.find_process(params.get("name"), params.get("version"))
        wanted = params.get("checkpoint", "latest")
        number = None if wanted == "latest" else number_param(params, "checkpoint")
        found = await self.store.read.checkpoint(process.id, number)
        if found is None:
            raise not_found(
                f"{process.label} has no checkpoint {wanted}", "checkpoint_not_found"
            )
        cached = self._checkpoints.get(process.id)
        if cached is not None and cached.id == found[0]:
            return cached.blob
        return await asyncio.to_thread(Blob.of, found[1])

    async def status(self, *, is_admin: bool = False) -> dict[str, Any]:
        """What is hosted and how far each process has got.

        Anyone sees names, versions, the open cycle and the checkpoint count;
        the admin also sees counts, limits, deadlines and configs (secrets
        removed).
        """
        now = time.time()
        processes = []
        errors = await self.store.read.averaging_errors() if is_admin else {}
        for row in await self.store.read.status_rows():
            is_open = row["cycle"] is not None
            entry: dict[str, Any] = {
                "name": row["name"],
                "version": row["version"],
                "is_complete": row["completed_at"] is not None,
                "cycle": row["cycle"],
                "checkpoints": row["checkpoints"],
            }
            if is_admin:
                config = json.loads(row["server_config"])
                entry.update(
                    diffs=row["reports"] if is_open else None,
                    assignments=row["assignments"] if is_open else None,
                    workers=row["workers"],
                    seconds_left=seconds_until(row["deadline_at"], now)
                    if is_open
                    else None,
                    server_config=public_server_config(config),
                    averaging_error=errors.get(row["id"]),
                )
            processes.append(entry)
        return {"version": __version__, "processes": processes}

    # ------------------------------------------------------------ management

    async def delete(self, body: Any) -> dict[str, Any]:
        """Remove a process with its plans, checkpoints, cycles and workers."""
        process = await self.find_process(
            field_of(body, "name", str), field_of(body, "version", str)
        )
        async with self.store.transaction() as queries:
            await queries.delete_process(process.id)
        self._forget(process.id)
        self._warned_open.discard(process.id)
        self._clock_wakeup.set()
        logger.info("Process %s deleted", process.label)
        return {"status": "success"}

    async def reset(self, body: Any) -> dict[str, Any]:
        """Start a process again from checkpoint 1 with a new cycle 1."""
        process = await self.find_process(
            field_of(body, "name", str), field_of(body, "version", str)
        )
        now = time.time()
        async with self.store.transaction() as queries:
            await queries.reset_process(process.id)
            await queries.insert_cycle(
                process.id, 1, 1, now, now + process.server_config["cycle_length"]
            )
        self._forget(process.id)
        self._clock_wakeup.set()
        logger.info("Process %s reset to checkpoint 1", process.label)
        return {"status": "success"}


def public_server_config(config: dict[str, Any]) -> dict[str, Any]:
    """A server_config safe to show: the secret and the key are left out."""
    auth = config.get("authentication")
    if auth is None:
        return config
    shown = {k: v for k, v in auth.items() if k not in ("secret", "pub_key")}
    return {**config, "authentication": shown}


# ============================================================ HTTP


def respond(request: Request, payload: Any, status: int = 200) -> Response:
    body, media_type = encode_body(payload, as_json=wants_json(request))
    return Response(body, status_code=status, media_type=media_type)


def federation_of(request: Request) -> Federation:
    federation: Federation = request.app.state.federation
    return federation


async def receive(
    request: Request, idle_timeout_s: float, sink: Callable[[bytes], None]
) -> int:
    """Hand the body's chunks to ``sink`` as they arrive; return the bytes.

    One timeout is moved on with every chunk, rather than one per chunk:
    a body arrives in thousands of chunks, and a timer each cost more than
    the copying. ``sink`` may raise to stop reading.

    Raises:
        ApiError: 408 when no data arrives for ``idle_timeout_s``, so that a
            stalled or trickling upload does not hold a connection forever;
            400 when the client goes away mid-body.
    """
    loop = asyncio.get_running_loop()
    received = 0
    try:
        async with asyncio.timeout(idle_timeout_s) as deadline:
            async for chunk in request.stream():
                received += len(chunk)
                sink(chunk)
                deadline.reschedule(loop.time() + idle_timeout_s)
    except ClientDisconnect as exc:
        # Routine on flaky links: nobody is left to read the answer.
        raise ApiError(
            400,
            "client_disconnected",
            f"the client went away after {received} bytes of its body",
        ) from exc
    except TimeoutError as exc:
        raise ApiError(
            408,
            "request_timeout",
            f"no body data arrived for {idle_timeout_s:g} s after {received} "
            "bytes; the upload was dropped",
        ) from exc
    return received


def check_uncompressed(request: Request) -> None:
    """Refuse a compressed body with 415: bodies are never inflated."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding!r:.40} is not accepted; send the body "
            "uncompressed",
        )


def declared_length(request: Request) -> int | None:
    """The body's Content-Length when it is a plain number, else None."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and len(declared) <= 18:
        return int(declared)
    return None


async def read_body(
    request: Request, limit: int, idle_timeout_s: float, *, slack: int = 0
) -> bytearray | memoryview:
    """Read a request body into one buffer, refusing it past ``limit`` bytes.

    With ``slack`` the buffer has that many spare bytes after the body, and
    a view of the body alone is returned (see :func:`align_field`).

    Raises:
        ApiError: 413 as soon as the declared or received size passes the
            limit, before the rest is read; 408 when no data arrives for
            ``idle_timeout_s``; 415 for a compressed body, which is never
            inflated (no decompression bombs).
    """
    check_uncompressed(request)
    size = declared_length(request)
    if size is not None and size > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"body of {size} bytes is over this route's limit of {limit} bytes",
        )
    if size is None:
        buffer = bytearray()

        def grow(chunk: bytes) -> None:
            buffer.extend(chunk)
            if len(buffer) > limit:
                raise ApiError(
                    413,
                    "payload_too_large",
                    f"body is over this route's limit of {limit} bytes",
                )

        await receive(request, idle_timeout_s, grow)
        if not slack:
            return buffer
        size = len(buffer)
        buffer += bytes(slack)
        return memoryview(buffer)[:size]

    # The declared length is within the limit: one buffer of that size is
    # filled in place, never grown or copied (the server rejects a body
    # that runs past its Content-Length before it gets here).
    buffer = bytearray(size + slack)
    filled = 0

    def fill(chunk: bytes) -> None:
        nonlocal filled
        if filled + len(chunk) > size:
            raise bad_request(
                f"body runs past its declared {size} bytes", "invalid_body"
            )
        view[filled : filled + len(chunk)] = chunk
        filled += len(chunk)

    with memoryview(buffer) as view:
        received = await receive(request, idle_timeout_s, fill)
    if received != size:
        raise bad_request(
            f"body ended after {received} of its {size} declared bytes",
            "invalid_body",
        )
    return memoryview(buffer)[:size] if slack else buffer


def align_field(body: dict[Any, Any], name: str) -> None:
    """Move a byte-string field to an 8-byte boundary inside its own buffer.

    The state documents that workers send keep every tensor 8-aligned from
    the document's start, but the message around the diff puts that start
    anywhere. Moving the diff's bytes up to 7 places along, into the spare
    bytes that :func:`read_body` left after the body, lets its tensors map
    the buffer instead of each being copied. The rest of the message is
    decoded already, and the diff is its only view of the buffer.
    """
    view = body.get(name)
    if not isinstance(view, memoryview) or view.readonly or not len(view):
        return
    whole = memoryview(view.obj).cast("B")
    start = ctypes.addressof(ctypes.c_char.from_buffer(whole))
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    shift = -address % STATE_ALIGN_BYTES
    offset = address - start
    if not shift or offset + len(view) + shift > len(whole):
        return
    ctypes.memmove(address + shift, address, len(view))
    body[name] = whole[offset + shift : offset + shift + len(view)]


async def message(
    request: Request, limit: int, *, views: bool = False, align: str | None = None
) -> dict[Any, Any]:
    """Read and decode a control message, which must be a map.

    ``views`` keeps byte strings as views of the body read; ``align`` names
    the one whose bytes are then moved to an 8-byte boundary.
    """
    idle_timeout_s = federation_of(request).settings.body_idle_timeout_s
    content_type = request.headers.get("content-type", "")
    if is_json_type(content_type):
        # Byte strings travel as base64 in JSON: 4 characters for 3 bytes,
        # and some encoders write base64's "/" as "\/" (up to 1/64 more).
        limit = limit * 7 // 5 + 4096
    slack = STATE_ALIGN_BYTES if align else 0
    data = await read_body(request, limit, idle_timeout_s, slack=slack)
    if len(data) > MIB:
        # A large JSON body takes a while to parse; the loop serves others.
        body = await asyncio.to_thread(decode_body, data, content_type, views=views)
    else:
        body = decode_body(data, content_type, views=views)
    if not isinstance(body, dict):
        raise bad_request(
            f"body must be a map; got {type(body).__name__}", "invalid_body"
        )
    if align is not None:
        align_field(body, align)
    return body


def control(
    action: Callable[[Federation, Any], Awaitable[dict[str, Any]]],
    *,
    is_admin: bool = False,
    limit: Callable[[Federation], int] = lambda f: f.settings.max_message_bytes,
    views: bool = False,
    align: str | None = None,
) -> Callable[[Request], Awaitable[Response]]:
    """A route that decodes one control message and answers what ``action`` says.

    ``views`` and ``align`` are :func:`message`'s.
    """

    async def handler(request: Request) -> Response:
        federation = federation_of(request)
        if is_admin:
            await federation.check_admin(request.headers.get("authorization"))
        body = await message(request, limit(federation), views=views, align=align)
        return respond(request, await action(federation, body))

    return handler


class BlobResponse(Response):
    """Cached bytes sent as they are: every download shares one buffer."""

    media_type = CBOR_TYPE

    def render(self, content: Any) -> bytes | memoryview:
        return b"" if content is None else content  # type: ignore[no-any-return]


def blob_response(request: Request, blob: Blob) -> Response:
    """The blob, or 304 with no body when the client already holds it."""
    headers = {"ETag": blob.etag, "Cache-Control": "no-cache"}
    held = request.headers.get("if-none-match", "")
    tags = {tag.strip().removeprefix("W/") for tag in held.split(",")}
    if blob.etag in tags or "*" in tags:
        return Response(status_code=304, headers=headers)
    return BlobResponse(blob.data, headers=headers)


async def get_model(request: Request) -> Response:
    federation = federation_of(request)
    return blob_response(request, await federation.get_model(request.query_params))


async def get_plan(request: Request) -> Response:
    federation = federation_of(request)
    return blob_response(request, await federation.get_plan(request.query_params))


async def retrieve_model(request: Request) -> Response:
    federation = federation_of(request)
    await federation.check_admin(request.headers.get("authorization"))
    return blob_response(request, await federation.retrieve(request.query_params))


async def status(request: Request) -> Response:
    federation = federation_of(request)
    authorization = request.headers.get("authorization")
    # Without credentials the summary is public; credentials that are sent
    # must be right, so a typo in the token is not silently ignored.
    if authorization is not None:
        await federation.check_admin(authorization)
    return respond(request, await federation.status(is_admin=authorization is not None))


_SPEED_TEST_CHUNK = secrets.token_bytes(SPEED_TEST_CHUNK)


async def speed_test_download(request: Request) -> Response:
    """Send ``size_bytes`` bytes (1 MiB by default) from one reused chunk."""
    federation = federation_of(request)
    await federation.check_worker(request.query_params.get("worker_id"))
    size = request.query_params.get("size_bytes", str(SPEED_TEST_DEFAULT_BYTES))
    is_digits = size.isascii() and size.isdigit() and len(size) <= 15
    if not is_digits or not 0 < int(size) <= SPEED_TEST_MAX_BYTES:
        raise bad_request(
            f'"size_bytes" must be a whole number from 1 to {SPEED_TEST_MAX_BYTES}; '
            f"got {size!r:.20}",
            "invalid_field",
        )
    total = int(size)

    async def chunks() -> AsyncIterator[bytes]:
        left = total
        while left > 0:
            step = min(left, SPEED_TEST_CHUNK)
            yield _SPEED_TEST_CHUNK[:step]
            left -= step

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(total), "Cache-Control": "no-store"},
    )


async def speed_test_upload(request: Request) -> Response:
    """Read and discard the body; answer how fast it arrived."""
    federation = federation_of(request)
    await federation.check_worker(request.query_params.get("worker_id"))
    check_uncompressed(request)
    declared = declared_length(request)
    if declared is not None and declared > SPEED_TEST_MAX_BYTES:
        raise ApiError(
            413,
            "payload_too_large",
            f"speed-test upload of {declared} bytes is over the limit of "
            f"{SPEED_TEST_MAX_BYTES} bytes",
        )
    received = 0
    started = time.perf_counter()

    def count(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)
        if received > SPEED_TEST_MAX_BYTES:
            raise ApiError(
                413,
                "payload_too_large",
                f"speed-test upload is over the limit of {SPEED_TEST_MAX_BYTES} bytes",
            )

    await receive(request, federation.settings.body_idle_timeout_s, count)
    seconds = max(time.perf_counter() - started, 1e-6)
    return respond(
        request,
        {
            "received_bytes": received,
            "seconds": seconds,
            "upload_mbps": received * 8 / seconds / 1e6,
        },
    )


async def health(request: Request) -> Response:
    return respond(request, {"status": "ok", "version": __version__})


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, (ApiError, StorageError))
    http_logger.debug(
        "%s %s refused: %d %s", request.method, request.url.path, exc.status, exc.code
    )
    return respond(request, {"error": exc.message, "code": exc.code}, exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    detail = f"{request.method} {request.url.path}: {exc.detail}"
    return respond(request, {"error": detail, "code": code}, exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the exception with its traceback after this response is
    # sent; the client only learns that the fault is the server's.
    return respond(
        request,
        {
            "error": "the server failed to handle this request; see its log",
            "code": "internal_error",
        },
        500,
    )


def create_app(settings: Settings) -> Starlette:
    """Build the ASGI app; the store opens and closes with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        federation = Federation(Store(settings.db_path), settings)
        await federation.start()
        app.state.federation = federation
        logger.info("nimble-edge %s ready", __version__)
        try:
            yield
        finally:
            await federation.stop()
            logger.info("nimble-edge stopped")

    prefix = "/model-centric"
    host_training = control(
        Federation.host, is_admin=True, limit=lambda f: f.settings.max_host_bytes
    )
    report = control(
        Federation.report,
        limit=Federation.max_report_bytes,
        views=True,
        align="diff",
    )
    routes = [
        Route(f"{prefix}/host-training", host_training, methods=["POST"]),
        Route(
            f"{prefix}/authenticate", control(Federation.authenticate), methods=["POST"]
        ),
        Route(
            f"{prefix}/cycle-request",
            control(Federation.cycle_request),
            methods=["POST"],
        ),
        Route(f"{prefix}/get-model", get_model, methods=["GET"]),
        Route(f"{prefix}/get-plan", get_plan, methods=["GET"]),
        Route(f"{prefix}/report", report, methods=["POST"]),
        Route(f"{prefix}/retrieve-model", retrieve_model, methods=["GET"]),
        Route(
            f"{prefix}/delete-process",
            control(Federation.delete, is_admin=True),
            methods=["POST"],
        ),
        Route(
            f"{prefix}/reset-process",
            control(Federation.reset, is_admin=True),
            methods=["POST"],
        ),
        Route(f"{prefix}/speed-test", speed_test_download, methods=["GET"]),
        Route(f"{prefix}/speed-test", speed_test_upload, methods=["POST"]),
        Route("/status", status, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        ApiError: api_error,
        StorageError: api_error,
        HTTPException: http_error,
        Exception: server_error,
    }
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


# ============================================================ CLI


def env_default(flag: str, default: Any) -> Any:
    """The flag's ``NIMBLE_EDGE_<FLAG>`` environment variable, else ``default``."""
    return os.environ.get("NIMBLE_EDGE_" + flag.upper().replace("-", "_"), default)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings(
        db_path=Path(args.db),
        admin_token=os.environ.get("NIMBLE_EDGE_ADMIN_TOKEN") or None,
        max_host_bytes=int(args.max_host_mb * MIB),
        body_idle_timeout_s=args.body_timeout_s,
        max_processes=args.max_processes,
        max_workers_per_process=args.max_workers_per_process,
        max_open_assignments=args.max_open_assignments,
        keep_diffs=args.keep_diffs,
        max_retry_s=args.max_retry_s,
        max_plan_memory_bytes=int(args.max_plan_memory_mb * MIB),
    )
    logger.info("Runtime: %s", tune_runtime(args.threads, args.malloc_cache_mb * MIB))
    # Open the store once before listening, so that a read-only or full disk
    # is one clear error line instead of a failed application start-up.
    asyncio.run(check_store(settings.db_path))
    check_port(args.host, args.port)

    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,
        # Access lines carry query strings, and request_key is a credential.
        access_log=False,
        limit_concurrency=args.max_connections,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal
    # again under the handler it found; a no-op one lets serve exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    logger.info(
        "Starting nimble-edge %s on http://%s:%s", __version__, args.host, args.port
    )
    server.run()
    if not server.started:
        print("error: the server did not start; see the log above", file=sys.stderr)
        return 1
    return 0


def check_port(host: str, port: int) -> None:
    """Raise RuntimeError if ``host:port`` cannot be listened on.

    uvicorn exits on its own when it cannot bind, before ``serve`` could
    say why on one line; binding once first gives the error line instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise RuntimeError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another "
            "server on that port? Choose one with --port"
        ) from exc


async def check_store(path: Path) -> None:
    """Open the store, write to it once, and close it.

    Raises:
        RuntimeError: the file cannot be opened, migrated or written.
    """
    store = Store(path)
    await store.open()
    try:
        async with store.transaction() as queries:
            await queries.set_setting("last_started_at", str(time.time()))
    except StorageError as exc:
        raise RuntimeError(f"cannot write database {path}: {exc.message}") from exc
    finally:
        await store.close()


def migrate(args: argparse.Namespace) -> int:
    async def run() -> list[str]:
        store = Store(Path(args.db))
        await store.open()
        await store.close()
        return store.applied

    applied = asyncio.run(run())
    for name in applied:
        print(f"applied {name}")
    print(f"{args.db}: schema up to date")
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    db_path: Path,
    port: int,
    token: str,
    *,
    log_level: str = "warning",
    log_file: Any = None,
) -> subprocess.Popen[bytes]:
    """Start ``serve`` as its own process on loopback and wait until it answers.

    Raises:
        RuntimeError: the server exited or did not answer within 60 seconds.
    """

    env = dict(os.environ, NIMBLE_EDGE_ADMIN_TOKEN=token)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "serve",
        "--db",
        str(db_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        log_level,
    ]
    server = subprocess.Popen(command, env=env, stderr=log_file, stdout=log_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if (
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code
                == 200
            ):
                return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not answer on /health within 60 s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def demo(args: argparse.Namespace) -> int:
    import importlib.util

    path = Path(__file__).resolve().parent / "examples" / "digits" / "demo.py"
    if not path.is_file():
        print(
            "error: the demo needs examples/digits/ from a source checkout",
            file=sys.stderr,
        )
        return 1
    spec = importlib.util.spec_from_file_location("nimble_edge_digits_demo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)

    db_path = (
        Path(args.db)
        if args.db
        else Path(tempfile.mkdtemp(prefix="nimble-edge-")) / "demo.sqlite"
    )
    if db_path.exists():
        print(
            f"error: {db_path} exists; the demo starts from a new file", file=sys.stderr
        )
        return 1
    token = secrets.token_urlsafe(32)
    port = free_port()
    print(f"database: {db_path}")
    server = start_server(db_path, port, token)
    try:
        accuracy = module.run(
            f"127.0.0.1:{port}",
            token,
            cycles=args.cycles,
            workers=args.workers,
            seed=args.seed,
        )
    finally:
        stop_server(server)
    print(f"database kept at {db_path}")
    return 0 if accuracy >= args.min_accuracy else 1


def admin_client(args: argparse.Namespace) -> Any:
    """The admin client for ``--address``, with the token from the environment."""
    from plan_runtime.admin import ModelCentricFLClient

    if not os.environ.get("NIMBLE_EDGE_ADMIN_TOKEN"):
        raise RuntimeError(
            "NIMBLE_EDGE_ADMIN_TOKEN is not set; export the server's admin token "
            "(serve printed it, or wrote it beside its database, on first start)"
        )
    return ModelCentricFLClient(args.address, secure=False).connect()


def list_command(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        processes = client.list_processes()
    if args.json:
        print(json.dumps(processes, indent=2))
        return 0
    print(
        f"{'process':<30} {'cycle':>6} {'diffs':>6} {'workers':>8} {'checkpoints':>12}"
    )
    for p in processes:
        cycle = "done" if p["is_complete"] else p["cycle"]
        diffs = "-" if p["diffs"] is None else p["diffs"]
        label = f"{p['name']}@{p['version']}"
        print(
            f"{label:<30} {cycle!s:>6} {diffs!s:>6} {p['workers']:>8} "
            f"{p['checkpoints']:>12}"
        )
    return 0


def delete_command(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        client.delete_process(args.name, args.version)
    print(f"deleted {args.name}@{args.version}", file=sys.stderr)
    return 0


def reset_command(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        client.reset_process(args.name, args.version)
    print(f"reset {args.name}@{args.version} to checkpoint 1", file=sys.stderr)
    return 0


def retrieve_command(args: argparse.Namespace) -> int:
    with admin_client(args) as client:
        state = client.retrieve_model(args.name, args.version, args.checkpoint)
    Path(args.out).write_bytes(encode_state(state))
    print(f"wrote {len(state)} tensors to {args.out}", file=sys.stderr)
    return 0


def token_command(args: argparse.Namespace) -> int:
    """Print a worker JWT signed with a process's configured secret or a key."""

    async def find() -> Process | None:
        store = Store(Path(args.db))
        await store.open()
        try:
            return await store.read.process(args.process, args.version)
        finally:
            await store.close()

    if not Path(args.db).is_file():
        raise RuntimeError(f"no database at {args.db}; pass the --db that serve uses")
    process = asyncio.run(find())
    if process is None:
        raise RuntimeError(f"no process {args.process!r} in {args.db}")
    auth = process.server_config["authentication"]
    if auth is None:
        raise RuntimeError(f"{process.label} has no authentication; any token works")
    if "secret" in auth:
        key: Any = auth["secret"]
    elif args.key_file:
        key = Path(args.key_file).read_text()
    else:
        raise RuntimeError(
            f"{process.label} verifies tokens with a public key; pass the matching "
            "private key with --key-file"
        )

    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "exp": now + args.ttl}
    if auth.get("audience") is not None:
        audience = auth["audience"]
        claims["aud"] = audience if isinstance(audience, str) else audience[0]
    if auth.get("issuer") is not None:
        claims["iss"] = auth["issuer"]
    print(jwt.encode(claims, key, algorithm=auth["algorithms"][0]))
    return 0


def check_plan_file(args: argparse.Namespace) -> int:
    """Check a plan file as the admin client does before hosting it."""
    from plan_runtime.check import check

    data = Path(args.file).read_bytes()
    limit = int(args.max_plan_memory_mb * MIB)
    try:
        report = check(data, max_memory_bytes=limit, steps=args.steps)
    except PlanError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    print(report.format(ops=not args.no_ops))
    if not report.is_ok:
        failed = ", ".join(finding.name for finding in report.failures)
        print(f"error: {args.file} failed: {failed}", file=sys.stderr)
        return 1
    return 0


def version(args: argparse.Namespace) -> int:
    import starlette
    import uvicorn

    for name, value in [
        ("nimble-edge", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("starlette", starlette.__version__),
        ("uvicorn", uvicorn.__version__),
        ("aiosqlite", getattr(aiosqlite, "__version__", "?")),
        ("cbor2", _dist_version("cbor2")),
        ("pyjwt", jwt.__version__),
        ("httpx", httpx.__version__),
        ("sqlite", sqlite3.sqlite_version),
    ]:
        print(f"{name}: {value}")
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(name)
    except PackageNotFoundError:
        return "not installed"


def port_number(text: str) -> int:
    """argparse type: a TCP port from 1 to 65535."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535; got {value}")
    return value


def positive(
    kind: Callable[[str], Any], *, allow_zero: bool = False
) -> Callable[[str], Any]:
    """argparse type: a finite number of ``kind`` above zero (or from zero)."""

    def parse(text: str) -> Any:
        value = kind(text)
        is_allowed = value > 0 or (allow_zero and value == 0)
        if not (math.isfinite(value) and is_allowed):
            bound = "0 or more" if allow_zero else "above 0"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {bound}; got {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


Flag = tuple[str, Callable[[str], Any], Any, str]

# Shared by serve and check-plan, so that a file passes the check exactly
# when the server would take it.
PLAN_MEMORY_FLAG: Flag = (
    "max-plan-memory-mb",
    positive(float),
    1024,
    "refuse a plan whose dry run holds more than this many MiB at once",
)


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    """Add ``--flag`` options, each defaulting to its ``NIMBLE_EDGE_FLAG``."""
    for flag, kind, default, text in flags:
        variable = "NIMBLE_EDGE_" + flag.upper().replace("-", "_")
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=env_default(flag, default),
            help=f"{text} ({variable})",
        )


def add_required(parser: argparse.ArgumentParser, flag: str, text: str) -> None:
    """A ``--flag`` that must be given, on the command line or in its variable."""
    variable = "NIMBLE_EDGE_" + flag.upper().replace("-", "_")
    default = env_default(flag, None)
    parser.add_argument(
        f"--{flag}",
        default=default,
        required=default is None,
        help=f"{text} ({variable})",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="nimble-edge",
        description=__doc__.split("\n\n")[0],
        formatter_class=formatter,
    )
    parser.add_argument(
        "--log-level",
        default=env_default("log-level", "info"),
        choices=LOG_LEVELS,
        help="log level (NIMBLE_EDGE_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser(
        "serve", help="run the orchestrator", formatter_class=formatter
    )
    serve_flags: list[Flag] = [
        ("db", str, DEFAULT_DB, "SQLite file"),
        (
            "host",
            str,
            DEFAULT_HOST,
            "address to listen on; 0.0.0.0 exposes the "
            "server to every network this box is on",
        ),
        ("port", port_number, DEFAULT_PORT, "TCP port, 1 to 65535"),
        ("max-host-mb", positive(float), 512, "largest host-training upload, in MiB"),
        ("max-processes", positive(int), 100, "most processes hosted at once"),
        (
            "max-workers-per-process",
            positive(int),
            100_000,
            "most workers one process admits to authenticate",
        ),
        (
            "max-open-assignments",
            positive(int),
            10_000,
            "most assignments in one cycle when its process sets no max_workers",
        ),
        (
            "body-timeout-s",
            positive(float),
            30.0,
            "drop an upload after this many seconds without data",
        ),
        (
            "max-connections",
            positive(int),
            1024,
            "concurrent connections; more are answered 503",
        ),
        (
            "max-retry-s",
            positive(int),
            60,
            "the longest wait a rejected worker is told before asking again",
        ),
        PLAN_MEMORY_FLAG,
        (
            "threads",
            positive(int),
            1,
            "torch threads for decoding and averaging; more than 1 only helps "
            "on a box with idle cores",
        ),
        (
            "malloc-cache-mb",
            positive(int, allow_zero=True),
            256,
            "raise glibc's mmap and trim thresholds to this many MiB, so large "
            "buffers are reused instead of mapped afresh; that much freed "
            "memory may stay with the process; 0 keeps glibc's defaults",
        ),
    ]
    add_flags(serve_parser, serve_flags)
    serve_parser.add_argument(
        "--keep-diffs",
        action="store_true",
        default=env_default("keep-diffs", "") in ("1", "true", "yes"),
        help="keep every diff after its cycle is averaged, for audits; by default "
        "a closed cycle's diffs are dropped to bound the file's size "
        "(NIMBLE_EDGE_KEEP_DIFFS=1)",
    )
    serve_parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=LOG_LEVELS,
        help="log level (NIMBLE_EDGE_LOG_LEVEL)",
    )
    serve_parser.set_defaults(handler=serve)

    migrate_parser = commands.add_parser(
        "migrate",
        help="create or upgrade the SQLite file, then exit",
        formatter_class=formatter,
    )
    migrate_parser.add_argument(
        "--db",
        default=env_default("db", DEFAULT_DB),
        help="SQLite file (NIMBLE_EDGE_DB)",
    )
    migrate_parser.set_defaults(handler=migrate)

    demo_parser = commands.add_parser(
        "demo",
        help="train a digits classifier with 10 workers over real HTTP",
        formatter_class=formatter,
    )
    demo_parser.add_argument(
        "--db",
        default=env_default("demo-db", None),
        help="new SQLite file; a temporary one when not given (NIMBLE_EDGE_DEMO_DB)",
    )
    demo_parser.add_argument(
        "--cycles",
        type=positive(int),
        default=env_default("cycles", 20),
        help="cycles to run (NIMBLE_EDGE_CYCLES)",
    )
    demo_parser.add_argument(
        "--workers",
        type=positive(int),
        default=env_default("workers", 10),
        help="workers, one data shard each (NIMBLE_EDGE_WORKERS)",
    )
    demo_parser.add_argument(
        "--seed",
        type=int,
        default=env_default("seed", 0),
        help="seed for the split, shards and model (NIMBLE_EDGE_SEED)",
    )
    demo_parser.add_argument(
        "--min-accuracy",
        type=float,
        default=env_default("min-accuracy", 0.90),
        help="exit 1 below this final test accuracy (NIMBLE_EDGE_MIN_ACCURACY)",
    )
    demo_parser.set_defaults(handler=demo)

    check_parser = commands.add_parser(
        "check-plan",
        help="dry-run, run and time a plan file; exit 1 if a check fails",
        formatter_class=formatter,
    )
    check_parser.add_argument("file", help="a plan document (CBOR)")
    add_flags(
        check_parser,
        [PLAN_MEMORY_FLAG, ("steps", int, 20, "timed steps; 0 skips timing")],
    )
    check_parser.add_argument(
        "--no-ops",
        action="store_true",
        default=env_default("no-ops", "") not in ("", "0"),
        help="leave out the list of ops (NIMBLE_EDGE_NO_OPS)",
    )
    check_parser.set_defaults(handler=check_plan_file)

    version_parser = commands.add_parser(
        "version", help="print versions for a bug report", formatter_class=formatter
    )
    version_parser.set_defaults(handler=version)

    def admin_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            formatter_class=formatter,
            description=f"{help_text}. The admin token is read from "
            "NIMBLE_EDGE_ADMIN_TOKEN.",
        )
        sub.add_argument(
            "--address",
            default=env_default("address", "127.0.0.1:7000"),
            help="the server, host:port or a URL (NIMBLE_EDGE_ADDRESS)",
        )
        return sub

    list_parser = admin_parser("list", "list hosted processes and their state")
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    list_parser.set_defaults(handler=list_command)
    for name, handler, help_text in (
        ("delete", delete_command, "delete a process with its checkpoints"),
        ("reset", reset_command, "reset a process to checkpoint 1"),
    ):
        sub = admin_parser(name, help_text)
        sub.add_argument("name", help="process name")
        sub.add_argument("version", help="process version")
        sub.set_defaults(handler=handler)

    retrieve_parser = admin_parser("retrieve", "save a checkpoint as a state document")
    retrieve_parser.add_argument("name", help="process name")
    retrieve_parser.add_argument(
        "version", nargs="?", default=None, help="process version (default: the newest)"
    )
    retrieve_parser.add_argument(
        "--checkpoint",
        default=env_default("checkpoint", "latest"),
        help="checkpoint number, or latest (NIMBLE_EDGE_CHECKPOINT)",
    )
    add_required(retrieve_parser, "out", "file to write")
    retrieve_parser.set_defaults(handler=retrieve_command)

    token_parser = commands.add_parser(
        "token", help="mint a worker JWT for testing", formatter_class=formatter
    )
    token_parser.add_argument(
        "--db",
        default=env_default("db", DEFAULT_DB),
        help="SQLite file (NIMBLE_EDGE_DB)",
    )
    add_required(token_parser, "process", "process name")
    token_parser.add_argument(
        "--version",
        default=env_default("version", None),
        help="process version, the newest when not given (NIMBLE_EDGE_VERSION)",
    )
    add_required(token_parser, "sub", "the device's identity")
    token_parser.add_argument(
        "--ttl",
        type=positive(int),
        default=env_default("ttl", 3600),
        help="seconds until the token expires (NIMBLE_EDGE_TTL)",
    )
    token_parser.add_argument(
        "--key-file",
        default=env_default("key-file", None),
        help="private key PEM, for processes that verify with a public key "
        "(NIMBLE_EDGE_KEY_FILE)",
    )
    token_parser.set_defaults(handler=token_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # argparse checks choices on the command line but not on defaults, which
    # may come from the environment.
    if args.log_level not in LOG_LEVELS:
        parser.error(
            f"NIMBLE_EDGE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}; "
            f"got {args.log_level!r}"
        )
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx narrates every request at INFO (the demo makes thousands), and
    # aiosqlite logs every statement with its parameters at DEBUG, secrets
    # and blobs included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, sqlite3.Error, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the server: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

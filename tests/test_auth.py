"""Worker authentication: JWT families, claims, stable identity, minted tokens."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import nimble_edge
from plan_runtime import ModelCentricFLClient, ServerError, Worker
from tests.conftest import ROOT, ServerProcess

SECRET = "0123456789abcdef0123456789abcdef-hmac"


def pem_pair(key) -> tuple[str, str]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
    )
    return private, public


RSA_PRIVATE, RSA_PUBLIC = pem_pair(rsa.generate_private_key(65537, 2048))
EC_PRIVATE, EC_PUBLIC = pem_pair(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """A server logging at DEBUG, so that a leaked secret would show."""
    directory = tmp_path_factory.mktemp("auth")
    handle = ServerProcess(directory / "edge.sqlite", directory / "serve.log")
    handle.port = nimble_edge.free_port()
    log = handle.log_path.open("ab")
    handle.process = nimble_edge.start_server(
        handle.db_path, handle.port, handle.token, log_level="debug", log_file=log
    )
    log.close()
    yield handle
    handle.stop()


def host_with(server, plan, authentication) -> str:
    name = f"auth-{uuid.uuid4().hex[:8]}"
    with ModelCentricFLClient(server.address, token=server.token) as admin:
        admin.host_federated_training(
            model=[torch.zeros(3, 4), torch.zeros(3)],
            client_plans={"training_plan": plan},
            client_config={"name": name, "version": "1"},
            server_config={"authentication": authentication},
        )
    return name


def authenticate(server, name, token) -> httpx.Response:
    body = {"model_name": name}
    if token is not None:
        body["auth_token"] = token
    return httpx.post(f"{server.url}/model-centric/authenticate", json=body)


def claims(**extra):
    return {"sub": "device-1", "exp": int(time.time()) + 300, **extra}


def test_rsa_key_accepts_its_own_tokens_only(debug_server, plan):
    name = host_with(
        debug_server,
        plan,
        {"type": "jwt", "pub_key": RSA_PUBLIC, "algorithms": ["RS256"]},
    )
    good = jwt.encode(claims(), RSA_PRIVATE, algorithm="RS256")
    other_key = pem_pair(rsa.generate_private_key(65537, 2048))[0]
    forged = jwt.encode(claims(), other_key, algorithm="RS256")

    assert authenticate(debug_server, name, good).status_code == 200
    assert authenticate(debug_server, name, forged).status_code == 401


def test_public_key_is_never_used_as_an_hmac_secret(debug_server, plan):
    name = host_with(
        debug_server,
        plan,
        {"type": "jwt", "pub_key": RSA_PUBLIC, "algorithms": ["RS256"]},
    )
    # The classic confusion: an HS256 token "signed" with the public key.
    header = {"alg": "HS256", "typ": "JWT"}
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    )
    signature = hmac.new(RSA_PUBLIC.encode(), signing_input.encode(), hashlib.sha256)
    confused = f"{signing_input}.{b64(signature.digest())}"

    assert authenticate(debug_server, name, confused).status_code == 401


def test_ec_key_with_es256(debug_server, plan):
    name = host_with(debug_server, plan, {"type": "jwt", "pub_key": EC_PUBLIC})

    good = jwt.encode(claims(), EC_PRIVATE, algorithm="ES256")

    assert authenticate(debug_server, name, good).status_code == 200


@pytest.mark.parametrize(
    ("authentication", "message"),
    [
        ({"type": "jwt", "pub_key": RSA_PUBLIC, "algorithms": ["ES256"]}, "algorithms"),
        ({"type": "jwt", "pub_key": RSA_PUBLIC, "algorithms": ["HS256"]}, "algorithms"),
        ({"type": "jwt", "pub_key": EC_PUBLIC, "algorithms": ["RS256"]}, "algorithms"),
        ({"type": "jwt", "secret": SECRET, "algorithms": ["none"]}, "algorithms"),
        ({"type": "jwt", "secret": SECRET, "algorithms": ["RS256"]}, "algorithms"),
        ({"type": "jwt", "pub_key": "not a key"}, "PEM public key"),
        ({"type": "jwt", "secret": SECRET, "pub_key": RSA_PUBLIC}, "exactly one"),
        ({"type": "jwt", "secret": "short"}, "at least 32 bytes"),
        ({"type": "oauth", "secret": SECRET}, '"type": "jwt"'),
        ({"type": "jwt", "secret": SECRET, "audence": "x"}, "unknown key 'audence'"),
    ],
)
def test_bad_authentication_configs_are_refused(
    debug_server, plan, authentication, message
):
    with pytest.raises(ServerError, match=message) as caught:
        host_with(debug_server, plan, authentication)

    assert caught.value.code == "invalid_config"
    assert SECRET not in caught.value.message
    assert RSA_PUBLIC.splitlines()[1] not in caught.value.message


def test_audience_issuer_and_expiry_are_enforced(debug_server, plan):
    name = host_with(
        debug_server,
        plan,
        {
            "type": "jwt",
            "secret": SECRET,
            "audience": "gateway-7",
            "issuer": "factory-ca",
            "require_exp": True,
        },
    )
    right = {"aud": "gateway-7", "iss": "factory-ca"}

    def token(**fields):
        return jwt.encode(fields, SECRET, algorithm="HS256")

    assert authenticate(debug_server, name, token(**claims(**right))).status_code == 200
    assert (
        authenticate(
            debug_server, name, token(**claims(aud="other", iss="factory-ca"))
        ).status_code
        == 401
    )
    assert (
        authenticate(
            debug_server, name, token(**claims(aud="gateway-7", iss="evil"))
        ).status_code
        == 401
    )
    assert (
        authenticate(debug_server, name, token(sub="device-1", **right)).status_code
        == 401
    )
    expired = claims(**right)
    expired["exp"] = int(time.time()) - 10
    assert authenticate(debug_server, name, token(**expired)).status_code == 401


def test_refusals_never_echo_the_token(debug_server, plan):
    name = host_with(debug_server, plan, {"type": "jwt", "secret": SECRET})
    forged = jwt.encode(claims(), "f" * 40, algorithm="HS256")

    response = authenticate(debug_server, name, forged)

    assert response.status_code == 401
    assert forged not in response.text
    assert set(response.json()) == {"error", "code"}


def test_token_command_mints_tokens_that_give_a_stable_worker_id(debug_server, plan):
    name = host_with(
        debug_server, plan, {"type": "jwt", "secret": SECRET, "require_exp": True}
    )

    def mint() -> str:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "nimble_edge.py"),
                "token",
                "--db",
                str(debug_server.db_path),
                "--process",
                name,
                "--sub",
                "sensor-9",
                "--ttl",
                "120",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    first, second = mint(), mint()
    ids = [
        authenticate(debug_server, name, t).json()["worker_id"] for t in (first, second)
    ]

    assert ids[0] == ids[1]
    assert jwt.decode(first, SECRET, algorithms=["HS256"])["sub"] == "sensor-9"


def test_token_command_needs_the_private_key_for_public_key_processes(
    debug_server, plan, tmp_path
):
    name = host_with(debug_server, plan, {"type": "jwt", "pub_key": RSA_PUBLIC})
    key_file = tmp_path / "private.pem"
    key_file.write_text(RSA_PRIVATE)
    command = [
        sys.executable,
        str(ROOT / "nimble_edge.py"),
        "token",
        "--db",
        str(debug_server.db_path),
        "--process",
        name,
        "--sub",
        "s",
    ]

    without = subprocess.run(command, capture_output=True, text=True, timeout=60)
    with_key = subprocess.run(
        [*command, "--key-file", str(key_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert without.returncode == 1 and "--key-file" in without.stderr
    assert with_key.returncode == 0
    assert authenticate(debug_server, name, with_key.stdout.strip()).status_code == 200


def test_secrets_and_tokens_never_reach_the_log(debug_server, plan):
    name = host_with(debug_server, plan, {"type": "jwt", "secret": SECRET})
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    worker = Worker(debug_server.address, auth_token=token)
    job = worker.new_job(name)
    job.on_ready = lambda model, plans, config: None
    job.start()
    httpx.get(
        f"{debug_server.url}/status",
        headers={"Authorization": f"Bearer {debug_server.token}"},
    )

    log = debug_server.log()

    assert "DEBUG" in log and job.request_key
    for secret in (SECRET, token, debug_server.token, job.request_key):
        assert secret not in log


def test_generated_admin_token_goes_to_a_private_file_and_is_stored_hashed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NIMBLE_EDGE_ADMIN_TOKEN"}
    db = tmp_path / "edge.sqlite"

    def serve_once() -> tuple:
        port = nimble_edge.free_port()
        log = tmp_path / f"serve-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "nimble_edge.py"),
                    "serve",
                    "--db",
                    str(db),
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=out,
                stderr=out,
            )
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        return log, port, process

    log, port, process = serve_once()
    token_file = Path(f"{db}.admin-token")
    token = token_file.read_text().strip()
    mode = token_file.stat().st_mode & 0o777
    first = httpx.get(
        f"http://127.0.0.1:{port}/status", headers={"Authorization": f"Bearer {token}"}
    ).status_code
    process.terminate()
    process.wait(timeout=30)
    first_log = log.read_text()
    log, port, process = serve_once()
    again = httpx.get(
        f"http://127.0.0.1:{port}/status", headers={"Authorization": f"Bearer {token}"}
    ).status_code
    wrong = httpx.get(
        f"http://127.0.0.1:{port}/status", headers={"Authorization": "Bearer guess"}
    ).status_code
    process.terminate()
    process.wait(timeout=30)

    assert first == again == 200 and wrong == 401
    assert mode == 0o600
    assert str(token_file) in first_log and token not in first_log
    assert token not in log.read_text()
    stored = (
        sqlite3.connect(db)
        .execute("SELECT value FROM settings WHERE key = 'admin_token'")
        .fetchone()[0]
    )
    assert stored.startswith("pbkdf2_sha256$") and token not in stored


def test_rsa_key_without_algorithms_accepts_rs256_as_documented(debug_server, plan):
    name = host_with(debug_server, plan, {"type": "jwt", "pub_key": RSA_PUBLIC})

    usual = jwt.encode(claims(), RSA_PRIVATE, algorithm="RS256")
    other = jwt.encode(claims(), RSA_PRIVATE, algorithm="PS256")

    assert authenticate(debug_server, name, usual).status_code == 200
    assert authenticate(debug_server, name, other).status_code == 401


def test_claims_that_are_not_text_are_refused_not_crashed_on(debug_server, plan):
    name = host_with(debug_server, plan, {"type": "jwt", "secret": SECRET})
    token = jwt.encode(claims(sub="\ud800"), SECRET, algorithm="HS256")

    response = authenticate(debug_server, name, token)

    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"

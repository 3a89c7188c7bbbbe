"""plan_runtime.check, the check-plan command, and the admin client's refusal."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from plan_runtime import ServerError, check
from plan_runtime.plan import PlanError
from plan_runtime.trace import make_plan

ROOT = Path(__file__).resolve().parent.parent


def check_plan_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "nimble_edge.py"), "check-plan", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def log_plan():
    @make_plan
    def logs(x=torch.zeros(4)):
        return x.log()

    return logs


def test_traced_plan_passes_and_is_compared_with_eager_torch(plan):
    report = check(plan, steps=3)

    assert report.is_ok, report.format()
    names = [finding.name for finding in report.findings]
    assert names == [
        "load",
        "dummy arguments",
        "eager (dummy arguments)",
        "random arguments",
        "deterministic",
        "eager (random arguments)",
    ]
    assert report.plan_step_s is not None and report.eager_step_s is not None


def test_plan_that_differs_from_the_function_fails_the_eager_check(plan):
    def other(xs, ys, batch_size, lr, params):
        return plan(xs, ys, batch_size, lr * 2, params)

    report = check(plan, fn=other, steps=0)

    assert not report.is_ok
    failure = report.failures[0]
    assert failure.name.startswith("eager") and "differs from eager torch" in (
        failure.detail
    )
    with pytest.raises(PlanError, match="failed its check: eager"):
        report.raise_for_failure()


def test_plan_with_non_finite_outputs_fails():
    report = check(log_plan(), steps=0)

    assert report.failures[0].name == "dummy arguments"
    assert "NaN or infinity" in report.failures[0].detail


def test_report_shows_ops_size_memory_and_both_timings(plan):
    text = check(plan, steps=3).format()

    assert f"{len(plan.to_bytes()):,} bytes" in text
    assert "aten::mm" in text and "memory: peak" in text
    assert "eager" in text.splitlines()[-1] and "x eager" in text


def test_cli_checks_a_plan_file_without_eager(tmp_path, plan):
    path = tmp_path / "plan.cbor"
    path.write_bytes(plan.to_bytes())

    result = check_plan_cli(str(path), "--steps", "2")

    assert result.returncode == 0, result.stderr
    assert "aten::addmm" in result.stdout or "aten::mm" in result.stdout
    assert "ok    deterministic" in result.stdout
    assert "not compared: no Python function" in result.stdout
    assert "time per step: plan " in result.stdout
    assert result.stderr == ""


def test_cli_exits_1_for_a_plan_that_fails_a_check(tmp_path):
    path = tmp_path / "log.cbor"
    path.write_bytes(log_plan().to_bytes())

    result = check_plan_cli(str(path), "--no-ops")

    assert result.returncode == 1
    assert "FAIL  dummy arguments" in result.stdout
    assert result.stderr.strip().endswith("failed: dummy arguments, random arguments")


def test_cli_exits_1_for_a_malformed_file_and_for_a_plan_over_the_limit(tmp_path, plan):
    junk = tmp_path / "junk.cbor"
    junk.write_bytes(b"\xff\x00junk")
    good = tmp_path / "plan.cbor"
    good.write_bytes(plan.to_bytes())

    malformed = check_plan_cli(str(junk))
    over = check_plan_cli(str(good), "--max-plan-memory-mb", "0.0001")

    assert malformed.returncode == 1 and "not valid CBOR" in malformed.stderr
    assert over.returncode == 1 and "the limit is" in over.stderr
    assert malformed.stdout == over.stdout == ""


def test_admin_client_refuses_to_upload_a_failing_plan(admin):
    name = f"refused-{uuid.uuid4().hex[:8]}"

    with pytest.raises(PlanError, match="failed its check"):
        admin.host_federated_training(
            model=[torch.zeros(4)],
            client_plans={"training_plan": log_plan()},
            client_config={"name": name, "version": "1"},
            server_config={},
        )

    with pytest.raises(ServerError) as caught:
        admin.retrieve_model(name, "1")
    assert caught.value.code == "process_not_found"

"""The check a plan passes before it is hosted: ``plan_runtime.check(plan)``.

It reloads the plan from its bytes (the dry run included), runs it on its
dummy arguments and on fresh random ones, and checks what can be checked
without the source: outputs of the dtypes and shapes the dry run predicted,
all finite, identical over two runs. When the torch function the plan was
traced from is at hand (a plan made by ``make_plan`` in this process keeps
it, or pass ``fn=``), it also runs that function eagerly on the same
arguments and compares every output within ``atol``/``rtol``. It times a
step of each, side by side.

``python nimble_edge.py check-plan FILE`` runs the same check on a plan
file; a file holds no Python function, so the eager comparison is left out
there (and said so).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from plan_runtime.plan import DEFAULT_MAX_MEMORY_BYTES, Plan, PlanError
from plan_runtime.state import DTYPE_NAMES
from plan_runtime.trace import flatten_outputs, regroup

__all__ = ["CheckReport", "check"]


@dataclass(frozen=True)
class Finding:
    """One check: its name, whether it passed, and what was seen."""

    name: str
    is_ok: bool
    detail: str


@dataclass
class CheckReport:
    """What :func:`check` found; ``format()`` gives the printed report."""

    plan: Plan
    size_bytes: int
    load_s: float
    max_memory_bytes: int
    findings: list[Finding] = field(default_factory=list)
    plan_step_s: float | None = None
    eager_step_s: float | None = None

    @property
    def is_ok(self) -> bool:
        return all(finding.is_ok for finding in self.findings)

    @property
    def failures(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.is_ok]

    def raise_for_failure(self) -> None:
        """Raise :class:`PlanError` listing the failed checks, if any."""
        if not self.is_ok:
            listed = "; ".join(f"{f.name}: {f.detail}" for f in self.failures)
            raise PlanError(f"plan {self.plan.name!r} failed its check: {listed}")

    def format(self, *, ops: bool = True) -> str:
        """The report as text: the plan, its ops, the checks and the timings."""
        plan = self.plan
        memory = plan.memory
        lines = [
            f"plan {plan.name!r}: {len(plan.ops)} ops, {self.size_bytes:,} bytes, "
            f"loaded in {self.load_s * 1000:.1f} ms",
            f"inputs: {_inputs_text(plan)}",
            f"memory: peak {_mib(memory.peak_bytes)} "
            f"{_peak_place(plan)}, limit {_mib(self.max_memory_bytes)}",
        ]
        if ops:
            lines.append("ops:")
            for position, (op, sizes) in enumerate(zip(plan.ops, memory.ops)):
                shapes = ", ".join(f"{d} {list(s)}" for d, s in sizes.outputs)
                lines.append(f"  {position:4d}  {op.name:<40} {shapes}")
        lines.append("checks:")
        for finding in self.findings:
            mark = "ok  " if finding.is_ok else "FAIL"
            lines.append(f"  {mark}  {finding.name}: {finding.detail}")
        lines.append(f"time per step: {self._timing()}")
        return "\n".join(lines)

    def _timing(self) -> str:
        if self.plan_step_s is None:
            return "not measured"
        text = f"plan {self.plan_step_s * 1000:.3f} ms"
        if self.eager_step_s is None:
            return text + ", eager not available"
        ratio = self.plan_step_s / self.eager_step_s
        return f"{text}, eager {self.eager_step_s * 1000:.3f} ms ({ratio:.2f}x eager)"


def check(
    plan: Plan | bytes,
    fn: Callable[..., Any] | None = None,
    *,
    example_args: Sequence[Any] | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int = 20,
    seed: int = 0,
) -> CheckReport:
    """Check a plan as a host would before shipping it; see the module docs.

    Args:
        plan: a plan, or a plan document's bytes.
        fn: the eager torch function to compare with; the function the
            plan was traced from when not given.
        example_args: its dummy arguments; those it was traced with, or
            zeros of the plan's input shapes, when not given.
        max_memory_bytes: the dry run's limit.
        atol, rtol: how far a plan output may be from eager torch's.
        steps: timed steps of each; 0 skips timing.
        seed: seeds the random arguments.

    Returns:
        The report; ``report.is_ok`` says whether every check passed.

    Raises:
        PlanError: ``plan`` is bytes that do not load (as
            :meth:`Plan.from_bytes`).
    """
    if isinstance(plan, (bytes, bytearray)):
        plan = Plan.from_bytes(bytes(plan), max_memory_bytes=max_memory_bytes)
    fn = fn or plan.function
    data = plan.to_bytes()
    started = time.perf_counter()
    report = CheckReport(plan, len(data), 0.0, max_memory_bytes)
    try:
        loaded = Plan.from_bytes(data, max_memory_bytes=max_memory_bytes)
    except PlanError as exc:
        report.findings.append(Finding("load", False, str(exc)))
        return report
    report.load_s = time.perf_counter() - started
    report.findings.append(
        Finding("load", True, "the document reloads and passes the dry run")
    )

    dummy = _dummy_args(loaded, example_args or plan.example_args)
    random_args = _random_args(loaded, dummy, seed)
    for label, args in (("dummy arguments", dummy), ("random arguments", random_args)):
        outputs = _run(report, label, loaded, args)
        if outputs is not None and label == "random arguments":
            _check_determinism(report, loaded, args, outputs)
        if outputs is not None and fn is not None:
            _compare_eager(report, label, fn, loaded, args, outputs, atol, rtol)
    if fn is None:
        report.findings.append(
            Finding(
                "eager",
                True,
                "not compared: no Python function is at hand (pass fn= to "
                "plan_runtime.check)",
            )
        )

    if steps > 0 and report.is_ok:
        report.plan_step_s = _time_step(lambda: loaded(*random_args), steps)
        if fn is not None:
            eager_fn = fn

            def eager_step() -> Any:
                return eager_fn(*regroup(loaded.signature, _clones(random_args)))

            report.eager_step_s = _time_step(eager_step, steps)
    return report


# ---------------------------------------------------------------- arguments


def _flat(args: Sequence[Any]) -> list[Any]:
    flat: list[Any] = []
    for arg in args:
        flat.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return flat


def _dummy_args(plan: Plan, example: Sequence[Any] | None) -> list[torch.Tensor]:
    if example is None:
        return plan.zeros()
    flat = _flat(example)
    return [
        torch.as_tensor(value, dtype=spec.dtype).reshape(spec.shape)
        for spec, value in zip(plan.inputs, flat)
    ]


def _random_args(
    plan: Plan, dummy: list[torch.Tensor], seed: int
) -> list[torch.Tensor]:
    """Fresh arguments: normal floats, small non-negative integers.

    0-d inputs keep their dummy values, because they are hyperparameters
    (batch size, learning rate) more often than data; integer tensors are
    drawn below ``max(2, largest dummy value + 1)``, which keeps class
    labels and embedding indices in range.
    """
    generator = torch.Generator().manual_seed(seed)
    args = []
    for position, (spec, base) in enumerate(zip(plan.inputs, dummy)):
        if position in plan.seed_inputs:
            value = torch.randint(0, 2**31, (), generator=generator)
        elif not spec.shape:
            value = base.clone()
        elif spec.dtype == torch.bool:
            value = torch.randint(0, 2, spec.shape, generator=generator).bool()
        elif spec.dtype.is_floating_point:
            value = torch.randn(spec.shape, generator=generator).to(spec.dtype)
        else:
            high = max(2, int(base.max()) + 1) if base.numel() else 2
            value = torch.randint(0, high, spec.shape, generator=generator)
        args.append(value.to(spec.dtype))
    return args


def _clones(args: list[torch.Tensor]) -> list[torch.Tensor]:
    return [arg.clone() for arg in args]


# ---------------------------------------------------------------- checks


def _run(
    report: CheckReport, label: str, plan: Plan, args: list[torch.Tensor]
) -> tuple[torch.Tensor, ...] | None:
    try:
        outputs = plan(*_clones(args))
    except PlanError as exc:
        report.findings.append(Finding(label, False, str(exc)))
        return None
    got = tuple(_spec(t) for t in outputs)
    if got != plan.memory.outputs:
        report.findings.append(
            Finding(
                label,
                False,
                f"outputs are {_specs_text(got)}; the dry run predicted "
                f"{_specs_text(plan.memory.outputs)}",
            )
        )
        return None
    bad = [i for i, t in enumerate(outputs) if not _is_finite(t)]
    if bad:
        report.findings.append(
            Finding(label, False, f"output {bad[0]} holds NaN or infinity")
        )
        return None
    report.findings.append(
        Finding(
            label,
            True,
            f"{len(outputs)} outputs of the predicted dtypes and shapes, all finite",
        )
    )
    return outputs


def _check_determinism(
    report: CheckReport,
    plan: Plan,
    args: list[torch.Tensor],
    first: tuple[torch.Tensor, ...],
) -> None:
    second = plan(*_clones(args))
    differ = [i for i, (a, b) in enumerate(zip(first, second)) if not torch.equal(a, b)]
    if differ:
        detail = f"output {differ[0]} differs between two runs on the same arguments"
        report.findings.append(Finding("deterministic", False, detail))
    else:
        detail = "two runs on the same arguments agree exactly"
        report.findings.append(Finding("deterministic", True, detail))


def _compare_eager(
    report: CheckReport,
    label: str,
    fn: Callable[..., Any],
    plan: Plan,
    args: list[torch.Tensor],
    outputs: tuple[torch.Tensor, ...],
    atol: float,
    rtol: float,
) -> None:
    name = f"eager ({label})"
    try:
        # Eager random ops use the global generator: seeded as the plan
        # seeds its own, the draws are the same.
        with torch.random.fork_rng(devices=[]):
            if plan.seed_inputs:
                torch.manual_seed(int(args[plan.seed_inputs[0]]))
            expected = flatten_outputs(fn(*regroup(plan.signature, _clones(args))))
    except Exception as exc:
        report.findings.append(Finding(name, False, f"the function failed: {exc}"))
        return
    if len(expected) != len(outputs):
        report.findings.append(
            Finding(
                name,
                False,
                f"the function returns {len(expected)} tensors; the plan "
                f"{len(outputs)}",
            )
        )
        return

    worst = 0.0
    for position, (got, want) in enumerate(zip(outputs, expected)):
        want = want.detach()
        if got.shape != want.shape or got.dtype != want.dtype:
            report.findings.append(
                Finding(
                    name,
                    False,
                    f"output {position} is {_spec_text(_spec(got))}; eager "
                    f"gives {_spec_text(_spec(want))}",
                )
            )
            return
        if not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
            difference = (got.double() - want.double()).abs().max().item()
            report.findings.append(
                Finding(
                    name,
                    False,
                    f"output {position} differs from eager torch by up to "
                    f"{difference:.3g} (atol {atol:g}, rtol {rtol:g})",
                )
            )
            return
        if got.numel() and (got.is_floating_point() or got.is_complex()):
            worst = max(worst, (got.double() - want.double()).abs().max().item())
    detail = f"matches eager torch within {atol:g} (largest difference {worst:.2g})"
    report.findings.append(Finding(name, True, detail))


def _time_step(step: Callable[[], Any], steps: int) -> float:
    for _ in range(min(3, steps)):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---------------------------------------------------------------- text


def _is_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor).all())


def _spec(tensor: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    return DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape)


def _spec_text(spec: tuple[str, tuple[int, ...]]) -> str:
    return f"{spec[0]} {list(spec[1])}"


def _specs_text(specs: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    return "(" + ", ".join(_spec_text(spec) for spec in specs) + ")"


def _inputs_text(plan: Plan) -> str:
    parts = []
    position = 0
    for name, size in plan.signature:
        if size is None:
            parts.append(f"{name} {_spec_text(_spec_of(plan, position))}")
            position += 1
        else:
            parts.append(f"{name}: {size} tensors")
            position += size
    return ", ".join(parts)


def _spec_of(plan: Plan, position: int) -> tuple[str, tuple[int, ...]]:
    spec = plan.inputs[position]
    return DTYPE_NAMES[spec.dtype], spec.shape


def _peak_place(plan: Plan) -> str:
    position = plan.memory.peak_op
    if position is None:
        return "before the first op"
    return f"at op {position} ({plan.ops[position].name})"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"

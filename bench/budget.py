"""Budget matching: run every method at the same MACs, so accuracy differences mean something.

Each method exposes one main knob (ToMe's ``r``, everyone else's ``keep_rate``). We solve it
by bisection on the analytic MACs — the count the tests hold within 2% of fvcore's — so the
solve takes microseconds and needs no forward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from bench.errors import BenchError
from bench.measure.flops import VitShape, analytic_macs
from methods import ModelInfo, TokenReducer
from methods.identity import NoReduction


@dataclass(frozen=True)
class BudgetSolution:
    reducer: TokenReducer
    knob: str
    value: float
    macs: int
    target_macs: int
    baseline_macs: int

    @property
    def ratio(self) -> float:
        return self.macs / self.baseline_macs


def _macs(reducer: TokenReducer, shape: VitShape, info: ModelInfo) -> int:
    reducer.bind(info)
    return analytic_macs(shape, reducer, info.num_patches)


def match_budget(
    reducer: TokenReducer,
    macs_ratio: float,
    shape: VitShape,
    info: ModelInfo,
    tolerance: float = 0.02,
    method: str = "",
) -> BudgetSolution:
    """Rebuild ``reducer`` with its knob set so its MACs are ``macs_ratio`` of the unreduced
    model's (within ``tolerance``), or say which ratios the method can reach."""
    name = method or type(reducer).__name__
    if not 0 < macs_ratio <= 1:
        raise BenchError(f"budget.macs_ratio must be in (0, 1], got {macs_ratio}")
    base = _macs(NoReduction(), shape, info)
    target = macs_ratio * base
    knob = reducer.budget_knob
    if knob is None:
        macs = _macs(reducer, shape, info)
        if abs(macs / target - 1) > tolerance:
            raise BenchError(
                f"method {name} has no budget knob and runs at macs_ratio {macs / base:.3f}, not {macs_ratio}"
            )
        return BudgetSolution(reducer, "", float("nan"), macs, int(target), base)
    lo, hi = reducer.budget_range

    def cost(value: float) -> tuple[TokenReducer, int]:
        # a trial knob's bind may warn (FATR: an ω file fitted at another keep_rate) at every step
        # of the search; the solved reducer says it once, when the caller applies it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = reducer.with_knob(value)
            return r, _macs(r, shape, info)

    # MACs fall as r grows (ToMe) and rise as keep_rate grows: find the direction first.
    (_, c_lo), (_, c_hi) = cost(lo), cost(hi)
    reach = (min(c_lo, c_hi) / base, max(c_lo, c_hi) / base)
    increasing = c_hi > c_lo
    a, b = lo, hi
    best = None
    for _ in range(60):
        mid = (a + b) / 2
        r, c = cost(mid)
        if best is None or abs(c - target) < abs(best[1] - target):
            best = (r, c, mid)
        if (c < target) == increasing:
            a = mid
        else:
            b = mid
    if abs(best[1] / target - 1) > tolerance:
        # MACs need not be monotone in the knob (pooling picks grid shapes): scan it finely.
        for i in range(401):
            value = lo + (hi - lo) * i / 400
            r, c = cost(value)
            if abs(c - target) < abs(best[1] - target):
                best = (r, c, value)
    r, c, value = best
    if abs(c / target - 1) > tolerance:
        where = (
            f"the closest it gets is macs_ratio {c / base:.3f} ({knob}={value:.4g})"
            if reach[0] <= macs_ratio <= reach[1]
            else f"it reaches macs_ratio {reach[0]:.3f}..{reach[1]:.3f} with {knob} in [{lo}, {hi}]"
        )
        raise BenchError(f"budget macs_ratio={macs_ratio} is impossible for method {name}: {where}")
    return BudgetSolution(r, knob, float(value), int(c), int(target), base)


def command_line_overrides() -> list[str]:
    """This job's overrides as typed (``method.reducer.keep_rate=0.5``); empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError, AttributeError):
        return []


def refuse_overridden_knob(
    reducer: TokenReducer, macs_ratio: float | None, method: str = "", overrides: list[str] | None = None
) -> None:
    """Refuse a knob set on the command line that the budget would replace: ``keep_rate=0.5`` at
    the default budget silently ran at the solved 0.6938, so the user measured another setting
    than the one asked for. ``overrides`` default to Hydra's for this job."""
    knob = reducer.budget_knob
    if macs_ratio is None or not knob:
        return
    key = f"method.reducer.{knob}"
    for entry in command_line_overrides() if overrides is None else overrides:
        name, _, value = entry.partition("=")
        if not entry.startswith("~") and name.lstrip("+") == key:
            raise BenchError(
                f"{key}={value} was set explicitly, but budget.macs_ratio={macs_ratio} would replace it with the "
                f"{knob} that meets that budget; add budget.macs_ratio=null to run {method or type(reducer).__name__} "
                f"at {knob}={value}, or drop {key} to solve it for the budget"
            )


def solve_budget(
    reducer: TokenReducer,
    macs_ratio: float | None,
    tolerance: float,
    model,
    method: str = "",
    overrides: list[str] | None = None,
) -> tuple[TokenReducer, dict]:
    """``reducer`` at the MACs budget (as configured when ``macs_ratio`` is None, and always for
    the unreduced model) and the fields the run store records about the budget. Shared by
    evaluation and fine-tuning, so a fine-tuned method runs at the knob it was trained with.
    ``overrides``: see :func:`refuse_overridden_knob`."""
    from methods.patch import model_info

    budget: dict = {"macs_ratio_target": macs_ratio}
    if isinstance(reducer, NoReduction):
        return reducer, budget
    refuse_overridden_knob(reducer, macs_ratio, method, overrides)
    if macs_ratio is None:
        if reducer.budget_knob:  # the method's own knob: shown so that its rows can be told apart
            budget.update(knob=reducer.budget_knob, knob_value=reducer.hparams.get(reducer.budget_knob))
        return reducer, budget
    sol = match_budget(reducer, float(macs_ratio), VitShape.of(model), model_info(model), float(tolerance), method)
    budget.update(knob=sol.knob, knob_value=sol.value, macs_ratio_analytic=sol.ratio)
    return sol.reducer, budget

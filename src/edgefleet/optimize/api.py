"""``optimize(...)``: the loop that prepares, builds, evaluates, times, falls back and selects.

Decisions live in pure modules (``candidates.prune``, ``evaluate.within_tolerance``, ``default_metric``,
``select``); this module does the I/O around them and keeps the time budget. The baseline of every comparison is the
user's model as given, loaded as the agent loads it: preparation (graph optimization, rewrites) can make a model
slower, so the prepared float model is one more candidate. The output is never slower nor out of tolerance: a
candidate is written only when it is within tolerance and two independent paired A/Bs against the input both call
it faster; otherwise the input is written unchanged, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import psutil

from edgefleet._fs import atomic_write
from edgefleet.bench.paired import time_paired
from edgefleet.bench.tiers import TierProfile, get_tier, host_isa_features
from edgefleet.config import RuntimeSettings
from edgefleet.data import CallData
from edgefleet.errors import DataError, EdgefleetError, ModelError
from edgefleet.optimize.calibration import (
    DEFAULT_CALIB_LIMIT,
    HISTOGRAM_COST,
    CalibrationCache,
    check_calib_limit,
    limit_calls,
)
from edgefleet.optimize.candidates import Recipe, recipe_space
from edgefleet.optimize.candidates import prune as prune_recipes
from edgefleet.optimize.costs import node_costs
from edgefleet.optimize.default_metric import default_metric, output_facts
from edgefleet.optimize.evaluate import (
    MetricSpec,
    MetricValues,
    baseline_values,
    call_feed,
    metric_values,
    within_tolerance,
)
from edgefleet.optimize.fallback import search
from edgefleet.optimize.metrics import resolve_metric
from edgefleet.optimize.mixed import keep_float, mixed_recipes, most_sensitive, with_mixed
from edgefleet.optimize.prepare import PreparedModel, compute_nodes, load_onnx, prepare
from edgefleet.optimize.quantize import QuantizeFailed, build_candidate, op_coverage
from edgefleet.optimize.report import CandidateReport, LatencyResult, OpCoverage, OptimizeReport
from edgefleet.optimize.select import (
    candidate_line,
    classify,
    far_out_of_tolerance,
    screen_indices,
    select,
    why_none,
)
from edgefleet.optimize.stateful import (
    StatePair,
    check_state_pairs,
    evaluate_calls,
    replay_states,
    resolve_state_pairs,
    stream_groups,
    with_initial_state,
)
from edgefleet.runtime.onnxruntime import OrtSession, runtime_version
from edgefleet.runtime.schema import validate_feeds

__all__ = ["CompareLatency", "Progress", "host_tier", "model_input_names", "optimize", "paired_ab"]

Progress = Callable[[str, float], None]  # (what is happening, fraction of the time budget spent)
# (input session, candidate session, one call's feed, seconds it may take) -> candidate vs input verdict.
CompareLatency = Callable[[OrtSession, OrtSession, dict[str, np.ndarray], float], LatencyResult]
# A fallback start is searched only when a short A/B (PROBE_S seconds) puts its median ratio below FASTER_BELOW,
# the bound a confirmed "faster" verdict needs (bench.stats.paired_compare's default threshold).
PROBE_S = 1.5
FASTER_BELOW = 0.97


def host_tier() -> TierProfile:
    """The default tier: this machine as it is (its ISA flags, all its cores)."""
    return TierProfile(
        name="host",
        arch=platform.machine() or "unknown",
        cpu_threads=os.cpu_count() or 1,
        memory_mb=max(1, psutil.virtual_memory().total // 2**20),
        runtime_version=runtime_version(),
        isa_features=host_isa_features(),
    )


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed


class _Run:
    """State of one optimization: the input's reference outputs, session settings and the candidates' bytes."""

    def __init__(
        self,
        prepared: PreparedModel,
        calib: CallData,
        eval_data: CallData,
        metric: MetricSpec,
        baseline: MetricValues,
        ref: np.ndarray,
        output: str,
        settings: RuntimeSettings,
        max_drop: float,
        max_slice_drop: float | None,
    ) -> None:
        self.prepared = prepared
        # recurrent state pairs: candidates run closed-loop, as the reference did (none: per call)
        self.state: tuple[StatePair, ...] = ()
        self.calib = calib
        # activation ranges computed once per calibration method, for every static recipe and fallback trial
        self.calibration = CalibrationCache(prepared, calib)
        self.eval = eval_data
        self.metric = metric
        self.baseline = baseline
        self.ref = ref
        self.output = output
        self.settings = settings
        self.max_drop = max_drop
        self.max_slice_drop = max_slice_drop
        # keyed by recipe, not name: two fallback trials excluding different nodes share a name ("excl1")
        self.bytes: dict[Recipe, bytes] = {}
        # screening (successive halving): these calls first; the rest only for a candidate not far out there
        self.screen: list[int] | None = None

    def evaluate(self, recipe: Recipe) -> CandidateReport:
        """Build and score one recipe (no latency yet)."""
        t0 = time.perf_counter()
        name = recipe.name
        try:
            data = build_candidate(self.prepared, recipe, self.calibration)
        except QuantizeFailed as err:
            return CandidateReport(name=name, recipe=recipe, status="failed", reason=str(err), time_s=_since(t0))
        cov = op_coverage(onnx.load_from_string(data))
        common = dict(
            name=name,
            recipe=recipe,
            size_bytes=len(data),
            op_coverage=OpCoverage(quantized=cov.quantized, float=cov.float),
            nodes_excluded=list(recipe.nodes_to_exclude),
        )
        if recipe.kind in ("dynamic", "static", "mixed") and not cov.quantized:
            reason = "the quantizer quantized no compute op (a successful quantization proves nothing)"
            return CandidateReport(status="no_op", reason=reason, time_s=_since(t0), **common)
        try:
            session = OrtSession(data, self.settings)
            screened = self._screen(session)
            if isinstance(screened, tuple):
                far, sub_values = screened
                assert self.screen is not None
                return CandidateReport(
                    status="out_of_tolerance",
                    reason=far,
                    metrics=sub_values,
                    within_tolerance=False,
                    eval_calls=len(self.screen),
                    time_s=_since(t0),
                    **common,
                )
            out = self._rest(session, screened)
        except EdgefleetError as err:
            return CandidateReport(status="failed", reason=str(err), time_s=_since(t0), **common)
        values = metric_values(self.metric, self.ref, out, self.eval)
        ok, why = within_tolerance(self.baseline, values, self.max_drop, self.max_slice_drop)
        if ok:
            self.bytes[recipe] = data
        return CandidateReport(
            eval_calls=len(self.eval),
            status="out_of_tolerance" if not ok else "qualified",  # provisional; classify() decides at the end
            reason="" if ok else why,
            metrics=values,
            within_tolerance=ok,
            time_s=_since(t0),
            **common,
        )

    def _screen(self, session: OrtSession) -> tuple[str, MetricValues] | np.ndarray | None:
        """Score the screening calls: why the candidate is far out of tolerance there and its scores (the other
        calls never run), else the screening calls' outputs (None: no screening)."""
        if self.screen is None:
            return None
        sub = self.eval.subset(self.screen)
        out = evaluate_calls(session, sub, self.output, self.state)
        values = metric_values(self.metric, self.ref[self.screen], out, sub)
        base = metric_values(self.metric, self.ref[self.screen], self.ref[self.screen], sub)
        far = far_out_of_tolerance(base.overall, values.overall, self.max_drop, len(self.screen), values.metric)
        return out if far is None else (far, values)

    def _rest(self, session: OrtSession, screened: np.ndarray | None) -> np.ndarray:
        """Every eval call's output; per-call evaluation reuses the screening calls' outputs, closed-loop runs
        every stream from its start again."""
        if screened is None or self.screen is None or self.state:
            return evaluate_calls(session, self.eval, self.output, self.state)
        rest = np.setdiff1d(np.arange(len(self.eval)), self.screen)
        out = np.empty((len(self.eval), *screened.shape[1:]), dtype=screened.dtype)
        out[self.screen] = screened
        out[rest] = evaluate_calls(session, self.eval.subset(rest), self.output, self.state)
        return out


def calibration_too_slow(recipe: Recipe, cache: CalibrationCache, left_s: float) -> str | None:
    """Why ``recipe`` is skipped: its calibration method's first pass is estimated to take longer than the
    ``left_s`` seconds the accuracy phase has left (a histogram pass on a large model can take minutes)."""
    statics = [recipe] if recipe.kind == "static" else [g.recipe for g in recipe.regions if g.recipe.kind == "static"]
    for method in {r.calibration for r in statics}:
        est = cache.estimate_s(method)
        if est is not None and est > left_s:
            return (
                f"time budget: {method} calibration estimated at {est:.0f} s ({HISTOGRAM_COST:.0f} x the "
                f"{cache.seconds.get('minmax', 0.0):.1f} s minmax pass), "
                f"more than the {max(left_s, 0):.0f} s left to evaluate"
            )
    return None


def _share(clock: _Clock, reserve: float, *, second_start: bool) -> Callable[[], float]:
    """The time a fallback search has left: all of what the budget leaves above ``reserve``, or — when another start
    waits — two thirds of it, so the next start is searched too (one start used to spend it all)."""
    share = (clock.left() - reserve) * (2 / 3 if second_start else 1.0)
    deadline = clock.elapsed + share
    return lambda: min(deadline - clock.elapsed, clock.left() - reserve)


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def _resolve_tier(tier: TierProfile | str | None) -> TierProfile:
    if tier is None:
        return host_tier()
    return tier if isinstance(tier, TierProfile) else get_tier(tier)


def _load(model: str | os.PathLike[str] | bytes) -> tuple[bytes, str]:
    if isinstance(model, bytes):
        return model, "<bytes>"
    p = Path(model)
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    return p.read_bytes(), str(p)


def model_input_names(path: str | os.PathLike[str]) -> list[str]:
    """The graph inputs a caller must feed (initializers listed as inputs excluded), checking it is ONNX."""
    from edgefleet.optimize.prepare import load_onnx

    data, source = _load(path)
    model = load_onnx(data, source)
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def _check_data(data: CallData, session: OrtSession, what: str) -> None:
    if len(data) == 0:
        raise DataError(f"the {what} data holds no calls")
    names = {s.name for s in session.inputs}
    extra = sorted(set(data.inputs) - names)
    if extra:
        raise DataError(f"the {what} data has array {extra[0]!r} that is not a model input; name it with --labels")
    try:
        validate_feeds(call_feed(data, 0, list(data.inputs)), session.inputs)
    except EdgefleetError as err:
        raise type(err)(f"{what} data: {err}")


def _primary_output(session: OrtSession) -> str:
    for spec in session.outputs:
        if spec.dtype.startswith("float"):
            return spec.name
    raise ModelError("the model has no floating-point output to evaluate (metrics read the first float output)")


def optimize(
    model: str | os.PathLike[str] | bytes,
    calib: CallData,
    eval: CallData,
    out: str | os.PathLike[str],
    *,
    metric: str | None = None,
    ctc_blank: int | None = None,
    ctc_trim: tuple[int, ...] | None = None,
    max_accuracy_drop: float = 0.01,
    max_slice_drop: float | None = None,
    tier: TierProfile | str | None = None,
    time_budget_s: float = 120.0,
    prune: bool = True,
    recipes: Sequence[Recipe] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    max_fallback_iterations: int = 12,
    latency_budget_s: float = 5.0,
    calib_limit: int = DEFAULT_CALIB_LIMIT,
    progress: Progress | None = None,
    compare_latency: CompareLatency | None = None,
    state: Sequence[str] | None = None,
) -> OptimizeReport:
    """Write the fastest model within ``max_accuracy_drop`` of ``model`` on ``eval`` to ``out`` and report why.

    Every candidate — the prepared float model included — is measured against ``model`` as given; when none is
    within tolerance *and* measured faster, ``out`` receives ``model``'s bytes unchanged. ``metric`` defaults to
    ``top1`` with labels, else ``agreement``, when the primary output has a class axis
    (:mod:`edgefleet.optimize.default_metric`); otherwise it must be given. ``recipes`` replaces the recipe space
    (the prepared float candidate is always added); ``prune=False`` turns the instruction-set rules off so only
    measurement refuses a candidate. ``compare_latency`` replaces the paired A/B (:func:`paired_ab`), e.g. to
    inject verdicts in tests. ``state`` (``["in=out", ...]``; default: the model's ``edgefleet.state`` metadata,
    ``[]``: none) names recurrent state pairs: then every model runs each stream of the data closed-loop, fed its
    own previous state (:mod:`edgefleet.optimize.stateful`). Raises a :class:`~edgefleet.errors.UsageError` /
    ``ModelError`` (exit 2) for bad input; a failing recipe is reported, never raised."""
    clock = _Clock(time_budget_s)
    note = progress or (lambda _what, _frac: None)
    ab = compare_latency or paired_ab
    if max_accuracy_drop < 0:
        raise DataError("--max-accuracy-drop must be >= 0")
    check_calib_limit(calib_limit)
    # user code imported (and a bad spec refused) before any model is loaded or built
    spec = None if metric is None else resolve_metric(metric, ctc_blank, ctc_trim)
    if metric == "top1" and eval.labels is None:
        raise DataError("metric top1 needs labels in the eval data: pass --labels KEY (or use a label-free metric)")
    tier_profile = _resolve_tier(tier)
    data, source = _load(model)
    graph = load_onnx(data, source)  # "not ONNX" is one clear line, before onnxruntime's own message
    out_path = Path(out)

    # The baseline: the model exactly as given, in a session set up as the agent's (the tier's intra-op threads).
    settings = RuntimeSettings(intra_op_threads=tier_profile.intra_op_threads)
    original = OrtSession(data, settings)
    state_pairs = resolve_state_pairs(state, graph)
    check_state_pairs(state_pairs, original.inputs, original.outputs)
    replay = any(i not in calib.inputs and i not in calib.extras for i, _ in state_pairs)
    calib = with_initial_state(calib, state_pairs, original.inputs)
    eval = with_initial_state(eval, state_pairs, original.inputs)
    _check_data(calib, original, "calibration")
    _check_data(eval, original, "eval")
    if replay:  # calibrate the state path on the states the model feeds itself, not on the zeros filled in
        calib = replay_states(original, calib, state_pairs)
    output = _primary_output(original)
    note("running the input model", clock.elapsed / time_budget_s)
    ref = evaluate_calls(original, eval, output, state_pairs)
    if metric is None:
        facts = output_facts(graph, output, tuple(int(d) for d in ref.shape[1:]))
        spec = resolve_metric(default_metric(facts, eval.labels is not None))
    assert spec is not None
    spec = spec.for_model(graph)  # ctc: the blank from the model's metadata unless given
    del graph  # the run keeps the prepared copy; a second proto of a large model would only hold memory

    note("preparing the model", clock.elapsed / time_budget_s)
    prepared = prepare(data, source)
    calib_used = limit_calls(calib, calib_limit)
    baseline = baseline_values(spec, ref, eval)
    run = _Run(prepared, calib_used, eval, spec, baseline, ref, output, settings, max_accuracy_drop, max_slice_drop)
    run.state = tuple(state_pairs)
    input_cand = CandidateReport(
        name="input",
        recipe=Recipe(kind="input"),
        status="baseline",
        reason="your model as given: every ratio and drop is measured against it",
        metrics=baseline,
        within_tolerance=True,
        size_bytes=len(data),
    )
    feed = call_feed(eval, 0, [s.name for s in original.inputs])

    # Screening (successive halving): every candidate is scored on a quarter of the calls first; one far out of
    # tolerance there never runs on the rest. Closed-loop: the first calls, so every stream still starts at its start.
    run.screen = screen_indices(len(eval), prefix=bool(state_pairs))

    def evaluate(r: Recipe) -> CandidateReport:
        c = run.evaluate(r)
        note(candidate_line(c, len(eval)), clock.elapsed / time_budget_s)
        return c

    # The prepared float model is a candidate like the others: preparation alone can make a model slower.
    float_cand = evaluate(Recipe(kind="float"))
    space = list(recipes) if recipes is not None else recipe_space(prepared.op_types, tier_profile)
    if recipes is None:
        nodes = [(n.name, n.op_type) for n in compute_nodes(prepared.model)]
        space = with_mixed(space, mixed_recipes(nodes, prepared.op_types))
    space = [r for r in space if r.kind not in ("input", "float")]
    kept, pruned = prune_recipes(space, tier_profile, prepared.op_types, rules=prune)
    cands: list[CandidateReport] = [float_cand]
    cands += [CandidateReport(name=p.recipe.name, recipe=p.recipe, status="pruned", reason=p.reason) for p in pruned]

    # Phase 1: accuracy of every recipe (cheap), using at most half the budget.
    for i, r in enumerate(kept):
        if clock.elapsed > time_budget_s * 0.5:
            cands.append(CandidateReport(name=r.name, recipe=r, status="skipped", reason="time budget"))
            continue
        too_slow = calibration_too_slow(r, run.calibration, time_budget_s * 0.5 - clock.elapsed)
        if too_slow:
            cands.append(CandidateReport(name=r.name, recipe=r, status="skipped", reason=too_slow))
            continue
        note(f"evaluating {r.name} ({i + 1}/{len(kept)})", clock.elapsed / time_budget_s)
        cands.append(evaluate(r))

    def measure(c: CandidateReport, share: int) -> None:
        budget = max(0.5, min(latency_budget_s, (clock.left() - latency_budget_s) / max(share, 1)))
        if clock.left() < 1.0:
            c.reason = "time budget ran out before its latency was measured"
            return
        note(f"timing {c.name} against your input model", clock.elapsed / time_budget_s)
        c.latency = ab(original, OrtSession(run.bytes[c.recipe], settings), feed, budget)
        note(candidate_line(c, len(eval)), clock.elapsed / time_budget_s)

    # Phase 2: paired latency of every candidate within tolerance.
    pending = [c for c in cands if c.within_tolerance]
    for k, c in enumerate(pending):
        measure(c, len(pending) - k)

    # Phase 3: keep searching while the budget lasts, also when something qualified already: an out-of-tolerance
    # candidate with its sensitive nodes kept in float may still beat the best so far (a search that stops at the
    # first passing candidate ships a slower model). Most promising start first; never the prepared float model
    # (no quantized node to keep in float). Nodes a fallback had to keep in float seed the mixed recipes: one
    # trial instead of a search of their own.
    fallback_reason = ""
    sensitive: list[str] = []
    reserve = latency_budget_s * 3  # the confirmation A/Bs still need time after the search
    starts = [c for c in cands if c.within_tolerance is False and c.recipe.kind != "float"]
    # Closest to tolerance first: the search ends when the budget does, and a candidate that lost a third of the
    # metric needs far more nodes in float (and keeps less of its speed) than one just over the line.
    starts.sort(key=lambda c: -(c.metrics.overall if c.metrics is not None else -np.inf))
    # Each float node's time: the search quantizes the heaviest first (profiled once, a second or two).
    costs = node_costs(prepared.data, feed, threads=settings.intra_op_threads) if starts else {}
    for k, start in enumerate(starts):
        if clock.left() <= reserve:
            fallback_reason = fallback_reason or "no time left in the budget for the fallback search"
            break
        if start.recipe.kind == "mixed" and sensitive:
            seeded = keep_float(start.recipe, sensitive)
            if seeded != start.recipe:
                trial = evaluate(seeded)
                trial.derived_from = start.name
                cands.append(trial)
                if trial.within_tolerance:
                    measure(trial, 1)
                    continue
        note(f"fallback: ranking nodes of {start.name}", clock.elapsed / time_budget_s)
        try:
            start_bytes = build_candidate(prepared, start.recipe, run.calibration)
        except QuantizeFailed:
            continue
        # Keeping nodes in float never makes a candidate faster than it is with all of them quantized: one not
        # measured faster than the input now is not worth a search (a short A/B, a fraction of the budget).
        probe = ab(original, OrtSession(start_bytes, settings), feed, min(latency_budget_s, PROBE_S))
        if probe.median_ratio is None or probe.median_ratio >= FASTER_BELOW:
            start.reason += f"; fallback: not searched, not faster with every node quantized ({probe.reason})"
            continue
        fb = search(
            prepared,
            start,
            start_bytes,
            evaluate,
            eval.subset(range(min(len(eval), 32))),
            max_iterations=max_fallback_iterations,
            time_left=_share(clock, reserve, second_start=k + 1 < len(starts)),
            build=lambda r: build_candidate(prepared, r, run.calibration),
            costs=costs,
        )
        fallback_reason = fallback_reason or fb.reason
        start.reason += f"; fallback: {fb.reason}"
        if fb.best is not None:
            best = fb.best
            best.sensitivity = fb.ranking
            best.derived_from = start.name
            if best.within_tolerance:
                measure(best, 1)
                sensitive = list(best.nodes_excluded) or most_sensitive(fb.ranking, 1)
            cands.append(best)

    def confirm_best() -> int | None:
        """The fastest qualified candidate that a second, independent A/B also calls faster (one A/B alone can be
        fooled by a burst of load on a shared machine); candidates that fail the second A/B stop qualifying."""
        idx = select(cands)
        while idx is not None:
            c = cands[idx]
            assert c.latency is not None
            note(f"confirming {c.name}", clock.elapsed / time_budget_s)
            again = ab(original, OrtSession(run.bytes[c.recipe], settings), feed, latency_budget_s)
            c.latency.confirmed = again.verdict == "faster"
            if c.latency.confirmed:
                return idx
            c.latency.reason += f"; confirmation run: {again.reason}"
            idx = select(cands)
        return None

    chosen_idx = confirm_best()

    for c in cands:
        c.status, why = classify(c)
        if c.status != "out_of_tolerance" or not c.reason:
            c.reason = why
    if chosen_idx is not None:
        chosen = cands[chosen_idx]
        out_bytes = run.bytes[chosen.recipe]
        lat = chosen.latency
        assert lat is not None and lat.median_ratio is not None
        reason = (
            f"{chosen.name}: within tolerance and faster than your input model "
            f"(median ratio {lat.median_ratio:.3f}, CI {_fmt(lat.ci_low)}–{_fmt(lat.ci_high)}, confirmed)"
        )
    else:
        chosen = input_cand
        out_bytes = data  # byte for byte: nothing measured faster, so nothing of ours touches the model
        reason = why_none(cands) + (f"; fallback: {fallback_reason}" if fallback_reason else "")
    chosen.status = "chosen"
    chosen.reason = reason

    atomic_write(out_path, out_bytes, mkdir=True)
    note("done", 1.0)
    report = OptimizeReport(
        model=source,
        model_sha256=hashlib.sha256(data).hexdigest(),
        output=str(out_path),
        output_sha256=hashlib.sha256(out_bytes).hexdigest(),
        tier=tier_profile.name,
        metric=spec.name,
        ctc_blank=spec.blank if spec.name == "ctc" else None,
        ctc_trim=list(spec.trim or ()) if spec.name == "ctc" else None,
        metric_sha256=spec.source_sha256,
        max_accuracy_drop=max_accuracy_drop,
        max_slice_drop=max_slice_drop,
        eval_calls=len(eval),
        calib_calls=len(calib_used),
        calib_calls_given=len(calib),
        calib_limit=calib_limit,
        evaluation="closed_loop" if state_pairs else "per_call",
        eval_streams=len(stream_groups(eval.streams, len(eval))) if state_pairs else None,
        state_pairs=[f"{i}={o}" for i, o in state_pairs],
        baseline_metrics=baseline.model_copy(update={"fidelity": None}),
        input_size_bytes=len(data),
        float_size_bytes=len(prepared.data),
        kept_input=chosen is input_cand,
        chosen=chosen,
        candidates=[input_cand, *cands],
        reason=reason,
        preparation=prepared.notes,
        runtime_version=runtime_version(),
        time_budget_s=time_budget_s,
        time_spent_s=round(clock.elapsed, 3),
    )
    if report_path is not None:
        atomic_write(Path(report_path), report.model_dump_json(indent=2).encode(), mkdir=True)
    return report


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def paired_ab(baseline: OrtSession, cand: OrtSession, feed: dict[str, np.ndarray], budget_s: float) -> LatencyResult:
    """The default :data:`CompareLatency`: per-call interleaved A/B of ``cand`` against ``baseline`` (the input),
    judged by :func:`edgefleet.bench.stats.paired_compare`."""
    bs, cs = baseline.session, cand.session
    paired = time_paired(
        lambda: bs.run(None, feed),
        lambda: cs.run(None, feed),
        warmup=20,
        min_pairs=300,
        check_every=100,
        time_budget_s=budget_s,
    )
    return LatencyResult.from_comparison(paired.comparison)

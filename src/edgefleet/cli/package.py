"""``edgefleet package`` and ``edgefleet inspect``: build a ``.efpkg`` and show what is inside one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import TypeAdapter, ValidationError
from rich.table import Table

from edgefleet.cli._output import cell, console, escape, print_json, wire
from edgefleet.data import CallData, load_calls
from edgefleet.errors import UsageError, validation_summary, yaml_error_message
from edgefleet.package import GoldenTolerance, Lineage, OpenedPackage, Requirements, build_package, open_package
from edgefleet.runtime import Step, TensorSpec


class _IOFile:
    """``--io io.yaml``: ``inputs``, ``outputs`` (tensor specs), ``preprocessing``, ``postprocessing`` (steps)."""

    def __init__(self, path: Path | None) -> None:
        self.inputs: list[TensorSpec] | None = None
        self.outputs: list[TensorSpec] | None = None
        self.preprocessing: list[Any] = []
        self.postprocessing: list[Any] = []
        if path is None:
            return
        if not path.is_file():
            raise UsageError(f"--io file {path} does not exist")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"--io file is not valid YAML: {yaml_error_message(str(path), err)}")
        if not isinstance(doc, dict):
            raise UsageError(f"--io file {path} must be a mapping with inputs/outputs/preprocessing/postprocessing")
        unknown = set(doc) - {"inputs", "outputs", "preprocessing", "postprocessing"}
        if unknown:
            raise UsageError(f"--io file {path}: unknown key(s) {', '.join(sorted(unknown))}")
        specs = TypeAdapter(list[TensorSpec])
        steps = TypeAdapter(list[Step])
        try:
            if "inputs" in doc:
                self.inputs = specs.validate_python(doc["inputs"])
            if "outputs" in doc:
                self.outputs = specs.validate_python(doc["outputs"])
            self.preprocessing = steps.validate_python(doc.get("preprocessing") or [])
            self.postprocessing = steps.validate_python(doc.get("postprocessing") or [])
        except ValidationError as err:
            raise UsageError(f"--io file {path} breaks the schema: {validation_summary(err)}")


def _json_file(path: Path | None, what: str) -> Any:
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UsageError(f"{what} file {path} is not valid JSON: {err}")


def _is_bench_report(doc: Any) -> bool:
    return isinstance(doc, dict) and "results" in doc and ("environment" in doc or "settings" in doc)


def _is_optimize_report(doc: Any) -> bool:
    return isinstance(doc, dict) and "chosen" in doc and "candidates" in doc


def _lineage_from_optimize(path: Path, model: Path, model_sha256: str) -> dict[str, Any]:
    """The lineage an optimize report vouches for: parent, recipe, quantized nodes, accuracy and its drop against
    the parent, and the tolerance — only when the report is about the very model being packaged."""
    from edgefleet.optimize.report import OptimizeReport

    doc = _json_file(path, "--optimize-report")
    if _is_bench_report(doc):
        raise UsageError(f"--optimize-report {path} is a bench report: pass it as --bench {path}")
    try:
        rep = OptimizeReport.model_validate(doc)
    except ValidationError as err:
        raise UsageError(
            f"--optimize-report {path} is not the REPORT.json of `edgefleet optimize --report` "
            f"({validation_summary(err)})"
        )
    if rep.output_sha256 != model_sha256:
        raise UsageError(
            f"--optimize-report {path} describes {rep.output} (sha256 {rep.output_sha256[:12]}…), not {model} "
            f"(sha256 {model_sha256[:12]}…): package the model that optimize wrote, or pass that model's report"
        )
    chosen = rep.chosen
    out: dict[str, Any] = {"recipe": chosen.recipe.model_dump(mode="json")}
    if rep.model_sha256 != model_sha256:  # optimize kept the input: the model is its own origin, not its child
        out["parent_sha256"] = rep.model_sha256
    if chosen.op_coverage is not None:
        out["quantized_ops"] = list(chosen.op_coverage.quantized)
    if chosen.metrics is not None:
        base, got = rep.baseline_metrics, chosen.metrics
        common = [k for k in got.per_slice if k in base.per_slice]
        out["accuracy"] = {
            "metric": rep.metric,
            "parent": base.overall,
            "value": got.overall,
            # rounded so a float subtraction's last bits never show up as a "drop"
            "drop": round(base.overall - got.overall, 9),
            "slice_drops": {k: round(base.per_slice[k] - got.per_slice[k], 9) for k in common},
            "max_drop": rep.max_accuracy_drop,
            "max_slice_drop": rep.max_slice_drop,
        }
    return out


def _metrics_from_bench(path: Path, model: Path, model_sha256: str) -> dict[str, Any]:
    """Per-tier figures of the bench results for this model (a bench report may hold other models too)."""
    from edgefleet.bench.report import load_report

    doc = _json_file(path, "--bench")
    if _is_optimize_report(doc):
        raise UsageError(f"--bench {path} is an optimize report: pass it as --optimize-report {path}")
    report = load_report(path)
    mine = [r for r in report.results if r.model_sha256 == model_sha256]
    if not mine:
        measured = ", ".join(sorted({f"{r.model} ({r.model_sha256[:12]}…)" for r in report.results})) or "nothing"
        raise UsageError(
            f"--bench {path} has no result for {model} (sha256 {model_sha256[:12]}…); it measured {measured}: "
            "bench the model you package"
        )
    ok = [r for r in mine if r.status == "ok"]
    if not ok:
        raise UsageError(f"--bench {path}: every result for {model} failed ({mine[0].error}); fix the bench first")
    metrics: dict[str, dict[str, float]] = {}

    def put(key: str, tier: str, value: float | None) -> None:
        if value is not None:
            metrics.setdefault(key, {})[tier] = round(value, 4)

    for r in ok:
        for q, key in ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"), (0.99, "latency_p99_ms")):
            quantile = r.latency.quantile(q) if r.latency is not None else None
            put(key, r.tier, quantile.value_ms if quantile is not None else None)
        put("cold_start_ms", r.tier, r.cold_start_ms)
        put("peak_rss_mb", r.tier, r.peak_rss_mb)
        rates = [t.inferences_per_s for t in r.throughput if t.inferences_per_s is not None]
        put("throughput_per_s", r.tier, max(rates) if rates else None)
    return metrics


def _calls(path: Path | None, names: list[str]) -> CallData | None:
    return None if path is None else load_calls(path, input_names=names)


def _input_names(model: Path, io: _IOFile) -> list[str]:
    if io.inputs is not None:
        return [s.name for s in io.inputs]
    from edgefleet.runtime import load_model

    return load_model(model).input_names


def package_command(
    model: Path = typer.Argument(
        ..., help="the model to package: .onnx, .tflite, or an OpenVINO IR .xml (its .bin beside it)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="the .efpkg to write"),
    name: str = typer.Option(..., "--name", help="package name (lower-case letters, digits, . _ -)"),
    version: str = typer.Option(..., "--version", help="semantic version, e.g. 1.2.0"),
    samples: Path | None = typer.Option(
        None, "--samples", help="per-call .npz of raw inputs for the golden vectors (default: random inputs)"
    ),
    reference: Path | None = typer.Option(None, "--reference", help="per-call .npz of reference data for drift"),
    io: Path | None = typer.Option(
        None, "--io", help="YAML with inputs/outputs/pre-/postprocessing (default: derived from the graph)"
    ),
    tier: list[str] = typer.Option([], "--tier", help="allowed device tier; repeat (default: any)"),
    min_memory_mb: int | None = typer.Option(None, "--min-memory-mb", min=1),
    min_runtime_version: str | None = typer.Option(None, "--min-runtime-version", help="e.g. 1.17.0"),
    provider: list[str] = typer.Option(
        [], "--provider", help="onnxruntime execution provider, in order of preference; repeat (default: CPU)"
    ),
    runtime: str | None = typer.Option(
        None, "--runtime", help="onnxruntime, litert or openvino (default: the model format's own)"
    ),
    encrypt_for: list[str] = typer.Option(
        [], "--encrypt-for", help="X25519 public key (hex) or a .pub file to encrypt for; repeat"
    ),
    encrypt_for_group: str | None = typer.Option(
        None, "--encrypt-for-group", help="encrypt for every active device of this group (keys from --server)"
    ),
    encrypt_for_tier: str | None = typer.Option(
        None,
        "--encrypt-for-tier",
        help="encrypt for every active device of this tier (keys from --server); with --encrypt-for-group: both",
    ),
    server: str | None = typer.Option(
        None,
        "--server",
        envvar="EDGEFLEET_SERVER",
        help="control plane URL the device keys come from (default: http://127.0.0.1:8700)",
    ),
    api_token: str | None = typer.Option(
        None, "--api-token", envvar="EDGEFLEET_API_TOKEN", help="operator API token (viewer is enough)"
    ),
    optimize_report: Path | None = typer.Option(
        None,
        "--optimize-report",
        help="REPORT.json of `edgefleet optimize`: parent, recipe, quantized nodes, accuracy drop, tolerance",
    ),
    bench: Path | None = typer.Option(
        None, "--bench", help="BENCH.json of `edgefleet bench`: per-tier p50/p95/p99, cold start, peak RSS"
    ),
    lineage_json: Path | None = typer.Option(
        None, "--lineage-json", help="JSON: parent_sha256, recipe, ... (wins over --optimize-report)"
    ),
    metrics_json: Path | None = typer.Option(None, "--metrics-json", help="JSON object of metrics (wins over --bench)"),
    rtol: float = typer.Option(1e-4, "--rtol", min=0.0, help="golden relative tolerance"),
    atol: float = typer.Option(1e-5, "--atol", min=0.0, help="golden absolute tolerance"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Build a model package: manifest, model (optionally encrypted), golden vectors, drift reference, ML-BOM."""
    if not model.is_file():
        raise UsageError(f"model file {model} does not exist")
    fleet_keys = _fleet_keys(server, api_token, encrypt_for_group, encrypt_for_tier)
    iof = _IOFile(io)
    names = _input_names(model, iof)
    lineage_doc = _json_file(lineage_json, "--lineage-json")
    if _is_optimize_report(lineage_doc):
        raise UsageError(f"--lineage-json {lineage_json} is an optimize report: pass it as --optimize-report")
    if lineage_doc is not None and not isinstance(lineage_doc, dict):
        raise UsageError(f"--lineage-json {lineage_json} must hold a JSON object")
    metrics = _json_file(metrics_json, "--metrics-json")
    if _is_bench_report(metrics):
        raise UsageError(
            f"--metrics-json {metrics_json} is a whole bench report: pass it as --bench {metrics_json}, which puts "
            "the packaged model's per-tier latency, cold start and memory in the metrics"
        )
    if metrics is not None and not isinstance(metrics, dict):
        raise UsageError(f"--metrics-json {metrics_json} must hold a JSON object")
    if optimize_report is not None or bench is not None:
        model_sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
        if optimize_report is not None:
            lineage_doc = {**_lineage_from_optimize(optimize_report, model, model_sha256), **(lineage_doc or {})}
        if bench is not None:
            metrics = {**_metrics_from_bench(bench, model, model_sha256), **(metrics or {})}
    try:
        lineage = Lineage.model_validate(lineage_doc) if lineage_doc is not None else None
        req_fields: dict[str, Any] = {"tiers": list(tier), "min_memory_mb": min_memory_mb}
        if min_runtime_version:
            req_fields["min_runtime_version"] = min_runtime_version
        if provider:
            req_fields["execution_providers"] = list(provider)
        if runtime:
            req_fields["runtime"] = runtime
        requirements = Requirements(**req_fields)
    except ValidationError as err:
        raise UsageError(f"invalid option: {validation_summary(err)}")
    path = build_package(
        model,
        out,
        name=name,
        version=version,
        sample_inputs=_calls(samples, names),
        reference_data=_calls(reference, names),
        inputs=iof.inputs,
        outputs=iof.outputs,
        preprocessing=iof.preprocessing,
        postprocessing=iof.postprocessing,
        requirements=requirements,
        lineage=lineage,
        metrics=metrics,
        golden=GoldenTolerance(rtol=rtol, atol=atol),
        recipients=[*encrypt_for, *(k["public_key"] for k in fleet_keys)] or None,
    )
    opened = open_package(path)
    if as_json:
        doc: dict[str, Any] = {"path": str(path), "package_sha256": opened.package_sha256, "manifest": opened.manifest}
        if encrypt_for_group is not None or encrypt_for_tier is not None:
            doc["encrypted_for_devices"] = [{"device_id": k["device_id"], "key_id": k["key_id"]} for k in fleet_keys]
        print_json(doc)
        return
    console.print(_table(opened))
    if encrypt_for_group is not None or encrypt_for_tier is not None:
        ids = ", ".join(k["device_id"] for k in fleet_keys)
        console.print(
            f"encrypted for {len(fleet_keys)} device(s) of {_fleet_scope(encrypt_for_group, encrypt_for_tier)}: {ids}",
            markup=False,
        )
    console.print(f"wrote [bold]{escape(str(path))}[/]")


def _fleet_scope(group: str | None, tier: str | None) -> str:
    return " and ".join(f"{what} {v}" for what, v in (("group", group), ("tier", tier)) if v is not None)


def _fleet_keys(server: str | None, token: str | None, group: str | None, tier: str | None) -> list[dict[str, Any]]:
    """The current public keys of the active devices of ``group`` and/or ``tier``, from the control plane; none
    asked for: ``[]``. A scope with no such device is refused: a package nobody can open is a mistake."""
    if group is None and tier is None:
        return []
    from edgefleet.cli.connection import client

    with client(server, token) as c:
        rows = wire(c.devices.keys(tier=tier, group=group))
    params = {k: v for k, v in (("group", group), ("tier", tier)) if v is not None}
    scope = _fleet_scope(group, tier)
    if not rows:
        raise UsageError(
            f"{scope} has no enrolled, active device on {c.server}: nothing to encrypt for "
            f"(`edgefleet devices keys{''.join(f' --{k} {v}' for k, v in params.items())}` lists them)"
        )
    return [dict(r) for r in rows]


def _table(p: OpenedPackage) -> Table:
    m = p.manifest
    t = Table(title=escape(f"{m.name} {m.version}"), title_justify="left", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    t.add_row("package", cell(str(p.path)))
    t.add_row("package sha256", cell(p.package_sha256))
    t.add_row("target name", cell(m.target_name))
    t.add_row("created", cell(m.created.isoformat()))
    t.add_row("model sha256", cell(m.model_sha256))
    t.add_row("model size", cell(f"{m.model_size:,} bytes"))
    t.add_row("inputs", cell("\n".join(s.signature() for s in m.io.inputs)))
    t.add_row("outputs", cell("\n".join(s.signature() for s in m.io.outputs)))
    if m.preprocessing:
        t.add_row("preprocessing", cell(", ".join(s.op for s in m.preprocessing)))
    if m.postprocessing:
        t.add_row("postprocessing", cell(", ".join(s.op for s in m.postprocessing)))
    r = m.requirements
    req = [f"{r.runtime} >= {r.min_runtime_version}" if r.min_runtime_version else r.runtime]
    if r.opset is not None:
        req.append(f"opset {r.opset}")
    if r.runtime == "onnxruntime":  # the others run on the CPU: no execution providers to prefer
        req.append("providers " + ", ".join(r.execution_providers))
    else:
        req.append(f"model format {m.model_format}")
    if r.min_memory_mb:
        req.append(f"memory >= {r.min_memory_mb} MB")
    req.append("tiers " + (", ".join(r.tiers) if r.tiers else "any"))
    t.add_row("requirements", cell("\n".join(req)))
    t.add_row("golden", cell(f"{len(p.golden_inputs)} calls, rtol {m.golden.rtol:g}, atol {m.golden.atol:g}"))
    t.add_row("drift reference", cell(f"{len(p.reference.features)} features" if p.reference else "none"))
    enc = m.encryption
    t.add_row("encryption", cell(f"{enc.algorithm} for key(s) {', '.join(enc.key_ids)}" if enc else "none"))
    lin = m.lineage
    if lin.parent_sha256 or lin.recipe or lin.calibration_sha256 or lin.accuracy or lin.quantized_ops is not None:
        parts = []
        if lin.parent_sha256:
            parts.append(f"parent {lin.parent_sha256[:16]}…")
        if lin.recipe:
            parts.append(f"recipe {json.dumps(lin.recipe, sort_keys=True)}")
        if lin.calibration_sha256:
            parts.append(f"calibration {lin.calibration_sha256[:16]}…")
        if lin.quantized_ops is not None:
            parts.append(f"{len(lin.quantized_ops)} quantized node(s)")
        if lin.accuracy is not None:
            a = lin.accuracy
            tol = f", tolerance {a.max_drop:g}" if a.max_drop is not None else ""
            parts.append(f"{a.metric} {a.value:.4f} (parent {a.parent:.4f}, drop {a.drop:+.4f}{tol})")
        t.add_row("lineage", cell("\n".join(parts)))
    if m.metrics:
        t.add_row("metrics", cell("\n".join(f"{k}: {json.dumps(v)}" for k, v in sorted(m.metrics.items()))))
    t.add_row("members", cell("\n".join(f"{k} ({v:,} bytes)" for k, v in p.members.items())))
    return t


def inspect_command(
    package: Path = typer.Argument(..., help="the .efpkg to inspect"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
    device_key: Path | None = typer.Option(None, "--device-key", help="device private key (encrypted packages)"),
    verify: bool = typer.Option(False, "--verify", help="also run the golden vectors"),
) -> None:
    """Show a package's manifest; ``--verify`` also checks that the model reproduces its golden vectors."""
    opened = open_package(package, device_key=device_key)
    if verify:
        opened.verify_golden()
    if as_json:
        print_json(opened.manifest)
        return
    console.print(_table(opened))
    if verify:
        console.print(f"[green]golden vectors reproduce[/] ({len(opened.golden_inputs)} calls)")


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("package")(package_command)
    app.command("inspect")(inspect_command)

"""``edgefleet optimize``: quantize a model only as far as accuracy and latency measured against it allow."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from edgefleet._fs import atomic_write
from edgefleet.cli._output import console, err_console, escape, print_json, progress, report_error
from edgefleet.data import STREAMS_KEY, load_calls
from edgefleet.errors import EdgefleetError


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.command("optimize")(optimize_cmd)


def optimize_cmd(
    model: Path = typer.Argument(..., help="The float ONNX model."),
    calib: Path = typer.Option(..., "--calib", help="Per-call .npz for calibration (one array per model input)."),
    eval_path: Path = typer.Option(..., "--eval", help="Per-call .npz to evaluate on (inputs, optional labels)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the chosen model (written atomically)."),
    report: Path | None = typer.Option(None, "--report", help="Write the JSON report here."),
    labels: str | None = typer.Option(None, "--labels", help="Key of the labels array in the eval .npz."),
    slices: str | None = typer.Option(None, "--slices", help="Key of a slice-id array in the eval .npz."),
    metric: str | None = typer.Option(
        None,
        "--metric",
        help="top1 | agreement | cosine | cosine-min | sqnr | ctc | module:function | path/to/file.py:function "
        "(default: top1 with labels, else agreement, when the output has a class axis; required for embeddings and "
        "other feature outputs; ctc for CTC sequence outputs). See docs/optimize.md, Metrics.",
    ),
    ctc_blank: int | None = typer.Option(
        None, "--ctc-blank", help="Blank index for --metric ctc (default: the model's ctc_blank metadata, else 0)."
    ),
    ctc_trim: str | None = typer.Option(
        None,
        "--ctc-trim",
        metavar="N[,M]",
        help="Classes --metric ctc strips from either end of each decoded line before comparing, as the text is "
        "stripped (a recognizer's space) (default: the model's ctc_trim metadata, else none).",
    ),
    max_accuracy_drop: float = typer.Option(0.01, "--max-accuracy-drop", help="Largest allowed metric drop."),
    max_slice_drop: float | None = typer.Option(
        None, "--max-slice-drop", help="Largest allowed drop in any slice (default: slices reported, not enforced)."
    ),
    tier: str | None = typer.Option(None, "--tier", help="Tier name or YAML file (default: this host)."),
    time_budget: float = typer.Option(120.0, "--time-budget", help="Seconds the search may take."),
    calib_limit: int = typer.Option(
        128,  # edgefleet.optimize.calibration.DEFAULT_CALIB_LIMIT (not imported: it loads onnxruntime)
        "--calib-limit",
        help="Most calibration calls used; a larger CALIB is sampled evenly, first and last call included.",
    ),
    no_prune: bool = typer.Option(False, "--no-prune", help="Measure even recipes known to be slow on the tier."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    state: list[str] | None = typer.Option(
        None,
        "--state",
        help="INPUT=OUTPUT: a recurrent state input and the output feeding it on the next call (repeatable; default: "
        "the model's edgefleet.state metadata). Streams (the data's 'streams' array) are then evaluated closed-loop.",
    ),
) -> None:
    """Write the fastest candidate (graph-optimized float, FP16, dynamic or static INT8, with sensitive nodes kept
    in float) that stays within --max-accuracy-drop on EVAL and that a paired A/B calls faster than MODEL as given;
    else MODEL itself, byte for byte. The .npz files hold one array per model input whose first axis indexes calls."""
    try:
        _run(
            model, calib, eval_path, out, report, labels, slices, metric, ctc_blank, max_accuracy_drop,
            max_slice_drop, tier, time_budget, no_prune, as_json, state or None, calib_limit=calib_limit,
            ctc_trim=ctc_trim,
        )  # fmt: skip
    except EdgefleetError as err:
        # main.run() does this too; catching here keeps the one-line error when the app is invoked directly.
        report_error(str(err), err.exit_code, as_json)
        raise typer.Exit(err.exit_code)


def _run(
    model: Path,
    calib: Path,
    eval_path: Path,
    out: Path,
    report: Path | None,
    labels: str | None,
    slices: str | None,
    metric: str | None,
    ctc_blank: int | None,
    max_accuracy_drop: float,
    max_slice_drop: float | None,
    tier: str | None,
    time_budget: float,
    no_prune: bool,
    as_json: bool,
    state: list[str] | None = None,
    calib_limit: int = 128,
    ctc_trim: str | None = None,
) -> None:
    from edgefleet.bench.env import describe_host, emulation_of, fingerprint
    from edgefleet.bench.tiers import get_tier
    from edgefleet.optimize.api import host_tier, model_input_names, optimize
    from edgefleet.optimize.metrics import parse_trim
    from edgefleet.optimize.report import table, with_host
    from edgefleet.optimize.select import CandidateLine
    from edgefleet.optimize.stateful import model_state_pairs

    profile = host_tier() if tier is None else get_tier(tier)
    env = fingerprint()
    because = emulation_of(env, profile)
    if because:
        # said before the minutes of measuring, not after: the ratios will be this host's, not the tier's
        err_console.print(
            f"[yellow]warning:[/] {escape(f'tier {profile.name} is emulated on {describe_host(env)} ({because})')}; "
            "latency ratios are this host's"
        )
    names = model_input_names(model)
    # state arrays are optional: without them each stream's first call starts from zeros
    stateless = [n for n in names if n not in {i for i, _ in model_state_pairs(model, state)}]
    calib_data = load_calls(calib, input_names=stateless, streams_key=STREAMS_KEY)
    eval_data = load_calls(
        eval_path, input_names=stateless, labels_key=labels, slices_key=slices, streams_key=STREAMS_KEY
    )
    out_console = err_console if as_json else console

    def report_progress(what: str, frac: float) -> None:
        if isinstance(what, CandidateLine):  # every candidate's outcome stays on screen, terminal or not
            out_console.print(Text(what), soft_wrap=True)
            if not out_console.is_terminal:
                return  # a log would get the same line twice: once more as the step in progress
        update(what, min(frac, 1.0))

    with progress("optimizing", total=1.0, to=out_console) as update:
        result = optimize(
            model,
            calib_data,
            eval_data,
            out,
            metric=metric,
            ctc_blank=ctc_blank,
            ctc_trim=None if ctc_trim is None else parse_trim(ctc_trim),
            max_accuracy_drop=max_accuracy_drop,
            max_slice_drop=max_slice_drop,
            tier=profile,
            time_budget_s=time_budget,
            prune=not no_prune,
            report_path=report,
            progress=report_progress,
            state=state,
            calib_limit=calib_limit,
        )
    if result.host is None:
        result = with_host(result, profile, env)
        if report is not None:
            atomic_write(report, result.model_dump_json(indent=2).encode())
    if as_json:
        print_json(result)
        return
    console.print(table(result))
    if result.emulated:
        arch = result.host.arch if result.host else "?"
        console.print(f"[yellow]emulated on {escape(arch)}[/]: {escape(result.emulated_because)}")
    took = f"{result.time_spent_s:.1f} s"
    if result.kept_input:
        console.print(f"[bold]input[/] → {escape(f'{result.output}, byte for byte  ({result.reason}; {took})')}")
    else:
        chosen = escape(result.chosen.name)
        console.print(f"[bold]{chosen}[/] → {escape(f'{result.output}  ({result.reason}; {took})')}")

"""The small option sweep that chose the GTO defaults.

    python -m eagle_gto.gto sweep --grid lr=1e-4,3e-4 omega=1,4 [training options]

One GTO run per grid point (plus, with --control, one L_token-only run per
combination of the gridded options the control reads, that is all but
trainer.GTO_OPTIONS), each scored by the validation slice (trees at 60/7/10
on held-out training-split text, see trainer.Validator), never by the
evaluation prompts of `experiment`. The base is loaded once, so its options
(trainer.BASE_OPTIONS) cannot vary; nor can the options that change the
validation windows (trainer.VALIDATION_OPTIONS), so every point is scored on
the same text; points that vary the other data options (trainer.STREAM_OPTIONS:
seed, generated) get their own training data. Every point is checked before the
first trains; a rerun of an interrupted sweep resumes after its finished points.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ..train.errors import TrainingDiverged
from ..train.outputs import check_new_out
from .experiment import differences
from .trainer import (BASE_OPTIONS, GTO_OPTIONS, RUN_OUTPUTS, STREAM_OPTIONS, VALIDATION_OPTIONS, GTOConfig, check_data,
                      load_models, load_streams, train)


def grid_value(text: str, default):
    """One --grid value, of the type of the option's default (bool("False") is True, so booleans are parsed)."""
    if isinstance(default, bool):
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise ValueError(f"expected true, false, 1 or 0, got {text!r}")
    return text if default is None else type(default)(text)


def point_name(point: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in point.items())


def point_names(points: list[dict]) -> list[str]:
    """Each point's folder name; two points with one name (e.g. lr=1e-4,0.0001) would share a folder."""
    names = [point_name(point) for point in points]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"--grid gives several points the same settings ({', '.join(twice)}): list each value once")
    return names


def parse_grid(items: list[str], options: dict) -> dict[str, list]:
    """--grid NAME=V1,V2 ... as {option: values}. The base is loaded once, so its options cannot vary; neither can
    the options that change the validation windows, since points are ranked by their validation tau."""
    grid = {}
    for item in items:
        name, _, values = item.partition("=")
        name = name.replace("-", "_")
        if name not in options or not values:
            raise ValueError(f"--grid {item!r}: expected OPTION=V1,V2 with a GTOConfig option")
        if name in BASE_OPTIONS:
            raise ValueError(f"--grid {item!r}: the base model is loaded once for the whole sweep, so "
                             f"{', '.join(BASE_OPTIONS)} cannot vary (every other option can): run one sweep "
                             "per base model")
        if name in VALIDATION_OPTIONS:
            raise ValueError(f"--grid {item!r}: {', '.join(VALIDATION_OPTIONS)} change the validation windows, so "
                             "points would be ranked on different text: run one sweep per value")
        try:
            grid[name] = [grid_value(v, options[name]) for v in values.split(",")]
        except ValueError as err:
            raise ValueError(f"--grid {item!r}: {err}") from None
    return grid


def control_points(grid: dict[str, list]) -> list[dict]:
    """One L_token-only run per combination of the gridded options the control reads (not GTO_OPTIONS): each
    GTO point is compared with the control that trained exactly like it, less L_GTO."""
    if "objective" in grid:
        raise ValueError("--control adds the token-only runs itself: do not grid objective as well")
    shared = {name: values for name, values in grid.items() if name not in GTO_OPTIONS}
    return [{"objective": "token", **dict(zip(shared, values))} for values in itertools.product(*shared.values())]


def control_of(cfg: GTOConfig) -> tuple:
    """What a run shares with its control: every option the control reads."""
    return tuple((name, value) for name, value in cfg.recorded_options().items()
                 if name not in GTO_OPTIONS and name != "out")


def finished(cfg: GTOConfig) -> dict | None:
    """The summary of a point an interrupted sweep finished with these very options (rerunning the command
    resumes), or None when it is still to train (also when it started and stopped with them); a folder that
    holds a run with other options is refused."""
    out = Path(cfg.out)
    config = out / "config.json"
    options = json.loads(json.dumps(cfg.recorded_options()))
    if config.is_file():
        # (differences: an option added since, absent from the file, matches its default None)
        changed = differences(json.loads(config.read_text()), options)
        if changed:  # named: a default that changed since (--dtype auto on a GPU) is not the user's doing
            raise ValueError(f"{out} holds a run with other options ({'; '.join(changed)}): rerun the sweep with "
                             "them, or choose another --out")
        summary = out / "summary.json"
        return json.loads(summary.read_text()) if summary.is_file() else None
    check_new_out(cfg.out, RUN_OUTPUTS)
    return None


SWEEP_OUTPUTS = ("sweep.json", "sweep.md")


def main(argv: list[str] | None = None) -> None:
    from .__main__ import checkpoint_options, config_from, config_parser, input_errors

    parser = config_parser("Small grid over GTO options, scored on the validation slice.", " sweep",
                           out_help="output folder: a folder per grid point (its head/, metrics, summary.json), "
                                    "sweep.json, sweep.md")
    checkpoint_options(parser, refused="sweep keeps no checkpoints: it keeps each finished point's result, so "
                       "rerunning the same command resumes after the last finished point")
    parser.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                        help="option values to combine, e.g. lr=1e-4,3e-4 omega=1,4")
    parser.add_argument("--control", action="store_true", help="also an L_token-only run per combination of the "
                        "gridded options it reads (all but the GTO-specific ones)")
    parser.set_defaults(out="runs/gto-sweep", eval_every=0)
    args = parser.parse_args(argv)
    # Every point is checked before the first trains: options, folders, data files, heads, data sizes.
    with input_errors(" sweep"):
        options = config_from(args).recorded_options()
        out = Path(options.pop("out"))
        check_new_out(out, SWEEP_OUTPUTS)  # a finished sweep: its table would be replaced
        grid = parse_grid(args.grid, options)
        points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        points += control_points(grid) if args.control else []
        configs = [GTOConfig(**{**options, **point, "out": str(out / name)})
                   for point, name in zip(points, point_names(points))]
        done = [finished(cfg) for cfg in configs]
        for cfg in {cfg.data: cfg for cfg in configs}.values():
            check_data(cfg)
        models = load_models(GTOConfig(**options))
        streams = {}
        for cfg, summary in zip(configs, done):
            if summary is None:
                load_models(cfg, models)  # each point's heads: top_k against their vocabulary, the reference
                data = tuple(getattr(cfg, name) for name in STREAM_OPTIONS)
                if data not in streams:  # also checks that there is data enough for the windows
                    streams[data] = load_streams(cfg, models)
    rows = []
    for point, cfg, summary in zip(points, configs, done):
        if summary is None:
            data = tuple(getattr(cfg, name) for name in STREAM_OPTIONS)
            try:
                summary = train(cfg, load_models(cfg, models), streams[data])
            except TrainingDiverged:  # (e.g. a too high lr of the grid) a row of its own; the other points go on
                summary = finished(cfg)
        rows.append({**point, **summary})
        print(Path(cfg.out).name, summary, flush=True)
    if args.control:
        control = {control_of(cfg): row for cfg, row in zip(configs, rows) if cfg.objective == "token"}
        for cfg, row in zip(configs, rows):
            versus = control[control_of(cfg)]
            row["control_val_tau_end"] = versus.get("val_tau_end", _diverged(versus))
    lines = sweep_table(rows, grid, options)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"training": options, "rows": rows}, indent=2) + "\n")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def sweep_table(rows: list[dict], grid: dict, options: dict) -> list[str]:
    """One line a point: its gridded options, validation tau (and, with --control, its control's tau at the end)."""
    keys = list(dict.fromkeys(k for row in rows for k in row if k in grid or k == "objective"))
    versus = "control_val_tau_end" in rows[0]
    lines = ["| " + " | ".join(keys) + " | val tau start | val tau end | val reward end |"
             + (" control val tau end |" if versus else ""),
             "|" + "---|" * (len(keys) + 3 + versus)]
    for row in rows:
        numbers = [row.get(k, _diverged(row)) for k in ("val_tau_start", "val_tau_end", "val_reward_end")]
        numbers += [row["control_val_tau_end"]] if versus else []
        lines.append("| " + " | ".join(str(row.get(k, options.get(k))) for k in keys) + " | "
                     + " | ".join(n if isinstance(n, str) else f"{n:.3f}" for n in numbers) + " |")
    return lines


def _diverged(row: dict) -> str:
    """What a run that diverged (train() stopped it; its summary has no end values) shows instead."""
    return f"diverged after step {row.get('steps')}"

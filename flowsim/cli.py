"""The command line: ``flowsim run | info | plot | compare | laws | sweep``.

Exit status: 0 done, 2 bad input (one line naming the field), 3 the run diverged,
130 interrupted (Ctrl-C: the run is saved and checkpointed; ``flowsim run --resume`` goes on).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .status import Status

    overrides = {"out": args.out, "overwrite": args.overwrite or None}
    if args.no_progress:
        overrides["progress"] = False
    config = load_config(args.config, **overrides)
    ds = config.simulate(resume=args.resume, throw=False)  # the status line below says how it ended
    status = ds.attrs["status"]
    print(
        f"{status}: {ds.sizes['time']} save points" + (f", t = {float(ds.time[-1]):g}" if ds.sizes["time"] else "")
        + (f" ({ds.attrs['status_message']})" if ds.attrs["status_message"] else "")
    )
    return EXIT_DIVERGED if status == Status.DIVERGED else 0


def _info(args: argparse.Namespace) -> int:
    from .record import open_record

    ds = open_record(args.run)
    dynamics = json.loads(ds.attrs.get("dynamics", "{}"))
    integrator = json.loads(ds.attrs.get("integrator", "{}"))
    print(f"run         {args.run}")
    print(f"dynamics    {', '.join(f'{k}={v}' for k, v in dynamics.items())}")
    print(f"integrator  {', '.join(f'{k}={v}' for k, v in integrator.items())}")
    print(f"status      {ds.attrs.get('status')}" + (f": {ds.attrs['status_message']}" if ds.attrs.get("status_message") else ""))
    if ds.sizes.get("time", 0):
        print(
            f"time        {float(ds.time[0]):g} … {float(ds.time[-1]):g} ({ds.sizes['time']} save points, {int(ds.nfe[-1])} evaluations)"
        )
    members = ds.flowsim.members() if "value" in ds else ()
    for dim in members:
        print(f"{dim + 's':<11} {ds.sizes[dim]} (loss: mean ± sd across them)")
    if "loss" in ds and ds.sizes.get("time", 0) and members:
        band = ds.flowsim.band("loss")
        first, last = (f"{float(band['mean'][i]):.6g} ± {float(band['std'][i]):.2g}" for i in (0, -1))
        print(f"loss        {first} → {last}")
    elif "loss" in ds and ds.sizes.get("time", 0):
        print(f"loss        {float(ds.loss[0]):.6g} → {float(ds.loss[-1]):.6g}")
    if ds.sizes.get("quantity", 0) and ds.sizes.get("time", 0):
        summary = ds.flowsim.summary()
        print("law kind      components   max relative drift")
        for kind in summary.law.values:
            row = summary.sel(law=kind)
            print(f"{kind:<13} {int(row.components):>10}   {float(row.max_drift):.3e}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .accessor import check_figure_path
    from .record import open_record

    check_figure_path(args.output)
    ds = open_record(args.run)
    if args.theory:
        from .theory import predict

        ds = predict(ds, args.theory)
    ds.flowsim.plot(args.output)
    print(f"wrote {args.output}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .sweeps import parse_over, sweep

    out = args.out if args.out is not None else str(Path(args.config).with_suffix("")) + "_sweep"
    ds = sweep(
        args.config,
        parse_over(args.over),
        client=args.scheduler,
        out=out,
        workers=args.workers,
        progress=not args.no_progress,
        ensemble_seeds=args.ensemble_seeds,
        scheduler_timeout=args.scheduler_timeout,
    )
    statuses = [str(s) for s in ds.status.values.ravel()]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    ran = f"{ds.attrs['runs_executed']} run now"
    if args.ensemble_seeds:
        ran += f", {ds.attrs['ensembles_executed']} ensembles, {ds.attrs['ensembles_rerun']} run again point by point"
    print(f"{len(statuses)} runs: {counts} ({ran}); records in {out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .comparison import compare, describe
    from .errors import ConfigError

    if args.output and not args.output.endswith(".nc"):
        raise ConfigError(f"compare --output: got {args.output!r}; expected a path ending in .nc")
    errors = compare(args.a, args.b, join=args.join)
    print("\n".join(describe(errors)))
    if args.output:
        errors.to_netcdf(args.output)
        print(f"wrote {args.output}")
    return 0


def _laws(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import check_seed
    from .laws import count, detect

    check_seed("laws.seed", args.seed)
    problem = load_config(args.config).problem
    laws = detect(problem.model, loss=problem.loss_kind, inputs=problem.X[:2])
    width = max([len(law.site) for law in laws] + [4])
    print(f"{'site':<{width}}  {'kind':<12}  components  exact")
    for law in laws:
        print(f"{law.site:<{width}}  {law.kind:<12}  {law.size:>10}  {'yes' if law.exact else f'no (eps {law.eps:g})'}")
    if args.no_count:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the note below says it
        result = count(problem.model, problem.X, loss=problem.loss_kind, laws=laws, seed=args.seed, max_params=args.max_params)
    laws_found = "not computed" if result.n_laws is None else result.n_laws
    print(f"parameters  {result.n_params}")
    print(f"laws        {laws_found} (D − dim Lie(W)(θ); first-order bound {result.first_order_bound}, rank gap {result.gap:.1e})")
    print(f"known       {result.n_known} (rank of the detected exact laws)")
    print(f"complete    {result.complete}" + (f" ({result.note})" if result.note else ""))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowsim", description="Neural-network training as a dynamical system.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TOML config")
    run.add_argument("config")
    run.add_argument("--out", help="output .zarr or .nc (overrides [run] out)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--resume", action="store_true", help="continue the run at the output from its checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)
    info = sub.add_parser("info", help="summarise a record: dynamics, status, drift per law kind")
    info.add_argument("run")
    info.set_defaults(func=_info)
    plot = sub.add_parser("plot", help="plot loss and each law kind's relative drift (a `theory` variable dashed)")
    plot.add_argument("run")
    plot.add_argument("-o", "--output", required=True, help="figure path (.png, .pdf, …)")
    plot.add_argument(
        "--theory", choices=("discrete", "continuous"), help="overlay this prediction (flowsim.theory.predict), dashed"
    )
    plot.set_defaults(func=_plot)
    comp = sub.add_parser("compare", help="errors of run A against run B at matched times (laws, loss, params)")
    comp.add_argument("a")
    comp.add_argument("b", help="the reference run")
    comp.add_argument("--join", choices=("exact", "inner"), default="exact", help="inner: only the times both saved")
    comp.add_argument("-o", "--output", help="write the errors as a netCDF file (.nc)")
    comp.set_defaults(func=_compare)
    laws = sub.add_parser("laws", help="the laws of a config's model: site, kind, components, and their count")
    laws.add_argument("config")
    laws.add_argument("--no-count", action="store_true", help="skip the count of all laws (Lie algebra rank)")
    laws.add_argument("--seed", type=int, default=0, help="random point and fields of the count")
    laws.add_argument("--max-params", type=int, default=1000, help="largest model the count computes brackets for")
    laws.set_defaults(func=_laws)
    sweep = sub.add_parser("sweep", help="run a config at every point of a grid on dask.distributed")
    sweep.add_argument("config")
    sweep.add_argument("--over", action="append", required=True, metavar="NAME=VALUES", help="lr=0.05,0.1 or seed=0:8 (repeatable)")
    sweep.add_argument("--scheduler", help="address of a running dask scheduler (default: a LocalCluster)")
    sweep.add_argument(
        "--scheduler-timeout", type=float, default=10.0, metavar="SECONDS", help="how long the scheduler has to answer (default 10)"
    )
    sweep.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster (default 2)")
    sweep.add_argument("--out", help="folder of the runs' zarr stores (default: CONFIG_sweep/ beside the config)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.add_argument(
        "--ensemble-seeds", action="store_true", help="run the points that differ only by seed as one ensemble task (simulate(ensemble=K))"
    )
    sweep.set_defaults(func=_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import FlowsimError

    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowsimError as exc:  # one line, even where the message quotes a multi-line error
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"flowsim: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("flowsim: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

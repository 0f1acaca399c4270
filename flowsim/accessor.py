"""``ds.flowsim``: the xarray accessor for checking laws and plotting a record."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import ConfigError, bad_value


def check_figure_path(path: str | os.PathLike) -> Path:
    """The path a figure is saved to, refused (ConfigError naming ``plot.output``) unless its
    folder exists and is writable and its extension is a format matplotlib writes."""
    from matplotlib.figure import Figure

    if not isinstance(path, (str, os.PathLike)):
        raise bad_value("plot.output", path, "a file path (str)")
    path = Path(path)
    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"plot.output: got {str(path)!r}; expected a path ending in one of .{', .'.join(formats)}")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"plot.output: got {str(path)!r}; the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or path.is_dir():
        raise ConfigError(f"plot.output: got {str(path)!r}; expected a file that can be written in {str(folder)!r}")
    return path


@xr.register_dataset_accessor("flowsim")
class FlowsimAccessor:
    """Law drift, summaries and plots of a flowsim record (any Dataset of its schema)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._obj = ds

    def drift(self) -> xr.DataArray:
        """Relative drift of every law component: (Q(t) − Q(0)) / scale, where scale is the
        magnitude of the law's terms at the start (|θ_A1|² + |θ_A2|², Σ|W_kj|, …)."""
        ds = self._obj
        scale = ds["scale"].where(ds["scale"] > 0, 1.0)
        drift = (ds["value"] - ds["value"].isel(time=0)) / scale
        return drift.assign_attrs(long_name="relative drift (Q(t) − Q(0)) / scale")

    def members(self) -> tuple[str, ...]:
        """The dimensions over independent members of the run (``("path",)`` for SDE paths)."""
        return tuple(d for d in self._obj["value"].dims if d not in ("time", "quantity"))

    def band(self, variable: str | xr.DataArray) -> xr.Dataset:
        """`mean`, `std`, `low` and `high` (5% and 95% quantiles) of a variable across the
        members (paths); a run without members gives the variable itself as all four."""
        da = self._obj[variable] if isinstance(variable, str) else variable
        dims = [d for d in self.members() if d in da.dims]
        if not dims:
            return xr.Dataset({"mean": da, "std": xr.zeros_like(da), "low": da, "high": da})
        quantiles = da.quantile([0.05, 0.95], dim=dims)
        return xr.Dataset(
            {
                "mean": da.mean(dims),
                "std": da.std(dims),
                "low": quantiles.sel(quantile=0.05, drop=True),
                "high": quantiles.sel(quantile=0.95, drop=True),
            }
        )

    def summary(self) -> xr.Dataset:
        """Per law kind: the number of components and the largest |relative drift| over the run
        (over time, components and members)."""
        ds = self._obj
        drift = abs(self.drift())
        kinds = list(dict.fromkeys(ds["law"].values.tolist()))
        max_drift = [float(drift.where(ds["law"] == k).max()) for k in kinds]
        count = [int((ds["law"] == k).sum()) for k in kinds]
        return xr.Dataset(
            {
                "max_drift": ("law", np.asarray(max_drift), {"long_name": "max |relative drift| over time and components"}),
                "components": ("law", np.asarray(count, dtype=np.int64)),
            },
            coords={"law": kinds},
        )

    def plot(self, path=None):
        """Loss and each law kind's relative drift over time, one panel each; saved to `path`
        if given. A ``theory`` variable (``flowsim.theory.predict``) is drawn over the drift as
        dashed lines, (theory − Q(0)) / scale. Returns the matplotlib Figure.

        **Raises** ConfigError naming ``plot.output`` for a path that cannot be written as a
        figure (``check_figure_path``), before anything is drawn."""
        import matplotlib

        if path is not None:
            path = check_figure_path(path)
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ds = self._obj
        kinds = list(dict.fromkeys(ds["law"].values.tolist()))
        panels = (["loss"] if "loss" in ds else []) + kinds
        fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.2 * len(panels)), sharex=True, squeeze=False)
        t = ds["time"].values
        drift = self.drift()
        members = self.members()
        for ax, panel in zip(axes[:, 0], panels):
            if panel == "loss":
                if members:
                    self._plot_band(ax, t, self.band("loss"), f"mean, 5–95% over {ds.sizes[members[0]]} {members[0]}s")
                else:
                    ax.plot(t, ds["loss"].values, color="k")
                ax.set_yscale("log")
                ax.set_ylabel("loss")
                continue
            d = drift.where(ds["law"] == panel, drop=True)
            if members:
                ax.plot(t, d.mean(members).values, lw=0.6, alpha=0.5)
                self._plot_band(ax, t, self.band(abs(d).max("quantity")), "max |drift|: mean, 5–95%")
            else:
                ax.plot(t, d.values, lw=0.6, alpha=0.5)
                ax.plot(t, abs(d).max("quantity").values, color="k", lw=1.5, label="max |drift|")
            if "theory" in ds:
                scale = ds["scale"].where(ds["scale"] > 0, 1.0)
                predicted = ((ds["theory"] - ds["value"].isel(time=0)) / scale).where(ds["law"] == panel, drop=True)
                lines = ax.plot(t, predicted.values, "--", color="0.2", lw=0.8)
                lines[0].set_label(f"theory ({ds['theory'].attrs.get('prediction', '')})")
            ax.set_ylabel(f"{panel}\nrel. drift")
            ax.legend(loc="best", fontsize=7)
        axes[-1, 0].set_xlabel(f"time ({ds['time'].attrs.get('units', '')})")
        fig.suptitle(f"{ds.attrs.get('dynamics', '')[:80]}\nstatus: {ds.attrs.get('status', '?')}", fontsize=8)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    @staticmethod
    def _plot_band(ax, t, band: xr.Dataset, label: str) -> None:
        ax.fill_between(t, band["low"].values, band["high"].values, color="k", alpha=0.15, lw=0)
        ax.plot(t, band["mean"].values, color="k", lw=1.5, label=label)
        ax.legend(loc="best", fontsize=7)

"""flowsim run | info | plot, and run configs from Python."""

import subprocess
import sys

import xarray as xr

import flowsim as fs
from flowsim.cli import main

from test_errors import GOOD


def test_run_info_plot(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(GOOD)
    out = tmp_path / "run.zarr"
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    assert "completed" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    assert ds.attrs["config"] == GOOD and ds.sizes["time"] == 6 and float(ds.batch_size) == 8
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DiscreteSGD" in text and "completed" in text and "rescale" in text and "translation" in text
    assert main(["plot", str(out), "-o", str(tmp_path / "fig.png")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    # the same config again: the existing output is refused, --overwrite replaces it
    assert main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    assert main(["run", str(config), "--out", str(out), "--no-progress", "--overwrite"]) == 0


def test_zoo_factories_take_their_shapes_from_the_data(tmp_path):
    cnn = GOOD.replace('name = "mlp.mlp"\ndepth = 1\nwidth = 4', 'name = "cnn.vgg"\nbatch_norm = true')
    ds = fs.run_config(cnn, progress=False)
    assert ds.attrs["status"] == "completed" and "scale" in set(ds.law.values)
    regression = GOOD.replace('name = "digits"\nn_train = 40', 'name = "teacher_student"\nn = 40\nout_features = 2').replace(
        "[problem]", '[problem]\nloss = "mse"'
    )
    ds = fs.run_config(regression, progress=False)
    assert ds.attrs["status"] == "completed" and "translation" not in set(ds.law.values)


def test_same_config_same_dataset():
    a = fs.run_config(GOOD, progress=False)
    b = fs.run_config(GOOD, progress=False)
    xr.testing.assert_equal(a.drop_vars("wall_time"), b.drop_vars("wall_time"))


def test_diverged_run_exits_3(tmp_path):
    config = tmp_path / "diverge.toml"
    config.write_text(
        GOOD.replace('name = "digits"\nn_train = 40', 'name = "teacher_student"\nn = 32')
        .replace("[problem]", '[problem]\nloss = "mse"')
        .replace("lr = 0.1\nbatch_size = 8", "lr = 5.0")
        .replace("t1 = 0.5\nsave_every = 0.1", "t1 = 200.0\nsave_every = 5.0")
    )
    result = subprocess.run(
        [sys.executable, "-m", "flowsim.cli", "run", str(config), "--out", str(tmp_path / "d.zarr")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3, result.stderr
    assert "diverged" in result.stdout
    ds = xr.open_zarr(tmp_path / "d.zarr")
    assert ds.attrs["status"] == "diverged" and ds.sizes["time"] >= 1

"""Bad input: a FlowsimError naming the field, before any work, through the API and the CLI."""

import math
import subprocess
import sys

import pytest
import torch

import flowsim as fs
from flowsim.cli import main
from flowsim.integrators import ODE

from conftest import build_problem

GOOD = """
[model]
name = "mlp.mlp"
depth = 1
width = 4
[data]
name = "digits"
n_train = 40
[problem]
weight_decay = 1e-3
[dynamics]
name = "DiscreteSGD"
lr = 0.1
batch_size = 8
[run]
t1 = 0.5
save_every = 0.1
"""


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


BAD_CONFIGS = {
    "dynamics.lr": edit(GOOD, "lr = 0.1", "lr = -0.1"),
    "dynamics.lr ": edit(GOOD, "lr = 0.1", "lr = nan"),
    "dynamics.batch_size": edit(GOOD, "batch_size = 8", "batch_size = 0"),
    "dynamics.batch_size  ": edit(GOOD, "batch_size = 8", "batch_size = 100"),
    "model.name": edit(GOOD, 'name = "mlp.mlp"', 'name = "mlp.transformer"'),
    "dynamics.name": edit(GOOD, 'name = "DiscreteSGD"', 'name = "Adam"'),
    "integrator.name": GOOD + '[integrator]\nname = "RK45"\n',
    "integrator.method": edit(GOOD, 'name = "DiscreteSGD"\nlr = 0.1\nbatch_size = 8', 'name = "GradientFlow"')
    + '[integrator]\nname = "ODE"\nmethod = "rk45"\n',
    "t1": edit(GOOD, "t1 = 0.5", "t1 = 0"),
    "save_every": edit(GOOD, "save_every = 0.1", "save_every = 2.0"),
    "run.colour": GOOD + 'colour = "red"\n',
    "model.depht": edit(GOOD, "depth = 1", "depht = 1"),
    "dynamics.momentum": edit(GOOD, "batch_size = 8", "batch_size = 8\nmomentum = 1.5"),
    "model.width": edit(GOOD, "width = 4", 'width = "four"'),
    "dynamics.lr  ": edit(GOOD, "lr = 0.1", 'lr = "fast"'),
    "data.n_train": edit(GOOD, "n_train = 40", "n_train = 5000"),
    "problem.weight_decay": edit(GOOD, "weight_decay = 1e-3", "weight_decay = -1.0"),
    "problem.loss": edit(GOOD, "weight_decay = 1e-3", 'loss = "hinge"'),
    "run.dtype": GOOD + 'dtype = "float16"\n',
    "run.device": GOOD + 'device = "tpu"\n',
    "run.observe": GOOD + 'observe = ["loss", "energy"]\n',
    "data.name": edit(GOOD, 'name = "digits"', 'name = "mnist"'),
    "integrator": GOOD + '[integrator]\nname = "ODE"\n',  # an ODE solver cannot run SGD
    "weather": GOOD + "[weather]\nsunny = true\n",
    "run.out": GOOD + 'out = "run.csv"\n',
}


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_bad_config_names_the_field_and_exits_2(field, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIGS[field])
    out = {} if "out =" in BAD_CONFIGS[field] else {"out": tmp_path / "x.zarr"}
    with pytest.raises(fs.FlowsimError) as info:
        fs.load_config(path).simulate(progress=False, **out)
    assert field.strip() in str(info.value)
    out = [] if out == {} else ["--out", str(tmp_path / "y.zarr")]
    assert main(["run", str(path), "--no-progress", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowsim: error:") and field.strip() in err
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_bad_arguments_through_the_api():
    problem = build_problem("mlp", n=16)
    X, y = fs.data.digits(n_train=16)
    cases = [
        (lambda: fs.DiscreteSGD(lr=-1.0), "dynamics.lr"),
        (lambda: fs.DiscreteSGD(lr=math.nan), "dynamics.lr"),
        (lambda: fs.DiscreteSGD(lr=0.1, batch_size=0), "dynamics.batch_size"),
        (lambda: fs.simulate(problem, fs.DiscreteSGD(lr=0.1, batch_size=17), t1=1, save_every=0.1), "dynamics.batch_size"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=-1.0, save_every=0.1), "t1"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=1.0, save_every=2.0), "save_every"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), fs.integrators.Discrete(), t1=1.0, save_every=0.5), "integrator"),
        (lambda: fs.simulate(problem, fs.DiscreteSGD(lr=0.1), t1=1.0, save_every=0.01), "save_every"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=1.0, save_every=0.5, laws="all"), "laws"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=1.0, save_every=0.5, observe=["entropy"]), "observe"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=1.0, save_every=0.5, dtype=torch.int32), "dtype"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=1.0, save_every=0.5, seed=-3), "seed"),
        (lambda: ODE("rk45"), "integrator.method"),
        (lambda: ODE("dopri5", step_size=0.1), "integrator.step_size"),
        (lambda: ODE("dopri5", rtol=0), "integrator.rtol"),
        (lambda: fs.Problem(problem.model, (X, y[:10])), "data"),
        (lambda: fs.Problem(problem.model, (X, y + 5)), "data.y"),
        (lambda: fs.Problem(problem.model, (X, y.float())), "data.y"),
        (lambda: fs.Problem(problem.model, (X.flatten(1)[:, :10], y)), "model"),
        (lambda: fs.Problem(problem.model, (X, y), loss="hinge"), "loss"),
        (lambda: fs.Problem(problem.model, (X, y), weight_decay=float("nan")), "weight_decay"),
        (lambda: fs.Problem("not a model", (X, y)), "model"),
        (lambda: fs.zoo.factory("cnn.resnet"), "model.name"),
    ]
    for make, field in cases:
        with pytest.raises(fs.FlowsimError) as info:
            make()
        assert field in str(info.value), (field, str(info.value))
        assert isinstance(info.value, ValueError)


def test_the_zoo_raises_plain_errors_and_a_config_names_the_model_key():
    """The zoo is plain PyTorch: ValueError (out of range) or TypeError (wrong kind), never a
    FlowsimError; a config turns its error into ConfigError("model.<argument>: …")."""
    cases = [
        (lambda: fs.models.cnn.vgg(depth=0), ValueError, "depth: got 0; expected an integer >= 1"),
        (lambda: fs.models.mlp.mlp(depth=10**5), ValueError, "depth: got 100000; expected an integer <= 10000"),
        (lambda: fs.models.mlp.mlp(width=2.0), TypeError, "width: got 2.0; expected an integer"),
        (lambda: fs.models.cnn.vgg(bn_eps=math.nan), ValueError, "bn_eps: got nan; expected a finite number"),
        (lambda: fs.models.resnet.resnet(batch_norm=1), TypeError, "batch_norm: got 1; expected true or false"),
        (lambda: fs.models.mlp.mlp(activation="gelu"), ValueError, "activation: got 'gelu'; expected one of relu, leaky_relu, identity, tanh"),
        (lambda: fs.models.attention.block(norm="mid"), ValueError, "norm: got 'mid'; expected one of pre, post, none"),
        (lambda: fs.models.attention.layer(d_model=3, heads=2), ValueError, "heads: got 2; expected a divisor of d_model=3, or give head_dim"),
    ]
    for make, cls, message in cases:
        with pytest.raises(cls) as info:
            make()
        assert str(info.value) == message and not isinstance(info.value, fs.FlowsimError)
    vgg = edit(GOOD, 'name = "mlp.mlp"\ndepth = 1', 'name = "cnn.vgg"\ndepth = 0')
    with pytest.raises(fs.ConfigError) as info:
        fs.load_config(vgg)
    assert str(info.value) == "model.depth: got 0; expected an integer >= 1"
    # flowsim's own check is the zoo's, raised as the FlowsimError asked for
    with pytest.raises(fs.ModelError) as info:
        fs.errors.check_number("model.depth", 0, integer=True, minimum=1, cls=fs.ModelError)
    assert str(info.value) == "model.depth: got 0; expected an integer >= 1"


def test_an_existing_output_is_never_touched(tmp_path):
    out = tmp_path / "run.zarr"
    out.mkdir()
    (out / "keep").write_text("mine")
    problem = build_problem("mlp", n=16)
    with pytest.raises(fs.ConfigError, match="exists"):
        fs.simulate(problem, fs.GradientFlow(), t1=0.1, save_every=0.1, out=out)
    # a run whose arguments fail later checks leaves it alone too
    with pytest.raises(fs.ConfigError, match="save_every"):
        fs.simulate(problem, fs.GradientFlow(), t1=0.1, save_every=1.0, out=out, overwrite=True)
    assert (out / "keep").read_text() == "mine"


def test_cli_one_line_and_exit_code_in_a_subprocess(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIGS["dynamics.lr"])
    result = subprocess.run([sys.executable, "-m", "flowsim.cli", "run", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "dynamics.lr" in result.stderr

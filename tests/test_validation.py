"""Every input checked at the boundary: run settings, outputs, resume, integrator options and
their combinations, through the API and the CLI (exit 2), never touching an existing output;
and random configs (hypothesis) that fail only with a FlowsimError."""

import json
import math
import string
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowsim as fs
from flowsim.checkpoint import checkpoint_path
from flowsim.cli import main
from flowsim.integrators import ODE

from conftest import build_problem
from test_errors import GOOD, edit

GF = edit(GOOD, 'name = "DiscreteSGD"\nlr = 0.1\nbatch_size = 8', 'name = "GradientFlow"')

#: field named in the message -> a config that gets it wrong
BAD_CONFIGS = {
    "run.checkpoint_every": GOOD + "checkpoint_every = -1.0\n",
    "run.checkpoint_every ": GOOD + 'checkpoint_every = "often"\n',
    "run.overwrite": GOOD + 'overwrite = "yes"\n',
    "run.progress": GOOD + "progress = 1\n",
    "run.out": GOOD + "out = 5\n",
    "run.out ": GOOD + 'out = ".zarr"\n',
    "run.seed": GOOD + "seed = true\n",
    "run.t1": edit(GOOD, "t1 = 0.5", 't1 = "0.5"'),
    "run.save_every": edit(GOOD, "save_every = 0.1", "save_every = 1e-300"),
    "run.observe": GOOD + 'observe = "loss"\n',
    "run": edit(GOOD, "[run]\nt1 = 0.5\nsave_every = 0.1\n", "") + "run = 5\n",
    "config": GOOD + "t1 = [\n",
    "dynamics.name": edit(GOOD, 'name = "DiscreteSGD"', 'name = ["DiscreteSGD"]'),
    "dynamics.nesterov": edit(GOOD, "batch_size = 8", "batch_size = 8\nmomentum = 0.9\nnesterov = 1"),
    "dynamics.lr": edit(GOOD, "lr = 0.1\n", ""),
    "dynamics.dampening": edit(GOOD, "batch_size = 8", "batch_size = 8\nmomentum = 0.9\ndampening = 1.0"),
    "integrator.name": GOOD + "[integrator]\nname = { kind = 1 }\n",
    "integrator.options.foo": GF + '[integrator]\nname = "ODE"\noptions = { foo = 1 }\n',
    "integrator.options": GF + '[integrator]\nname = "ODE"\noptions = { max_num_steps = "many" }\n',
    "integrator.options.interp": GF + '[integrator]\nname = "ODE"\nmethod = "rk4"\noptions = { interp = "cubic" }\n',
    "integrator.max_steps": GF + '[integrator]\nname = "ODE"\nmax_steps = 0\n',
    "integrator.rtol": edit(GF, "save_every = 0.1", 'save_every = 0.1\ndtype = "float32"') + '[integrator]\nname = "ODE"\nrtol = 1e-7\n',
    "integrator.rtol ": GF + '[integrator]\nname = "ODE"\nrtol = 1e-17\n',
    "integrator.method": GF + '[integrator]\nname = "ODE"\nmethod = 4\n',
    "integrator.step_size": GF + '[integrator]\nname = "ODE"\nmethod = "rk4"\nstep_size = -0.1\n',
    "model.bias": edit(GOOD, "width = 4", 'width = 4\nbias = "yes"'),
    "model.activation": edit(GOOD, "width = 4", "width = 4\nactivation = 5"),
    "model.width": edit(GOOD, "width = 4", "width = 4.5"),
    "data.seed": edit(GOOD, "n_train = 40", 'n_train = 40\nseed = "x"'),
    "data.task": edit(GOOD, 'name = "digits"\nn_train = 40', 'name = "teacher_student"\nn = 40\ntask = "ranking"'),
    "problem.chunk_size": edit(GOOD, "weight_decay = 1e-3", "weight_decay = 1e-3\nchunk_size = 0"),
    "problem.weight_decay": edit(GOOD, "weight_decay = 1e-3", 'weight_decay = "1e-3"'),
}


def existing_output(tmp_path):
    """A record and its checkpoint that must survive every refused run, byte for byte."""
    out = tmp_path / "keep.zarr"
    out.mkdir(exist_ok=True)
    (out / "mine").write_text("precious")
    checkpoint_path(out).write_bytes(b"checkpoint")
    return out


def untouched(out) -> bool:
    return (out / "mine").read_text() == "precious" and checkpoint_path(out).read_bytes() == b"checkpoint" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_bad_config_is_refused_before_an_existing_output_is_touched(field, tmp_path, capsys):
    """Even with --overwrite, which would replace the output, bad input stops everything first."""
    out = existing_output(tmp_path)
    config = tmp_path / "bad.toml"
    config.write_text(BAD_CONFIGS[field])
    # the output, replaced if it were good, and no progress bar; unless the bad value is one of these
    overrides = {"out": out, "overwrite": True, "progress": False}
    flags = {"out": ["--out", str(out)], "overwrite": ["--overwrite"], "progress": ["--no-progress"]}
    for key in [k for k in overrides if field.strip() == f"run.{k}"]:
        del overrides[key], flags[key]
    with pytest.raises(fs.FlowsimError) as info:
        fs.load_config(config).simulate(**overrides)
    assert str(info.value).startswith(field.strip()), str(info.value)
    assert main(["run", str(config), *sum(flags.values(), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"flowsim: error: {field.strip()}"), err
    assert untouched(out)


def test_output_and_resume_combinations_through_the_cli(tmp_path, capsys):
    out = existing_output(tmp_path)
    config = tmp_path / "good.toml"
    config.write_text(GOOD)
    cases = {
        "run.out: ": [],  # it exists: neither --overwrite nor --resume
        "run.resume: got resume=True and overwrite=True": ["--resume", "--overwrite"],
        "run.resume: ": ["--resume"],  # a checkpoint that is not one
    }
    for start, flags in cases.items():
        assert main(["run", str(config), "--out", str(out), "--no-progress", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"flowsim: error: {start}"), err
        assert untouched(out)
    assert main(["run", str(config), "--out", str(tmp_path / "new.zarr"), "--resume"]) == 2
    assert "does not exist; expected a run to continue" in capsys.readouterr().err
    checkpoint_path(out).unlink()
    assert main(["run", str(config), "--out", str(out), "--resume"]) == 2  # a folder flowsim did not write
    assert "is not a flowsim record" in capsys.readouterr().err and (out / "mine").exists()


def test_bad_run_arguments_through_the_api(tmp_path):
    problem = build_problem("mlp", n=16, depth=1, width=4)
    sgd, gf = fs.DiscreteSGD(lr=0.1), fs.GradientFlow()
    out = existing_output(tmp_path)
    (tmp_path / "lonely.zarr.ckpt").write_bytes(b"")

    def simulate(dynamics=gf, integrator=None, **kwargs):
        return fs.simulate(problem, dynamics, integrator, **{"t1": 0.2, "save_every": 0.1, "progress": False, **kwargs})

    cases = [
        (lambda: simulate(overwrite="yes"), "run.overwrite"),
        (lambda: simulate(resume=1), "run.resume"),
        (lambda: simulate(progress="no"), "run.progress"),
        (lambda: simulate(checkpoint_every=-1.0), "run.checkpoint_every"),
        (lambda: simulate(checkpoint_every=math.inf), "run.checkpoint_every"),
        (lambda: simulate(config=5), "config"),
        (lambda: simulate(out=5), "run.out"),
        (lambda: simulate(out=tmp_path / "run.txt"), "run.out"),
        (lambda: simulate(out=tmp_path / "missing" / "run.zarr"), "run.out"),
        (lambda: simulate(out=out), "run.out"),  # exists
        (lambda: simulate(out=tmp_path / "lonely.zarr"), "run.out"),  # its checkpoint exists
        (lambda: simulate(laws=5), "run.laws"),
        (lambda: simulate(laws=[1]), "run.laws"),
        (lambda: simulate(resume=True), "run.resume"),  # no out
        (lambda: simulate(out=out, resume=True, overwrite=True), "run.resume"),
        (lambda: simulate(out=tmp_path / "never.zarr", resume=True), "run.resume"),
        (lambda: simulate(out=out, resume=True), "run.resume"),  # not a readable checkpoint
        (lambda: simulate(seed=True), "run.seed"),
        (lambda: simulate(t1="1"), "run.t1"),
        (lambda: simulate(t1=1e9, save_every=1e-3), "run.save_every"),  # 1e12 save points
        (lambda: simulate(save_every=1e-320), "run.save_every"),
        (lambda: simulate(observe="loss"), "run.observe"),
        (lambda: simulate(device=5 if not torch.cuda.is_available() else "tpu"), "run.device"),
        (lambda: simulate(dtype="float16"), "run.dtype"),
        (lambda: simulate(sgd, ODE()), "integrator"),  # an ODE solver cannot run SGD
        (lambda: simulate(gf, fs.integrators.Discrete()), "integrator"),
        (lambda: simulate(gf, ODE(rtol=1e-7), dtype=torch.float32), "integrator.rtol"),  # float32 cannot honour it
        (lambda: simulate(gf, ODE(rtol=1e-16)), "integrator.rtol"),
        (lambda: ODE(options={"foo": 1}), "integrator.options.foo"),
        (lambda: ODE(options={"first_step": "soon"}), "integrator.options"),
        (lambda: ODE(options=[1]), "integrator.options"),
        (lambda: ODE("rk4", options={"interp": "cubic"}), "integrator.options.interp"),
        (lambda: ODE(max_steps=0), "integrator.max_steps"),
        (lambda: ODE(max_steps=1.5), "integrator.max_steps"),
        (lambda: ODE(method=4), "integrator.method"),
        (lambda: fs.DiscreteSGD(lr=0.1, nesterov=True), "dynamics.nesterov"),
        (lambda: fs.DiscreteSGD(lr=True), "dynamics.lr"),
    ]
    for make, field in cases:
        with pytest.raises(fs.FlowsimError) as info:
            make()
        assert str(info.value).startswith(field), (field, str(info.value))
        assert isinstance(info.value, ValueError)
    assert untouched(out) and (tmp_path / "lonely.zarr.ckpt").read_bytes() == b""


def test_float32_takes_a_tolerance_it_can_honour():
    problem = build_problem("mlp", n=16, depth=1, width=4)
    ds = fs.simulate(problem, fs.GradientFlow(), ODE(rtol=1e-5, atol=1e-6), t1=0.1, save_every=0.1, dtype="float32", progress=False)
    assert ds.attrs["status"] == "completed" and ds.value.dtype == "float32"


# ------------------------------------------------------------------ property tests over configs

BAD = (0, -1, 2.5, math.nan, math.inf, "x", True, [1])


def value(*good, bad=BAD):
    """Mostly a plausible value, sometimes an implausible one."""
    return st.one_of(st.sampled_from(good), st.sampled_from(good), st.sampled_from(good), st.sampled_from(bad))


#: section -> name -> the keys that name takes (valid runs stay tiny: t1 ≤ 0.2, ≤ 24 examples)
SECTIONS = {
    "model": {
        "mlp.mlp": {"depth": value(0, 1), "width": value(2, 4), "activation": value("relu", "tanh", "swish"), "bias": value(True, False)},
        "cnn.vgg": {"depth": value(1, 2), "width": value(2, 3), "batch_norm": value(True, False), "pool_every": value(1, 2)},
        "mlp.transformer": {"width": value(4)},
        5: {},
    },
    "data": {
        "digits": {"n_train": value(16, 24, bad=(0, -3, 5000, "x", 2.5)), "seed": value(0, 3)},
        "teacher_student": {"n": value(16), "task": value("regression", "classification", "ranking"), "out_features": value(1, 3)},
        "mnist": {},
    },
    "problem": {None: {"loss": value("cross_entropy", "mse", "hinge"), "weight_decay": value(0.0, 1e-3), "chunk_size": value(8)}},
    "dynamics": {
        "DiscreteSGD": {
            "lr": value(0.1, 0.2),
            "batch_size": value(4, 8, bad=(0, -1, 10_000, 2.5, "x")),
            "momentum": value(0.0, 0.9, bad=(1.5, -0.1, "x")),
            "dampening": value(0.0, 0.5, bad=(1.0, "x")),
            "nesterov": value(False, True, bad=(1, "x")),
        },
        "GradientFlow": {"eta": value(0.1)},  # never a key of it
        "Adam": {},
        ("x",): {},
    },
    "integrator": {
        "ODE": {
            "method": value("dopri5", "bosh3", "rk4", "euler", bad=("rk45", 1)),
            "rtol": value(1e-3, 1e-5, bad=(0, -1, 1e-20, "x")),
            "atol": value(1e-4, 1e-6),
            "step_size": value(0.1, 0.05),
            "max_steps": value(20, 200),
            "options": value({}, {"max_num_steps": 50}, bad=({"foo": 1}, {"first_step": "x"}, {"interp": "cubic"}, 5)),
        },
        "Discrete": {"method": value("euler")},
        "RK45": {},
    },
    "run": {
        None: {
            "t1": value(0.1, 0.2, bad=(0, -1, math.nan, "x", True)),
            "save_every": value(0.1, bad=(0, -0.1, 1.0, 1e-300, "x")),
            "seed": value(0, 7, bad=(-1, True, "x", 1.5)),
            "dtype": value("float64", "float32", bad=("float16", 5)),
            "device": value("cpu", bad=("tpu", "cuda:99", 5, -1)),
            "observe": value(["loss"], ["loss", "grad_norm"], ["sharpness"], bad=(["energy"], "loss", [1])),
            "checkpoint_every": value(0.0, 60.0),
            "progress": value(False),
        }
    },
}


def chance(draw, p: float) -> bool:
    """True with probability about p; hypothesis's simplest draw (0) gives the likelier outcome."""
    roll = draw(st.integers(0, 99))
    return roll < 100 * p if p >= 0.5 else roll >= 100 * (1 - p)


REQUIRED = ("lr", "t1", "save_every")
REAL_NAMES = ("mlp.mlp", "cnn.vgg", "digits", "teacher_student", "DiscreteSGD", "GradientFlow", "ODE", "Discrete", None)


@st.composite
def configs(draw):
    """A TOML-ish dict: sections mostly present, each names something (mostly a real name),
    then takes some of that name's keys, each mostly plausible; now and then an unknown key or
    section."""
    config = {}
    for section, names in SECTIONS.items():
        if chance(draw, 0.4 if section in ("integrator", "problem") else 0.97):
            real = [n for n in names if n in REAL_NAMES]
            name = draw(st.sampled_from(real * 4 + list(names)))  # mostly a real name
            table = {} if name is None or chance(draw, 0.02) else {"name": name}
            table.update({k: draw(v) for k, v in names[name].items() if chance(draw, 0.9 if k in REQUIRED else 0.25)})
            config[section] = table
    if "run" in config and chance(draw, 0.03):
        config["run"]["colour"] = "red"  # never a run key
    if chance(draw, 0.03):
        config["weather"] = {"sunny": True}
    return config


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == math.inf else repr(value))
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(config) -> str:
    return "".join(f"[{s}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in t.items()) for s, t in config.items())


def test_no_config_crashes_with_anything_but_a_flowsim_error():
    """Random configs, plausible and implausible, and random text: a valid config runs (tiny),
    every other one raises a FlowsimError with a one-line message; nothing else escapes."""
    outcomes = {"ran": 0, "refused": 0}

    @settings(max_examples=70, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(configs(), st.text(alphabet=string.ascii_letters + " =[]{}\"'\n.,0123456789", max_size=16))
    def check(config, noise):
        for source in (to_toml(config), "[run]\n" + noise):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a diverging run warns, and that is fine
                try:
                    ds = fs.load_config(source).simulate(progress=False)
                except fs.FlowsimError as exc:
                    assert str(exc) and "\n" not in str(exc).strip()
                    outcomes["refused"] += 1
                    continue
            assert ds.attrs["status"] in ("completed", "diverged") and ds.sizes["time"] >= 1
            outcomes["ran"] += 1

    check()
    assert outcomes["ran"] >= 5 and outcomes["refused"] >= 30, outcomes  # both branches were explored

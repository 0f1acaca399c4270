"""Bad input, round 2: each case gets a FlowsimError naming the field before any work, the CLI
prints it on one line and exits 2, and nothing is written."""

import numpy as np
import pytest
import torch
from torch import nn

import flowsim as fs
from flowsim import cli
from flowsim.cli import main
from flowsim.errors import MAX_SEED, check_number, check_seed
from flowsim.integrators import ODE, RK, SDE, Exponential, FusedEulerMaruyama

from conftest import build_problem
from test_errors import GOOD, edit

GF = edit(GOOD, 'name = "DiscreteSGD"\nlr = 0.1\nbatch_size = 8', 'name = "GradientFlow"')

#: field the message starts with -> a config that gets it wrong
BAD_CONFIGS = {
    "run.seed": GOOD + "seed = 1180591620717411303424\n",  # 2**70: tomllib reads any integer
    "run.seed ": GOOD + "seed = -1\n",
    "run.observe": GOOD + "observe = { loss = false }\n",
    "run.save_every": edit(GOOD, "save_every = 0.1", "save_every = 0.15"),  # 1.5 SGD steps
    "dynamics.momentum": edit(GOOD, "batch_size = 8", "batch_size = 8\nmomentum = 1.0"),
    "dynamics.dampening": edit(GOOD, "batch_size = 8", "batch_size = 8\nmomentum = 0.9\ndampening = 1.0"),
    "integrator.step_size": GF + '[integrator]\nname = "ODE"\nmethod = "rk4"\nstep_size = 0.2\n',
    "integrator.options.step_size": GF + '[integrator]\nname = "ODE"\nmethod = "rk4"\noptions = { step_size = 0 }\n',
    "run.device": GOOD + 'device = "cpu:3"\n',
    "run.dtype": GOOD + "dtype = 64\n",
    "run.t1": edit(GOOD, "t1 = 0.5", 't1 = "x"'),
    "run.t1 ": edit(GOOD, "t1 = 0.5", "t1 = { value = 0.5 }"),
    "run.out": GOOD + "out = 5\n",
    "model": edit(GOOD, "width = 4", "width = 1000000000000000000000000000000"),  # torch: an overflow
    "data": edit(GOOD, 'name = "digits"\nn_train = 40', 'name = "teacher_student"\nn = 100000000000000000000'),
    "dynamics.batch_size": edit(GOOD, "batch_size = 8", "batch_size = -8"),
    "dynamics.lr": edit(GOOD, "lr = 0.1", "lr = { value = 0.1 }"),
    "model.depth": edit(GOOD, "depth = 1", "depth = [1]"),
    "model ": "",  # an empty file: no section
    "model.depth ": edit(GOOD, "depth = 1", "depth = 9223372036854775807"),  # would build layers until memory runs out
    "data.seed": edit(GOOD, "n_train = 40", "n_train = 40\nseed = -1"),
    "run.t1  ": edit(GOOD, "t1 = 0.5", "t1 = 1e300"),  # never ends
    "run.t1   ": edit(GOOD, "lr = 0.1", "lr = 1e-300"),  # 5e299 SGD steps
    "run.ensemble": edit(GOOD, "t1 = 0.5", "t1 = 0.5\nensemble = 99999999999999999999"),
    "run.out ": GOOD + 'out = "nul\\u0000.zarr"\n',  # a NUL character: no such path
}


def untouched(out) -> bool:
    return (out / "mine").read_text() == "precious" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_bad_config_is_refused_in_one_line(field, tmp_path, capsys):
    out = tmp_path / "keep.zarr"
    out.mkdir()
    (out / "mine").write_text("precious")
    config = tmp_path / "bad.toml"
    config.write_text(BAD_CONFIGS[field])
    overrides = {} if field.strip() == "run.out" else {"out": out, "overwrite": True}
    with pytest.raises(fs.FlowsimError) as info:
        fs.load_config(config).simulate(progress=False, **overrides)
    assert str(info.value).startswith(field.strip()) and "\n" not in str(info.value), str(info.value)
    flags = [] if field.strip() == "run.out" else ["--out", str(out), "--overwrite"]
    assert main(["run", str(config), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"flowsim: error: {field.strip()}"), err
    assert untouched(out)


def test_a_config_file_that_is_not_utf8_or_not_a_file(tmp_path, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(GOOD.replace("digits", "d\xeegits").encode("latin-1"))
    cases = [(latin, "is not UTF-8 text"), (tmp_path, "is not a file"), ("", "expected a path"), (5, "expected a path")]
    for source, message in cases:
        with pytest.raises(fs.ConfigError, match=message) as info:
            fs.load_config(source)
        assert str(info.value).startswith("config: ")
    assert main(["run", str(latin)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowsim: error: config: ") and "UTF-8" in err


def test_toml_text_with_a_comment_first_is_text():
    config = fs.load_config("# a comment first\n" + GOOD)
    assert config.run == {"t1": 0.5, "save_every": 0.1}


def test_seeds_outside_64_bits_are_refused_everywhere():
    problem = build_problem("mlp", n=16, depth=1, width=4)
    for seed in (2**70, MAX_SEED + 1, -1, True, 1.0):
        with pytest.raises(fs.ConfigError, match=r"^run\.seed: got .*; expected an integer in 0 … 2\*\*63 − 1$"):
            fs.simulate(problem, fs.GradientFlow(), t1=0.1, save_every=0.1, seed=seed, progress=False)
        with pytest.raises(fs.ConfigError, match=r"^run\.seed: "):
            fs.load_config(GOOD, seed=seed)
    assert check_seed("run.seed", MAX_SEED) == MAX_SEED
    assert fs.load_config(GOOD, seed=np.int64(3)).run["seed"] == 3


def test_a_count_seed_beyond_64_bits_exits_2(tmp_path, capsys):
    config = tmp_path / "good.toml"
    config.write_text(GOOD)
    assert main(["laws", str(config), "--seed", str(2**70)]) == 2
    assert capsys.readouterr().err.strip().startswith("flowsim: error: laws.seed: got 1180591620717411303424;")


def test_plot_output_is_checked_before_plotting(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = fs.simulate(build_problem("mlp", n=16, depth=1, width=4), fs.GradientFlow(), t1=0.1, save_every=0.1, progress=False)
    (tmp_path / "folder.png").mkdir()
    bad = {
        "no/such/folder/x.png": "does not exist",
        "x.unknownext": "expected a path ending in one of",
        "x": "expected a path ending in one of",
        "folder.png": "expected a file that can be written",
    }
    for output, message in bad.items():
        with pytest.raises(fs.ConfigError, match=message) as info:
            ds.flowsim.plot(output)
        assert str(info.value).startswith("plot.output: ")
        # the CLI refuses the output before it opens the record (which does not exist here)
        assert main(["plot", "missing.zarr", "-o", output]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("flowsim: error: plot.output: "), err
    with pytest.raises(fs.ConfigError, match="plot.output"):
        ds.flowsim.plot(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]
    assert ds.flowsim.plot("fig.PDF") is not None and (tmp_path / "fig.PDF").stat().st_size > 0


def test_non_finite_or_meta_parameters_are_a_model_error(tmp_path):
    X, y = fs.data.digits(n_train=16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 10))
    with torch.no_grad():
        model[1].weight[0, :3] = float("nan")
    with pytest.raises(fs.ModelError, match=r"^model: parameter '1\.weight' has 3 non-finite entries; expected finite"):
        fs.Problem(model, (X, y))
    with torch.device("meta"):
        meta = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(fs.ModelError, match=r"^model: parameter '1\.weight' is on the meta device"):
        fs.Problem(meta, (X, y))
    # parameters changed after the problem was built: simulate checks again, before any output
    problem = build_problem("mlp", n=16, depth=1, width=4)
    with torch.no_grad():
        next(problem.model.parameters())[0, 0] = float("inf")
    with pytest.raises(fs.ModelError, match=r"^model: parameter 'fc1\.weight' has 1 non-finite entry;"):
        fs.simulate(problem, fs.GradientFlow(), t1=0.1, save_every=0.1, out=tmp_path / "r.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_numpy_scalars_are_taken_as_plain_numbers():
    assert check_number("x", np.int64(3), integer=True) == 3 and type(check_number("x", np.int64(3), integer=True)) is int
    assert type(check_number("x", np.float32(0.5))) is float and type(check_number("x", np.int64(2))) is float
    for bad in (np.bool_(True), True, 10**400, "1"):
        with pytest.raises(fs.ConfigError, match="^x: got"):
            check_number("x", bad)
    sgd = fs.DiscreteSGD(lr=np.float32(0.5), batch_size=np.int64(4), momentum=np.float64(0.5))
    assert (type(sgd.lr), type(sgd.batch_size), type(sgd.momentum)) == (float, int, float)
    assert type(ODE("rk4", step_size=np.float32(0.25)).step_size) is float
    problem = build_problem("mlp", n=16, depth=1, width=4)
    ds = fs.simulate(problem, sgd, t1=np.int64(2), save_every=np.int64(1), seed=np.int64(3), progress=False)
    assert ds.attrs["status"] == "completed" and ds.attrs["seed"] == 3 and list(ds.time.values) == [0.0, 1.0, 2.0]
    assert "save_every = 1.0" in ds.attrs["config"] and "batch_size = 4\n" in ds.attrs["config"]


def test_save_every_must_be_a_whole_number_of_sgd_steps():
    problem = build_problem("mlp", n=16, depth=1, width=4)

    def simulate(dynamics, save_every, t1=1.0):
        return fs.simulate(problem, dynamics, t1=t1, save_every=save_every, observe=(), progress=False)

    whole = r"^run\.save_every: got 0\.15; expected a whole number of DiscreteSGD steps of Δt = 0\.1, "
    with pytest.raises(fs.ConfigError, match=whole + r"the nearest being 0\.1, 0\.2$"):
        simulate(fs.DiscreteSGD(lr=0.1), 0.15)
    with pytest.raises(fs.ConfigError, match=r"= 0\.1, the nearest being 0\.1$"):
        simulate(fs.DiscreteSGD(lr=0.1), 0.05)
    with pytest.raises(fs.ConfigError, match=r"DiscreteSGD steps of Δt = 0\.05, the nearest being 0\.1, 0\.15$"):
        simulate(fs.DiscreteSGD(lr=0.1, momentum=0.5, dampening=0.5), 0.12)
    # whole numbers of steps up to round-off are taken, and saved at exact multiples of Δt
    assert list(simulate(fs.DiscreteSGD(lr=0.03), 0.3).step.values) == [0, 10, 20, 30, 33]
    assert list(simulate(fs.DiscreteSGD(lr=0.1), 0.2 * (1 + 1e-12)).step.values) == [0, 2, 4, 6, 8, 10]


def test_momentum_and_dampening_below_one():
    for make in (
        lambda **kw: fs.DiscreteSGD(lr=0.1, **kw),
        lambda **kw: fs.MomentumFlow(lr=0.1, **{"momentum": 0.5, **kw}),
    ):
        for name, value in [("momentum", 1.0), ("momentum", 1.5), ("momentum", -0.1), ("dampening", 1.0), ("dampening", 2.0)]:
            with pytest.raises(fs.ConfigError, match=rf"^dynamics\.{name}: got {value}; expected a number"):
                make(**{name: value})
    assert fs.DiscreteSGD(lr=0.1, momentum=0.99, dampening=0.5).time_step == 0.05


def test_a_fixed_step_longer_than_the_save_interval_is_refused(tmp_path):
    problem = build_problem("mlp", n=16, depth=1, width=4)
    noise = fs.SGDNoise(lr=0.1, batch_size=4)
    cases = [
        (fs.GradientFlow(), ODE("rk4", step_size=0.2), "integrator.step_size", "linear interpolations"),
        (fs.GradientFlow(), RK("euler", step_size=0.2), "integrator.step_size", "linear interpolations"),
        (fs.GradientFlow(), Exponential(step_size=0.2), "integrator.step_size", "cut to the interval"),
        (noise, FusedEulerMaruyama(dt=0.2), "integrator.dt", "cut to the interval"),
        (noise, SDE("euler", dt=0.2), "integrator.dt", "cut to the interval"),
        (fs.SGDNoise(lr=0.2, batch_size=4), None, "integrator.dt", "cut to the interval"),  # the default dt = lr
    ]
    for dynamics, integrator, field, why in cases:
        with pytest.raises(fs.ConfigError, match=rf"^{field}: got 0\.2; expected at most the save interval 0\.1 \(.*{why}"):
            fs.simulate(problem, dynamics, integrator, t1=0.5, save_every=0.1, out=tmp_path / "r.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []
    # a step equal to the interval, a shorter last interval, or an adaptive SDE's first step: taken
    ds = fs.simulate(problem, fs.GradientFlow(), ODE("rk4", step_size=0.1), t1=0.25, save_every=0.1, progress=False)
    assert ds.attrs["status"] == "completed" and ds.sizes["time"] == 4
    ds = fs.simulate(problem, noise, SDE("euler", dt=0.2, adaptive=True), t1=0.1, save_every=0.1, progress=False)
    assert ds.attrs["status"] == "completed"


def test_a_cpu_index_other_than_0_is_refused():
    problem = build_problem("mlp", n=16, depth=1, width=4)
    for device in ("cpu:3", torch.device("cpu", 1)):
        with pytest.raises(fs.ConfigError, match=r"^run\.device: got 'cpu:\d'; expected 'cpu'"):
            fs.simulate(problem, fs.GradientFlow(), t1=0.1, save_every=0.1, device=device, progress=False)
    ds = fs.simulate(problem, fs.GradientFlow(), t1=0.1, save_every=0.1, device="cpu:0", progress=False)
    assert ds.attrs["status"] == "completed"


def test_every_flowsim_error_is_one_line_in_the_cli(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "plain.txt"
    plain.write_text("hello\n")
    assert main(["info", str(plain)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("flowsim: error: run: "), err

    def multi_line(args):
        raise fs.RecordError("run: broken (OSError: first\nsecond\n\nthird)")

    args = cli.parser().parse_args(["info", "x"])
    args.func = multi_line
    monkeypatch.setattr(cli.argparse.ArgumentParser, "parse_args", lambda self, argv=None: args)
    assert main(["info", "x"]) == 2
    assert capsys.readouterr().err == "flowsim: error: run: broken (OSError: first; second; third)\n"


def test_runs_that_would_never_end_are_refused():
    """t1 beyond 1e9 time units, more than 1e10 SGD steps, or a fixed step that needs more than
    1e10 steps to t1: refused before any work, naming the field."""
    problem = build_problem("mlp", n=16, depth=1, width=4)
    cases = [
        (lambda: fs.simulate(problem, fs.GradientFlow(), t1=1e300, save_every=1e299), "run.t1"),
        (lambda: fs.simulate(problem, fs.DiscreteSGD(lr=1e-300), t1=1.0, save_every=0.5), "run.t1"),
        (lambda: fs.simulate(problem, fs.GradientFlow(), ODE("euler", step_size=1e-12), t1=1e3, save_every=1e2), "integrator.step_size"),
    ]
    for call, field in cases:
        with pytest.raises(fs.ConfigError, match=rf"^{field}: got .*expected at most"):
            call()


def test_ensembles_are_checked_before_any_work():
    problem = build_problem("mlp", n=16, depth=1, width=4)
    sgd = fs.DiscreteSGD(lr=0.1)
    with pytest.raises(fs.ConfigError, match=r"^run\.ensemble: .* would take .* GiB"):
        fs.simulate(problem, sgd, t1=0.2, save_every=0.1, ensemble=10**15, progress=False)
    start = torch.zeros(2, problem.n_params, dtype=torch.float64)
    start[1, 3] = float("nan")
    with pytest.raises(fs.ModelError, match=r"^run\.ensemble: .*non-finite"):
        fs.simulate(problem, sgd, t1=0.2, save_every=0.1, ensemble=start, progress=False)
    with pytest.raises(fs.ConfigError, match=r"^run\.member_seeds\[1\]: got -1"):
        fs.simulate(problem, sgd, t1=0.2, save_every=0.1, ensemble=2, member_seeds=[0, -1], progress=False)


def test_problem_gaps_the_law_audit_hit():
    """Integer token inputs stay integers (an nn.Embedding model works); a 0-dim Parameter is a
    parameter like any other; a model whose training-mode output is random (dropout) is refused,
    its gradient not being ∇L; detect refuses a loss flowsim does not integrate."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 4), nn.Linear(4, 3)
            self.temperature = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.head(self.embed(x).mean(1)) * self.temperature

    X, y = torch.randint(0, 5, (12, 6)), torch.randint(0, 3, (12,))
    problem = fs.Problem(Tokens(), (X, y))
    assert problem.X.dtype == torch.long and problem.to(dtype=torch.float64).X.dtype == torch.long
    assert torch.Size([]) in problem.shapes and problem.n_params == 5 * 4 + 4 * 3 + 3 + 1
    ds = fs.simulate(problem, fs.GradientFlow(), t1=0.2, save_every=0.1, progress=False)
    assert ds.attrs["status"] == "completed" and ds.sizes["quantity"] > 0
    dropping, inputs = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval(), torch.randn(12, 4)
    state = torch.random.get_rng_state()
    with pytest.raises(fs.ModelError, match=r"^model: gives different outputs .* \(dropout"):
        fs.Problem(dropping, (inputs, y))
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves the caller's generator alone
    fs.Problem(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.Linear(8, 3)), (torch.randn(12, 4), y))
    for loss in ("nll", "cross_entropie"):
        with pytest.raises(fs.ConfigError, match=rf"^problem\.loss: got '{loss}'"):
            fs.laws.detect(nn.Linear(4, 3), loss=loss, inputs=torch.randn(2, 4))

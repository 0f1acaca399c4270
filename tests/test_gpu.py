"""The GPU path: every dynamics and integrator on device="cuda" (skipped without CUDA).

Each case runs on the GPU and on the CPU from the same θ0 and compares the records: float64 to
1e-8 relative, float32 to 1e-3 (different kernels sum in different orders). The hot loop must
not synchronise with the host between save points (DESIGN §7): checked with
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_problem, relative

import flowsim as fs
from flowsim.ensemble import Ensemble, initial_members
from flowsim.integrators import ODE, SDE, Discrete, FusedEulerMaruyama

pytestmark = pytest.mark.gpu

CASES = {
    "gradient_flow_dopri5": (fs.GradientFlow(), ODE("dopri5", rtol=1e-6, atol=1e-6), {}),
    "gradient_flow_rk4": (fs.GradientFlow(), ODE("rk4", step_size=0.05), {}),
    "sgd_momentum": (fs.DiscreteSGD(lr=0.05, batch_size=16, momentum=0.9), Discrete(), {}),
    "sde_fused": (fs.SGDNoise(lr=0.05, batch_size=16, paths=2), FusedEulerMaruyama(dt=0.05), {}),
    "sde_torchsde": (fs.SGDNoise(lr=0.05, batch_size=16), SDE("euler", dt=0.05), {}),
    "ensemble_flow": (fs.GradientFlow(), ODE("rk4", step_size=0.05), {"ensemble": 3}),
    "ensemble_sgd": (fs.DiscreteSGD(lr=0.05, batch_size=16), Discrete(), {"ensemble": 3}),
}
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_cpu(gpu, case, dtype):
    dynamics, integrator, extra = CASES[case]
    problem = build_problem(n=64, weight_decay=1e-3)
    run = dict(t1=0.5, save_every=0.25, dtype=dtype, observe=("loss", "params"), progress=False, **extra)
    on_gpu = fs.simulate(problem, dynamics, integrator, device=gpu, **run)
    on_cpu = fs.simulate(problem, dynamics, integrator, device="cpu", **run)
    assert on_gpu.attrs["device"].startswith("cuda") and on_gpu.attrs["status"] == "completed"
    if case.startswith("sde"):
        # the Brownian increments come from the device's generator (CUDA's Philox, not the CPU's
        # Mersenne twister): another realisation. The GPU run repeats itself bit for bit, starts
        # where the CPU run starts, and its loss stays within the noise of the CPU's (two CPU
        # seeds: 0.07–0.2% apart; the drift alone moves the loss by 2%)
        again = fs.simulate(problem, dynamics, integrator, device=gpu, **run)
        assert (again.params.values == on_gpu.params.values).all()
        assert relative(on_gpu.params.isel(time=0).values, on_cpu.params.isel(time=0).values) < TOLERANCE[dtype]
        assert relative(on_gpu.loss.values, on_cpu.loss.values) < 5e-3
        return
    for name in ("params", "value", "loss"):
        assert relative(on_gpu[name].values, on_cpu[name].values) < TOLERANCE[dtype], name


def test_no_host_sync_between_save_points(gpu):
    """A vector-field evaluation, an SGD step inside an epoch and an ensemble gradient never wait for the host."""
    problem = build_problem(n=64).to(device=gpu, dtype=torch.float32)
    theta = problem.initial_theta()
    flow, sgd = fs.GradientFlow(), fs.DiscreteSGD(lr=0.05, batch_size=16, momentum=0.9)
    t = torch.zeros((), dtype=torch.float64, device=gpu)
    state = sgd.step(problem, sgd.term(problem, theta).init, 0, seed=0).state  # the epoch's order is on the GPU now
    ensemble = Ensemble(problem, 3)
    members = initial_members(problem, 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flow.derivative(problem, t, theta)
        for k in range(1, 4):
            state = sgd.step(problem, state, k, seed=0).state
        ensemble.loss_and_grad(members)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(state.theta).all()

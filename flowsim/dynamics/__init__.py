"""WHAT moves: the continuous models of training and true discrete SGD.

Time is t = k·η(1−d) for step k of SGD (learning rate η, dampening d); L_λ = L + (λ/2)|θ|²
with λ the problem's weight decay, and g = ĝ + λθ with ĝ the data-loss gradient.

| dynamics      | equation                                                             |
|---------------|----------------------------------------------------------------------|
| GradientFlow  | θ' = −g(θ)                                                           |
| DiscreteSGD   | v ← βv + (1−d)(ĝ_B + λθ)  (v ← ĝ_B + λθ on the first step);           |
|               | θ ← θ − η v  (Nesterov: θ ← θ − η(ĝ_B + λθ + βv)); PyTorch's SGD     |
| DiscreteAdam  | m ← β₁m + (1−β₁)g, s ← β₂s + (1−β₂)g², g = ĝ_B + λθ; step n = k + 1:  |
|               | θ ← θ − η m̂/(√ŝ + ε), m̂ = m/(1−β₁ⁿ), ŝ = s/(1−β₂ⁿ); PyTorch's Adam |
| ModifiedFlow  | θ' = −∇L̃, L̃ = L_λ + (η/4)|g|²: θ' = −g − (η/2)(H + λ)g, g = ĝ + λθ    |
| MomentumFlow  | (h/2)(1+β)θ'' + (1−β)θ' = −g, h = η(1−d); state (θ, v = θ')           |
| SGDNoise      | dθ = b dt + √η G dW, G Gᵀ = (c/S) Cov_i[∇ℓ_i], b = −g or −∇L̃         |
| CentralFlow   | θ' = −(g + ½∇³L[Σ]), Σ at the edge of stability (GD's oscillation)   |

Bound to a problem and θ0, a dynamics hands its integrator a *term* (flowsim.terms):
``term_type`` says which kind before anything is bound, ``term(problem, theta0)`` builds it.
A flow gives a VectorField (``derivative``, ``split``), MomentumFlow a Semilinear one,
SGDNoise a Noise term, DiscreteSGD and DiscreteAdam a StepMap. Which integrator runs a term
by default is flowsim.defaults' table. One file per dynamics (base.py: what they share);
adding one is a file here and a line in DYNAMICS below.
"""


from __future__ import annotations

from .adam import AdamState, DiscreteAdam
from .base import ContinuousDynamics, Dynamics, SemilinearDynamics
from .central import CentralFlow
from .flows import GradientFlow, ModifiedFlow
from .momentum import MomentumFlow
from .noise import SGDNoise
from .sgd import DiscreteSGD, SGDState

#: the dynamics a config may name
DYNAMICS: dict[str, type[Dynamics]] = {
    "GradientFlow": GradientFlow,
    "ModifiedFlow": ModifiedFlow,
    "MomentumFlow": MomentumFlow,
    "DiscreteSGD": DiscreteSGD,
    "DiscreteAdam": DiscreteAdam,
    "SGDNoise": SGDNoise,
    "CentralFlow": CentralFlow,
}

__all__ = [
    "Dynamics",
    "ContinuousDynamics",
    "SemilinearDynamics",
    "GradientFlow",
    "ModifiedFlow",
    "MomentumFlow",
    "DiscreteSGD",
    "SGDState",
    "DiscreteAdam",
    "AdamState",
    "SGDNoise",
    "CentralFlow",
    "DYNAMICS",
]

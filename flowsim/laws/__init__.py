"""Laws: the quantities a network's symmetries conserve under gradient flow.

- `law` (``Law``, ``Term``, ``LawSet``, ``gradient_check``): what a law is, its value and its
  companions as sparse matrices over θ, and the check ⟨∇Q(θ), ∇L(θ)⟩ = 0;
- `detection` (``detect``): the laws of an ``nn.Module``, found on its torch.fx graph;
- `counting` (``count``): how many independent laws there are (the rank of a Lie algebra of
  fields), to show the detected ones complete; ``count_blocks``: the same block by block, for
  models above count's size limit (the submodule theorem).
"""

from .counting import BlockCount, BlockLawCount, LawCount, count, count_blocks
from .detection import detect
from .law import FORMS, KINDS, Law, LawSet, Term, gradient_check, gram_labels

__all__ = ["BlockCount", "BlockLawCount", "FORMS", "KINDS", "Law", "LawCount", "LawSet", "Term", "count", "count_blocks", "detect", "gradient_check", "gram_labels"]

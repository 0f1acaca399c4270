"""One benchmark script on this tree and on another commit, side by side, alternating.

    python benchmarks/versus.py COMMIT SCRIPT [ARGS...] [--rounds 2]

e.g. ``python benchmarks/versus.py e593acd sgd_recording.py --steps 300 --repeats 7``. The
commit is checked out as a git worktree in a temporary folder and imported first on
PYTHONPATH (its ``integrators/`` and ``models/`` linked in as ``flowsim.integrators`` and
``flowsim.models``, as pyproject's package-dir installs them); the script runs from each tree's
own ``benchmarks/``, the two trees taking turns `rounds` times, so that load drifting over the
session hits both. Each script prints its own ratios to the plain PyTorch baseline, which is the
figure to compare between the trees (a ratio within one run cancels the machine's load).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout(commit: str, folder: Path) -> Path:
    """A worktree of `commit` in `folder`, importable as flowsim from PYTHONPATH."""
    tree = folder / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
    for name in ("integrators", "models"):
        (tree / "flowsim" / name).symlink_to(Path("..") / name)
    return tree


def run(tree: Path, script: str, args: list[str], pythonpath: str | None) -> str:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, script, *args], cwd=tree / "benchmarks", env=env, capture_output=True, text=True)
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit")
    parser.add_argument("script")
    parser.add_argument("--rounds", type=int, default=2)
    known, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        old = checkout(known.commit, Path(folder))
        try:
            for r in range(known.rounds):
                for label, tree, path in ((known.commit, old, str(old)), ("this tree", ROOT, None)):
                    print(f"===== round {r + 1}, {label}", flush=True)
                    print(run(tree, known.script, rest, path), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)


if __name__ == "__main__":
    main()

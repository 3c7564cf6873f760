"""Execute the notebooks and save them with their outputs (plots as interactive plotly + static PNG), so they
read on a code host without running. CI executes them again in the slow tier (tests/test_notebooks.py).

    python scripts/execute_notebooks.py            # all, small settings (CPU, a few minutes each)
    python scripts/execute_notebooks.py notebooks/02_steering_and_evaluation.ipynb
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def main(paths: list[str]) -> None:
    nbs = [Path(p) for p in paths] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in nbs:
        t = time.time()
        nb = nbformat.read(path, as_version=4)
        with tempfile.TemporaryDirectory() as scratch:  # the notebook's own artifacts don't land in the repo
            NotebookClient(nb, timeout=1800, kernel_name="python3",
                           resources={"metadata": {"path": scratch}}).execute()
        nbformat.write(nb, path)
        print(f"{path.name}: executed and saved in {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

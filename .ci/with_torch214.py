"""Run ``python ARGS...`` with torch 2.14's interpreter: tox's torch214 one, else this env's own.

``tox -e docs`` and ``tox -e type`` need torch and featurescope but should not install torch
(~5.5 GB) a second time during a full ``tox`` run. When ``torch214`` exists its interpreter is
reused, with this checkout's ``src`` first on the path so the current code is what gets
documented or checked. On a fresh clone (no torch214 yet) the calling environment installs
what it needs itself, once: the pinned torch and torchvision and ``.[EXTRAS]``.

Usage: python .ci/with_torch214.py TORCH214_PYTHON EXTRAS PIN [PIN ...] -- ARGS...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    split = argv.index("--")
    reuse, extras, *pins = argv[:split]
    args = argv[split + 1 :]
    python = Path(reuse)
    if python.exists():
        print(f"with_torch214: reusing {python}", flush=True)
    else:
        python = Path(sys.executable)
        marker = Path(sys.prefix) / ".featurescope-installed"
        wanted = " ".join([extras, *pins])
        if not marker.exists() or marker.read_text() != wanted:
            print(f"with_torch214: no {reuse}; installing {wanted} here", flush=True)
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", *pins, f"{ROOT}[{extras}]"],
                check=True,
            )
            marker.write_text(wanted)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run([str(python), *args], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

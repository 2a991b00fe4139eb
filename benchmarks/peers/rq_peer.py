"""Drive one RQ round through `rq_driver.py`, under an interpreter that has RQ 2.12.

RQ 3.0 (what pip resolves next to this project) strands a depends_on join when two workers
finish its dependencies at the same moment, and this project itself needs RQ 3, so the peer
runs RQ 2.12 in a virtualenv of its own, made on first use under the data folder
(`<data>/bench/venv-rq-2.12`), or under the interpreter given as --rq-python.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

from benchmarks.common import Round, RoundSpec, bench_dir, say

RQ_VERSION = "2.12.0"


def rq_python(given: str | None = None) -> str:
    """An interpreter with RQ 2.x, creating the bench's own virtualenv when none is given."""
    if given:
        return given
    home = bench_dir() / f"venv-rq-{RQ_VERSION.rsplit('.', 1)[0]}"
    python = home / "bin" / "python"
    if _rq_version(python) != RQ_VERSION:
        say(f"  creating {home} with rq=={RQ_VERSION} (once)")
        venv.create(home, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"rq=={RQ_VERSION}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return str(python)


def _rq_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import rq; print(rq.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def run_round(spec: RoundSpec) -> Round:
    python = rq_python(spec.options.get("rq_python"))
    driver = Path(__file__).with_name("rq_driver.py")
    logs = bench_dir() / "logs"
    logs.mkdir(exist_ok=True)
    with (logs / f"{spec.label}.log").open("wb") as log:
        done = subprocess.run(
            [
                python,
                str(driver),
                spec.url,
                "--runs",
                str(spec.runs),
                "--workers",
                str(spec.workers),
                "--timeout",
                str(spec.timeout),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            check=False,
            timeout=spec.timeout + 120,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the RQ driver exited with {done.returncode}; see {log.name}")
    out = json.loads(done.stdout)
    if out["unfinished"]:
        raise RuntimeError(
            f"RQ {out['rq_version']}: {out['unfinished']} of {spec.runs} runs never finished"
        )
    return Round(
        "rq", spec.runs, 4, out["elapsed_s"], out["latencies_s"], note=f"rq {out['rq_version']}"
    )


if __name__ == "__main__":
    print(rq_python(sys.argv[1] if len(sys.argv) > 1 else None))

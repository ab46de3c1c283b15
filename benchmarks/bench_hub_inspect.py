"""`fusesurgery inspect org/name` and key-level `fusesurgery diff` of a Llama-3.1-405B-shaped
safetensors repo on a Hub (the local fake Hub of the test suite, tests/hub_server.py), as whole
processes, against what a user would otherwise run: a script calling huggingface_hub's
`get_safetensors_metadata` (header-only too, but no architecture, sizes or config), and
`fusesurgery inspect DIR` of the same checkpoint on local disk.

The checkpoint is the sparse one of bench_startup.py (every tensor in the headers, data regions
that are holes: 812 GB apparent, no disk cost), served by range from disk. Each run starts with
an empty huggingface_hub cache. Reported per contender: median wall time over rounds (order
rotated each round), the requests it made and the bytes the server sent, against the repo's
size. The claim checked: a 400B repo inspected in seconds, with under 1 MB fetched.

Usage: python benchmarks/bench_hub_inspect.py [--rounds 5] [--preset llama3_1_405b]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bench_startup import build_checkpoint, fusesurgery_command  # noqa: E402

from tests.hub_server import FakeHub  # noqa: E402

TOKEN = "hf_bench_read"
METADATA_SCRIPT = """
import sys
from huggingface_hub import HfApi
api = HfApi(endpoint=sys.argv[1])
meta = api.get_safetensors_metadata(sys.argv[2])
print(sum(sum(m.parameter_count.values()) for m in meta.files_metadata.values()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3_1_405b")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cli = fusesurgery_command()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local"
        build_checkpoint(local, args.preset)
        apparent = sum(f.stat().st_size for f in local.iterdir())
        with FakeHub({TOKEN: {"name": "bench", "write": False}}) as hub:
            hub.add_local_repo("bench/big", local)
            hub.add_local_repo("bench/big2", local)
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
                       HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
            contenders = {
                "fusesurgery inspect bench/big": [*cli, "inspect", "bench/big"],
                "fusesurgery diff bench/big bench/big2": [*cli, "diff", "bench/big",
                                                          "bench/big2"],
                "get_safetensors_metadata script": [sys.executable, "-c", METADATA_SCRIPT,
                                                    hub.url, "bench/big"],
                "fusesurgery inspect LOCAL_DIR": [*cli, "inspect", str(local)],
            }
            names = list(contenders)
            times: dict[str, list[float]] = {name: [] for name in names}
            traffic: dict[str, tuple[int, int]] = {}
            print(f"{args.preset}: {len(list(local.glob('*.safetensors')))} shards, "
                  f"{apparent / 1e9:.0f} GB apparent; {args.rounds} rounds")
            for round_index in range(args.rounds):
                order = names[round_index % len(names):] + names[:round_index % len(names)]
                for name in order:
                    home = Path(tmp) / f"home-{round_index}-{names.index(name)}"
                    hub.clear_log()
                    start = time.perf_counter()
                    run = subprocess.run(contenders[name], env={**env, "HF_HOME": str(home)},
                                         capture_output=True, text=True)
                    times[name].append(time.perf_counter() - start)
                    # diff exits 1 (a difference) only if the two copies differ: they do not
                    if run.returncode != 0:
                        raise SystemExit(f"{name} exited {run.returncode}: {run.stderr[-2000:]}")
                    traffic[name] = (len(hub.requests), sum(r.sent for r in hub.requests))
                    shutil.rmtree(home, ignore_errors=True)
        print(f"\n{'contender':<40} {'median s':>9} {'best s':>7} {'requests':>9} "
              f"{'bytes sent':>11} {'of repo':>9}")
        for name in names:
            requests, sent = traffic[name]
            share = f"{sent / apparent:.1e}" if "LOCAL" not in name else "-"
            print(f"{name:<40} {statistics.median(times[name]):9.2f} {min(times[name]):7.2f} "
                  f"{requests:9d} {sent:11,d} {share:>9}")


if __name__ == "__main__":
    main()

"""Two servers up at once, load alternated in bursts: this tree against a revision, or two settings.

    python bench/ab.py REV [--clients 32] [--bursts 10] [--seconds 4] [--env LCNET_X=1 ...]
    python bench/ab.py --other-env LCNET_SOLO_THREADS=1 [--clients 1] [--protocol grpc]
    python bench/ab.py --other-protocol body          # one server, two ways to send the JPEG
    python bench/ab.py REV --clients 8 --beside png   # and one client sending large images
    python bench/ab.py REV --clients 8 --image photo  # every client sending 12 MP photos

With REV (a commit, branch or tag), checks it out in a temporary git worktree and serves the same
model (x1.0 with random weights and INT8, guard skipped, defaults otherwise) from both trees, each
worker importing its own tree's code; without, both servers run this tree and the other one adds
``--other-env``; with only ``--other-protocol``, one server is both sides, loaded the two ways.
``--env`` goes to both. Then it loads them in turn with N closed-loop clients
sending the 500×375 JPEG (HTTP: to /classify; gRPC: Classify, a channel each), in short bursts
whose order alternates, and prints each pair's throughput ratio (this ÷ the other), their median
and how many pairs this one won. With ``--beside KIND`` one more client sends large images
(``common.large_image``) in every burst, and the JPEG clients' p99 latencies are compared too:
what a large upload does to everyone else's requests. ``--image KIND`` has every client send a
large image instead of the JPEG.

Why bursts: this machine's speed drifts by tens of percent within minutes, and two servers
measured one after the other compare two machines (in one A/B of whole runs, the same change
read 0.82–1.06×; in 4 s bursts, 0.91–1.10× around a median of 1.07). An idle server takes no
CPU, so both wait side by side. Bounded by --seconds and --max-requests per burst.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import (
    LARGE_KINDS,
    PROTOCOLS,
    ROOT,
    cpu_kind,
    large_image,
    load,
    make_store,
    photo_jpeg,
    rotated,
    servers_up,
)

from lcnet_runner.testing import Server


@contextmanager
def checkout(revision: str | None) -> Iterator[Path]:
    """``revision`` checked out (detached) in a temporary git worktree, removed afterwards;
    None: this tree."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="lcnet-ab-") as scratch:
        folder = Path(scratch) / "tree"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", "-q", str(folder), revision], check=True)
        try:
            yield folder
        finally:
            subprocess.run([*git, "remove", "--force", str(folder)], check=False)


def serve(tree: Path, tag: str, env: dict[str, str]) -> Server:
    # PYTHONPATH first: the tree's own lcnet_runner, not the installed (editable) one.
    return Server(str(tree), {"LCNET_MODEL": tag, "LCNET_SKIP_GUARD": "1",
                              "PYTHONPATH": str(tree), **env})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", nargs="?", help="what this tree is compared with, e.g. main")
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--bursts", type=int, default=10, help="pairs of bursts")
    parser.add_argument("--seconds", type=float, default=4.0, help="per burst")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per burst")
    parser.add_argument(
        "--env", action="extend", nargs="+", default=[], help="KEY=VALUE for both servers"
    )
    parser.add_argument(
        "--other-env", action="extend", nargs="+", default=[], help="KEY=VALUE for the other"
    )
    parser.add_argument("--other-protocol", choices=PROTOCOLS, help="how the other is loaded")
    parser.add_argument("--beside", choices=LARGE_KINDS, help="one more client, large images")
    parser.add_argument("--image", choices=LARGE_KINDS, help="what every client sends instead")
    args = parser.parse_args()
    print(cpu_kind())
    if not (args.revision or args.other_env or args.other_protocol):
        parser.error("name a revision, --other-env or --other-protocol to compare with")
    env = dict(item.split("=", 1) for item in args.env)
    other_env = {**env, **dict(item.split("=", 1) for item in args.other_env)}
    other = " ".join(filter(None, [args.revision, *args.other_env, args.other_protocol]))

    tag = make_store(args.model, int8=True)
    image = large_image(args.image) if args.image else photo_jpeg()
    with checkout(args.revision) as tree:
        starts = {"this": lambda: serve(ROOT, tag, env)}
        if args.revision or args.other_env:
            starts[other] = lambda: serve(tree, tag, other_env)
        with servers_up(starts) as servers:
            other_server = servers.get(other, servers["this"])  # only a protocol: one server
            sides = {"this": (servers["this"], args.protocol),
                     other: (other_server, args.other_protocol or args.protocol)}  # fmt: skip
            compare(sides, image, args)


def compare(sides: dict[str, tuple[Server, str]], image: bytes, args: argparse.Namespace) -> None:
    """``sides``: name → (server, protocol), two of them, loaded in alternated bursts."""

    beside = large_image(args.beside) if args.beside else None

    def burst(name: str, seconds: float) -> dict:
        server, protocol = sides[name]
        return load(server, protocol, image, args.clients, seconds, args.max_requests,
                    beside=beside)  # fmt: skip

    this, other = sides
    for name in sides:  # warm-up: the first requests of a server are its slowest
        burst(name, 1.0)
    ratios, p99_ratios = [], []
    for i in range(args.bursts):
        got = {name: burst(name, args.seconds) for name in rotated((this, other), i)}
        ratios.append(got[this]["rps"] / got[other]["rps"])
        p99_ratios.append(got[this]["p99_ms"] / got[other]["p99_ms"])
        errors = sum(
            side["errors"] + side.get("beside", {}).get("errors", 0) for side in got.values()
        )
        print(f"burst {i}: this {_side(got[this])} | {other} {_side(got[other])}"
              f" | ratio {ratios[-1]:.3f}, errors {errors}", flush=True)  # fmt: skip
    clients = f"{args.clients} {args.protocol} clients" + (
        f" beside {args.beside}" if beside else ""
    )
    print(f"{clients}: this ÷ {other} = {_median(ratios)}; this ahead in "
          f"{sum(ratio > 1 for ratio in ratios)}")  # fmt: skip
    if beside:
        print(f"p99 of the JPEG clients, this ÷ {other} = {_median(p99_ratios)}; this lower in "
              f"{sum(ratio < 1 for ratio in p99_ratios)}")  # fmt: skip


def _side(got: dict) -> str:
    text = f"{got['rps']:6.1f} req/s, p50 {got['p50_ms']:6.1f} ms, p99 {got['p99_ms']:6.1f} ms"
    if "beside" in got:
        text += f", large {got['beside']['rps']:4.1f}/s"
    return text


def _median(ratios: list[float]) -> str:
    return (f"{statistics.median(ratios):.3f} (median of {len(ratios)} pairs, "
            f"{min(ratios):.2f}–{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()

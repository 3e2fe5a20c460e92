"""Our server against its peers, side by side in one run: PaddleX 3 basic serving and the
BentoML service a user would write around our Predictor.

    python bench/vs_peers.py [--seconds 8] [--clients 1,8,32] [--rounds 3] [--paddlex-python PATH]

One exported PP-LCNet x1.0 (seeded random weights, 1000 classes: speed does not depend on them),
one 500×375 JPEG, and one load generator for every server: a single asyncio process of N
closed-loop clients on loopback (raw HTTP/1.1 keep-alive, a new connection every
--requests-per-connection requests), each level bounded by --seconds and --max-requests, after
a 1 s warm-up. Each server runs at its own defaults, as a user would start it:
  ours        `bentoml serve .` (2 workers × 1 thread, `auto`: the fastest variant here; random
              weights, so the accuracy guard is skipped, LCNET_SKIP_GUARD=1); multipart POST
              /classify. Also, unless --no-paddle-row, with LCNET_ENGINE=paddle (Paddle fp32,
              PaddleX's engine).
  idiomatic   bench/peers/idiomatic_service.py: `@bentoml.api(batchable=True,
              max_batch_size=16)` around our Predictor, same 2 workers × 1 thread, same store
              model; multipart POST /classify with the file in `images`.
  PaddleX     `paddlex --serve --pipeline <config>` (PaddleX 3.7.2, Paddle Inference, its default
              threads) loading the exported folder, visualisation off, on 127.0.0.1, in a venv of
              the benchmark's own ($LCNET_CACHE/bench/paddlex-venv, created on first run; or
              --paddlex-python) with its class_ids bug fixed (bench/peers/paddlex_serving.py);
              JSON POST /image-classification {"image": <base64>, "topk": 1}.
Each round starts every server afresh and keeps them all up; only one is loaded at a time (an
idle server takes no CPU): the client counts in rising order, each for every server in turn, in an
order rotated by round and level. This machine's speed drifts by tens of percent within minutes:
servers restarted one after the other put minutes between the figures compared (session 9: ours
÷ idiomatic 1.07 / 1.25 / 1.26 across rounds), here seconds. Fresh servers each round, because a
server's history shows: the idiomatic service answered 1 client at a p50 of ~70 ms once it had
served 32 (BentoML's batching keeps waiting for batches that no longer come; 12 ms fresh).
Every request body is built once. Non-2xx answers are errors and printed. Prints req/s, p50 and
p99 per server and client count (medians over --rounds), then ours ÷ PaddleX and ours ÷
idiomatic, the latter also per round, and /proc/loadavg at each round.
Goals: ≥ 3× PaddleX and ≥ 1.3× idiomatic at 32 clients, a lower p50 than PaddleX at 1 client.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import (
    ROOT,
    closed_loop,
    cpu_kind,
    make_store,
    multipart,
    photo_jpeg,
    post,
    rotated,
    scratch_dir,
    servers_up,
)
from peers.paddlex_serving import PaddleXServer, patch, pipeline_config, venv_python

PEERS = Path(__file__).resolve().parent / "peers"


@dataclass
class Peer:
    name: str
    kind: str  # ours | idiomatic | paddlex
    env: dict[str, str]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def request_for(kind: str, image: bytes, port: int) -> bytes:
    """The one request each server gets, replayed (its own format, the same JPEG)."""
    if kind == "paddlex":
        body = json.dumps({"image": base64.b64encode(image).decode(), "topk": 1}).encode()
        return post(port, "/image-classification", "application/json", body)
    return multipart([image], port, "/classify", field="images" if kind == "idiomatic" else "image")


def check(port: int, request: bytes) -> str:
    """Send the request once and return the answer's body; raise unless it is a 2xx."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if not 200 <= status < 300:
        raise RuntimeError(f"HTTP {status}: {body[:500]!r}")
    return body.decode(errors="replace")


def start(peer: Peer, tag: str, paddlex: tuple[Path, Path] | None):
    """Start ``peer`` on a free loopback port (``servers_up`` waits until it is ready)."""
    from lcnet_runner.testing import Server, free_port

    if peer.kind == "paddlex":
        python, config = paddlex
        return PaddleXServer(python, config, free_port(), peer.env)
    if peer.kind == "ours":
        target, cwd = str(ROOT), None
    else:
        target, cwd = "idiomatic_service:Classifier", PEERS
    env = {"LCNET_MODEL": tag, "LCNET_SKIP_GUARD": "1", **peer.env}
    return Server(target, env, cwd=cwd)


def checked_request(peer: Peer, server, image: bytes) -> bytes:
    """The request ``peer`` gets, sent once and its answer shown."""
    request = request_for(peer.kind, image, server.http_port)
    print(f"{peer.name}: answers {check(server.http_port, request)[:160]}")
    return request


def measure(name: str, port: int, request: bytes, clients: int, args) -> dict:
    """One server loaded at one level, after a 1 s warm-up (which also lets the previous
    server's threads settle)."""
    closed_loop(port, request, clients, 1.0, 200)
    r = closed_loop(port, request, clients, args.seconds, args.max_requests,
                    args.requests_per_connection)  # fmt: skip
    bad = {s: n for s, n in r["statuses"].items() if not 200 <= s < 300}
    print(f"  {name:28s} {clients:3d} clients: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms"
          f"  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}" + (f" {bad}" if bad else ""),
          flush=True)  # fmt: skip
    return r


def user_environment(saved: dict[str, str]) -> None:
    """Undo what importing Paddle here did to the environment the servers inherit (it sets
    OMP_NUM_THREADS=1 when unset): every server starts as from the user's shell, plus the
    benchmark's BentoML home."""
    for key in set(os.environ) - set(saved) - {"BENTOML_HOME"}:
        del os.environ[key]
    os.environ.update({k: v for k, v in saved.items() if k != "BENTOML_HOME"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="PPLCNet_x1_0")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load level")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per load level")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3, help="medians over rounds")
    parser.add_argument("--requests-per-connection", type=int, default=5)
    parser.add_argument(
        "--paddlex-python",
        type=Path,
        help="an interpreter with paddlex "
        "installed (default: a venv of the benchmark's own, made on first run)",
    )
    parser.add_argument("--no-paddle-row", action="store_true",
                        help="skip ours with --engine paddle")  # fmt: skip
    args = parser.parse_args()
    print(cpu_kind())
    levels = [int(c) for c in args.clients.split(",")]
    saved = dict(os.environ)

    from lcnet_runner import Predictor
    from lcnet_runner.artifact import cache_dir, load_artifact, paddlex_model_name

    python = args.paddlex_python or venv_python(cache_dir() / "bench" / "paddlex-venv")
    print(f"PaddleX: {patch(python)}")
    tag = make_store(args.model, int8=True)
    folder = load_artifact(tag).path
    config = pipeline_config(folder, paddlex_model_name(args.model), scratch_dir())
    image = photo_jpeg()
    # What `auto` serves at 1 thread: raced once here, read from the cache by both BentoML servers.
    choice = Predictor(tag, threads=1, skip_guard=True).choice
    print(f"auto serves {choice.describe()}")
    auto = f"{choice.variant.engine}/{choice.variant.precision}"
    user_environment(saved)

    peers = [
        Peer("PaddleX 3.7.2 basic serving", "paddlex", {}),
        Peer(f"idiomatic BentoML ({auto})", "idiomatic", {}),
        Peer(f"ours, auto ({auto})", "ours", {"LCNET_ENGINE": "auto", "LCNET_PRECISION": "auto"}),
    ]
    if not args.no_paddle_row:
        peers.append(
            Peer("ours, paddle/fp32", "ours", {"LCNET_ENGINE": "paddle", "LCNET_PRECISION": "fp32"})
        )
    print(f"model {args.model} ({tag}), 500x375 JPEG of {len(image)} bytes, {os.cpu_count()} "
          f"CPUs, loadavg {loadavg()}")  # fmt: skip
    runs: dict[str, list[dict[int, dict]]] = {peer.name: [] for peer in peers}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1} of {args.rounds}, loadavg {loadavg()}")
        starts = {peer.name: lambda p=peer: start(p, tag, (python, config)) for peer in peers}
        with servers_up(starts) as servers:
            requests = {p.name: checked_request(p, servers[p.name], image) for p in peers}
            for peer in peers:
                runs[peer.name].append({})
            for i, clients in enumerate(levels):
                for peer in rotated(peers, round_ + i):
                    port = servers[peer.name].http_port
                    runs[peer.name][-1][clients] = measure(
                        peer.name, port, requests[peer.name], clients, args
                    )
    report(runs, peers, levels, args.rounds)


def report(runs: dict, peers: list[Peer], levels: list[int], rounds: int) -> None:
    def median(name: str, clients: int, key: str) -> float:
        return statistics.median(run[clients][key] for run in runs[name])

    print(f"\nmedians of {rounds} round(s); loadavg at the end {loadavg()}")
    print("| server | clients | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|")
    for peer in peers:
        for c in levels:
            errors = sum(run[c]["errors"] for run in runs[peer.name])
            print(f"| {peer.name} | {c} | {median(peer.name, c, 'rps'):.1f} | "
                  f"{median(peer.name, c, 'p50_ms'):.1f} | {median(peer.name, c, 'p99_ms'):.1f} | "
                  f"{errors} |")  # fmt: skip

    def ratio(ours: str, peer: str, c: int) -> str:
        rounds = " / ".join(f"{a[c]['rps'] / b[c]['rps']:.2f}"
                            for a, b in zip(runs[ours], runs[peer], strict=True))  # fmt: skip
        return f"{median(ours, c, 'rps') / median(peer, c, 'rps'):.2f} (by round {rounds})"

    paddlex, idiomatic, auto = peers[0].name, peers[1].name, peers[2].name
    for ours in (p.name for p in peers if p.kind == "ours"):
        for c in levels:
            # The idiomatic service runs auto's variant: only that row compares like with like.
            versus = f", ÷ idiomatic {ratio(ours, idiomatic, c)}" if ours == auto else ""
            print(f"{ours} @{c}: ÷ PaddleX {ratio(ours, paddlex, c)}{versus}")
        if 1 in levels:
            print(f"{ours} p50 @1 client: {median(ours, 1, 'p50_ms'):.1f} ms vs PaddleX "
                  f"{median(paddlex, 1, 'p50_ms'):.1f} ms, idiomatic "
                  f"{median(idiomatic, 1, 'p50_ms'):.1f} ms")  # fmt: skip
    print("goals at 32 clients: ours ÷ PaddleX ≥ 3, ours ÷ idiomatic ≥ 1.3; p50 @1 below PaddleX's")


if __name__ == "__main__":
    main()

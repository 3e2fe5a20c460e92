"""Training on more images than fit in memory: peak anonymous RSS and images/s of each data path.

    python bench/train_bigdata.py [--images 100000] [--ram-images 20000] [--steps 40] [--no-fit]

Writes N synthetic 320×240 JPEGs (4 classes) into a temporary folder — after checking the disk
has room for them and their decoded cache at resize-short 256 (~262 kB an image) — then runs
each data path in a fresh process while this one samples its memory every 0.1 s:

  build    ``train.decoded_cache`` builds the disk cache from the JPEGs (the cold cost, once)
  disk     reopens it (what a second ``fit`` pays before training), trains --steps steps with
           the cache in the page cache (warm), then evicted from it (cold), then reads every
           image once: anonymous RSS must stay flat while the page cache holds the pixels
  ram      decodes --ram-images images into RAM (the in-memory path, while it fits) and trains
           on them and on the same images from the disk cache in interleaved rounds (ABBA),
           with the model and without (the data path alone): the ratios
  decode   decodes each batch's JPEGs every step (2 threads), no cache
  fit      ``python -m train fit --procs 2`` for one epoch over every image (x0.25, 64 px crops
           from the 256 px cache), reusing the cache: the ranks' anonymous RSS

Memory is the processes' own (RssAnon, from /proc/PID/status); the page cache backing a
memory-mapped file is the kernel's, reclaimable, and shown apart (RssFile). Everything written
is deleted at the end. The machine is shared: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from common import cpu_kind
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

CLASSES = ("a", "b", "c", "d")
WIDTH, HEIGHT = 320, 240
RESIZE_SHORT = 256


# ---- the parent: data, disk check, memory sampling ------------------------------------------


def synthetic_jpeg(index: int, rng_seed: int = 0) -> bytes:
    """A smooth textured 320×240 photo-like JPEG whose dominant colour is its class."""
    import io

    rng = np.random.default_rng([rng_seed, index])
    cells = rng.random((6, 8, 3)) * 160
    cells[..., index % 4 % 3] += 80 if index % 4 < 3 else 0
    image = Image.fromarray(cells.astype(np.uint8)).resize((WIDTH, HEIGHT), Image.BILINEAR)
    noise = rng.integers(0, 24, (HEIGHT, WIDTH, 1), dtype=np.uint8)
    pixels = np.asarray(image, dtype=np.uint8) // 2 + noise * 2
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def write_dataset(root: Path, count: int) -> None:
    """``count`` JPEGs in 4 class folders and a train list (no val/test: the bench trains)."""
    from lcnet_runner.artifact import write_labels_file

    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)

    def write(i: int) -> str:
        rel = f"{CLASSES[i % 4]}/{i:07d}.jpg"
        (root / rel).write_bytes(synthetic_jpeg(i))
        return f"{rel} {i % 4}\n"

    with ThreadPoolExecutor(2) as pool:
        lines = list(pool.map(write, range(count), chunksize=256))
    (root / "train_list.txt").write_text("".join(lines))
    for name in ("val", "test"):
        (root / f"{name}_list.txt").write_text("")
    write_labels_file(root / "labels.txt", list(CLASSES))


def check_disk(folder: Path, count: int) -> None:
    jpeg = len(synthetic_jpeg(0))
    from lcnet_runner.preprocess import short_side_size

    decoded_width, decoded_height = short_side_size(WIDTH, HEIGHT, RESIZE_SHORT)
    decoded = 3 * decoded_width * decoded_height
    need = count * (jpeg + decoded) + (2 << 30)
    free = shutil.disk_usage(folder).free
    print(f"{count:,} JPEGs of ~{jpeg / 1e3:.0f} kB + their cache of {decoded / 1e3:.0f} kB each: "
          f"needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free in {folder}")  # fmt: skip
    if need > free:
        raise SystemExit(f"not enough disk: lower --images (at most ~{free // (jpeg + decoded):,})")


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (none once it has exited)."""
    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def memory(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmRSS of one process, in bytes (0 once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    wanted = ("RssAnon", "RssFile", "VmRSS")
    return {k: int(fields[k].split()[0]) * 1024 for k in wanted if k in fields}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def run_sampled(command: list[str], env: dict[str, str]) -> tuple[dict, dict]:
    """Run ``command``; its last JSON line, and the peak memory of its process tree (sum) and
    of each of its processes."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    peaks: dict = {"tree_anon": 0, "tree_file": 0, "processes": {}}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = {"RssAnon": 0, "RssFile": 0}
            for pid in tree(process.pid):
                figures = memory(pid)
                for key in total:
                    total[key] += figures.get(key, 0)
                name = cmdline(pid)
                rank = "train/__main__.py" in name and "distributed.launch" not in name
                kind = "rank" if rank else name.split(" -m ")[-1][:40]
                row = peaks["processes"].setdefault(pid, {"kind": kind, "anon": 0})
                row["kind"] = kind if name else row["kind"]  # a fork shows its parent's until exec
                row["anon"] = max(row["anon"], figures.get("RssAnon", 0))
            peaks["tree_anon"] = max(peaks["tree_anon"], total["RssAnon"])
            peaks["tree_file"] = max(peaks["tree_file"], total["RssFile"])
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{command[-1]} failed with exit code {process.returncode}")
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return (results[-1] if results else {}), peaks


# ---- the children: one data path each -------------------------------------------------------


def own_anon() -> int:
    return memory(os.getpid()).get("RssAnon", 0)


def trainer(args: argparse.Namespace):
    """A model, an optimizer and one training step on uint8 crops, as ``fit`` runs them."""
    import paddle
    import paddle.nn.functional as F

    from lcnet_runner.preprocess import PreprocessConfig, normalize
    from train.model import build_model

    paddle.base.core.set_num_threads(2)
    paddle.seed(0)
    model = build_model(args.model, num_classes=4)
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    preprocess = PreprocessConfig(crop_size=args.input_size, resize_short=RESIZE_SHORT)

    def step(crops: np.ndarray, labels: np.ndarray) -> None:
        loss = F.cross_entropy(model(paddle.to_tensor(normalize(crops, preprocess))),
                               paddle.to_tensor(labels))  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()

    step(np.zeros((args.batch_size, args.input_size, args.input_size, 3), np.uint8),
         np.zeros(args.batch_size, np.int64))  # fmt: skip
    return step, preprocess


def timed_steps(step, batches, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for crops, labels in itertools.islice(batches, steps):
        step(crops, labels)
    return steps * batch_size / (time.perf_counter() - start)


def load(args: argparse.Namespace, preprocess):
    from train.decoded_cache import CacheConfig, load_split
    from train.split import read_split

    samples = read_split(args.data, "train")
    cache = CacheConfig(args.cache, ram_mb=0)
    return samples, load_split(samples, preprocess, cache, name="train", dataset=args.data)


def child_build(args: argparse.Namespace) -> dict:
    from lcnet_runner.preprocess import PreprocessConfig

    start = time.perf_counter()
    _, split = load(args, PreprocessConfig(crop_size=args.input_size, resize_short=RESIZE_SHORT))
    seconds = time.perf_counter() - start
    return {"images": len(split), "seconds": seconds, "images_per_s": len(split) / seconds}


def child_disk(args: argparse.Namespace) -> dict:
    from train.data import AugmentConfig, eval_batches, train_batches
    from train.decoded_cache import PIXELS

    step, preprocess = trainer(args)
    model_anon = own_anon()
    start = time.perf_counter()
    _, split = load(args, preprocess)
    open_s = time.perf_counter() - start
    aug = AugmentConfig(input_size=args.input_size)
    rng = np.random.default_rng(0)
    warm = timed_steps(step, train_batches(split, aug, preprocess, args.batch_size, rng),
                       args.steps, args.batch_size)  # fmt: skip
    pixels = next(args.cache.glob(f"decoded/*/{PIXELS}"))
    with open(pixels, "rb") as file:  # out of the page cache: the next reads come from disk
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cold = timed_steps(step, train_batches(split, aug, preprocess, args.batch_size, rng),
                       args.steps, args.batch_size)  # fmt: skip
    start = time.perf_counter()
    for _ in eval_batches(split, args.input_size, 256):  # touch every image once
        pass
    every_s = time.perf_counter() - start
    return {"images": len(split), "open_s": open_s, "warm": warm, "cold": cold,
            "read_all_s": every_s, "model_anon": model_anon, "end_anon": own_anon(),
            "block_images": split.block_images}  # fmt: skip


def child_ram(args: argparse.Namespace) -> dict:
    from train.data import AugmentConfig, decode_split, train_batches

    step, preprocess = trainer(args)
    model_anon = own_anon()
    samples, disk = load(args, preprocess)
    ids = np.arange(min(args.ram_images, len(disk)))
    start = time.perf_counter()
    ram = decode_split(samples[: len(ids)], preprocess, workers=2)
    decode_s = time.perf_counter() - start
    disk = disk.subset(ids)  # the same images, from the cache
    aug = AugmentConfig(input_size=args.input_size)

    def no_step(crops: np.ndarray, labels: np.ndarray) -> None:
        pass

    rounds: dict[str, list[float]] = {"ram": [], "disk": [], "ram_data": [], "disk_data": []}
    for r in range(args.rounds):
        pairs = [("ram", ram), ("disk", disk)]
        for name, split in pairs if r % 2 == 0 else pairs[::-1]:  # ABBA: drift cancels out
            for suffix, train_step in (("", step), ("_data", no_step)):  # the model; data alone
                batches = train_batches(split, aug, preprocess, args.batch_size,
                                        np.random.default_rng(r))  # fmt: skip
                speed = timed_steps(train_step, batches, args.steps, args.batch_size)
                rounds[name + suffix].append(speed)
    return {"images": len(ram), "decode_s": decode_s, "model_anon": model_anon,
            "end_anon": own_anon(), **rounds}  # fmt: skip


def child_decode(args: argparse.Namespace) -> dict:
    from train.data import AugmentConfig, decode_stream, random_resized_crop
    from train.split import read_split

    step, preprocess = trainer(args)
    samples = read_split(args.data, "train")
    aug, rng = AugmentConfig(input_size=args.input_size), np.random.default_rng(0)

    def batches():
        order = rng.permutation(len(samples))
        for start in range(0, len(order), args.batch_size):
            ids = order[start : start + args.batch_size]
            images = decode_stream([samples[i][0] for i in ids], preprocess, workers=2)
            crops = np.stack([random_resized_crop(im, rng, aug, preprocess) for im in images])
            yield crops, np.asarray([samples[i][1] for i in ids])

    return {"decode": timed_steps(step, batches(), args.steps, args.batch_size)}


# ---- main -----------------------------------------------------------------------------------


def child_command(mode: str, args: argparse.Namespace, data: Path, cache: Path) -> list[str]:
    return [sys.executable, __file__, "--child", mode, "--data", str(data), "--cache", str(cache),
            "--model", args.model, "--input-size", str(args.input_size), "--batch-size",
            str(args.batch_size), "--steps", str(args.steps), "--rounds", str(args.rounds),
            "--ram-images", str(args.ram_images)]  # fmt: skip


def gb(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--ram-images", type=int, default=20_000,
                        help="images decoded into RAM for the in-memory row")  # fmt: skip
    parser.add_argument("--model", default="PPLCNet_x0_25")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per figure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True,
                        help="also run `fit --procs 2` for one epoch over every image")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = {"build": child_build, "disk": child_disk, "ram": child_ram,
                 "decode": child_decode}[args.child]  # fmt: skip
        print(json.dumps(child(args)))
        return

    print(f"{cpu_kind()}; {args.model}, batch {args.batch_size}, {args.input_size} px "
          f"crops from {RESIZE_SHORT} px, 2 threads")  # fmt: skip
    check_disk(args.workdir, args.images)
    work = Path(tempfile.mkdtemp(prefix="lcnet-bigdata-", dir=args.workdir))
    data, cache = work / "data", work / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LCNET_CACHE": str(cache),
           "BENTOML_HOME": str(work / "bentoml")}  # fmt: skip
    try:
        start = time.perf_counter()
        write_dataset(data, args.images)
        print(f"wrote {args.images:,} JPEGs in {time.perf_counter() - start:.0f} s")
        report(args, data, cache, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"deleted {work}")


def report(args: argparse.Namespace, data: Path, cache: Path, env: dict) -> None:
    built, peak = run_sampled(child_command("build", args, data, cache), env)
    size = sum(f.stat().st_size for f in cache.glob("decoded/*/*"))
    print(f"build   {built['images']:,} images, {size / 1e9:.1f} GB cache in "
          f"{built['seconds']:.0f} s ({built['images_per_s']:.0f} img/s); "
          f"peak anon RSS {gb(peak['tree_anon'])}")  # fmt: skip

    disk, peak = run_sampled(child_command("disk", args, data, cache), env)
    order = f"blocks of {disk['block_images']}" if disk["block_images"] else "full shuffle"
    print(f"disk    reopened in {disk['open_s']:.2f} s; warm {disk['warm']:.1f} img/s, cold "
          f"{disk['cold']:.1f} img/s ({order}); read all {disk['images']:,} in "
          f"{disk['read_all_s']:.0f} s")  # fmt: skip
    print(f"        anon RSS: model {gb(disk['model_anon'])}, peak {gb(peak['tree_anon'])} "
          f"(page cache mapped: peak {gb(peak['tree_file'])})")  # fmt: skip

    ram, peak = run_sampled(child_command("ram", args, data, cache), env)
    names = ("ram", "disk", "ram_data", "disk_data")
    med = {name: statistics.median(ram[name]) for name in names}
    print(f"ram     {ram['images']:,} images decoded into RAM in {ram['decode_s']:.0f} s; "
          f"peak anon RSS {gb(peak['tree_anon'])} (model {gb(ram['model_anon'])})")  # fmt: skip
    for name in names:
        rounds = ", ".join(f"{v:.1f}" for v in ram[name])
        print(f"        {name:9s} {med[name]:7.1f} img/s median ({rounds})")
    print(
        f"        disk warm / in-memory = {med['disk'] / med['ram']:.3f} training "
        f"(target >= 0.95), {med['disk_data'] / med['ram_data']:.3f} data path alone"
    )

    decode, peak = run_sampled(child_command("decode", args, data, cache), env)
    print(f"decode  every step {decode['decode']:.1f} img/s; peak anon RSS "
          f"{gb(peak['tree_anon'])}")  # fmt: skip
    print(f"        decode / in-memory = {decode['decode'] / med['ram']:.3f}, "
          f"disk cold / disk warm = {disk['cold'] / disk['warm']:.3f}")  # fmt: skip

    if args.fit:
        fit_memory(args, data, cache, env)


def fit_memory(args: argparse.Namespace, data: Path, cache: Path, env: dict) -> None:
    command = [sys.executable, "-m", "train", "fit", str(data), "--model", "PPLCNet_x0_25",
               "--pretrained", "none", "--epochs", "1", "--batch-size", "64", "--procs", "2",
               "--input-size", "64", "--resize-short", str(RESIZE_SHORT), "--ram-cache-mb", "0",
               "--save-dir", str(cache.parent / "run")]  # fmt: skip
    start = time.perf_counter()
    _, peak = run_sampled(command, env)
    ranks = [row["anon"] for row in peak["processes"].values() if row["kind"] == "rank"]
    print(f"fit     --procs 2, 1 epoch over {args.images:,} images in "
          f"{time.perf_counter() - start:.0f} s: peak anon RSS per rank "
          f"{', '.join(gb(v) for v in ranks)}; whole tree {gb(peak['tree_anon'])} "
          f"(page cache mapped: peak {gb(peak['tree_file'])})")  # fmt: skip


if __name__ == "__main__":
    main()

"""Our Predictor vs PaddleX 3's `paddlex.create_model` on the same exported folder and image.

    python bench/vs_paddlex.py [--seconds 3] [--rounds 3]

PP-LCNet x1.0 (seeded random weights, 1000 classes), one 500×375 JPEG file given as a path to
both (each decodes it), batch 1, 2 threads for every engine (PaddleX would otherwise start 10).
Prints images/s, interleaved medians, and ours ÷ PaddleX (target >= 1.5 for the best engine).
"""

from __future__ import annotations

import argparse
import statistics

from common import cpu_kind, every_variant, export_random_model, photo_jpeg, scratch_dir, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(cpu_kind())
    import paddlex
    from paddlex.inference import PaddlePredictorOption

    folder = scratch_dir() / "model"
    export_random_model("PPLCNet_x1_0", folder, int8=True)
    image = folder.parent / "photo.jpg"
    image.write_bytes(photo_jpeg())
    option = PaddlePredictorOption(run_mode="mkldnn", cpu_threads=2)
    theirs = paddlex.create_model("PP-LCNet_x1_0", model_dir=str(folder), pp_option=option)
    variants = {"paddlex.create_model (paddle mkldnn)": lambda: list(theirs.predict(str(image)))}
    for variant, ours in every_variant(folder, threads=2, batch_size=1).items():
        variants[f"Predictor {variant}"] = lambda p=ours: p.predict(image)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, call in variants.items():
            speeds[name].append(throughput(call, 1, args.seconds))
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    baseline = medians["paddlex.create_model (paddle mkldnn)"]
    print(f"500x375 JPEG path, batch 1, 2 threads, median of {args.rounds} interleaved rounds")
    for name, value in medians.items():
        print(f"  {name:38s} {value:7.1f} img/s   {value / baseline:.2f}x PaddleX")


if __name__ == "__main__":
    main()

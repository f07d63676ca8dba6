"""Time and peak memory to convert the AM-Softmax training model (Face-ResNet-20 + 10,516-class head, ~28M
parameters) from a caffemodel with random weights that this script writes to a temporary directory.

Targets (2 CPU cores): conversion under 10 s, peak memory added by the conversion under 3x the caffemodel size.
Run by hand:  python benchmarks/convert.py [--keep DIR]
The measurement runs in a fresh Python process: TensorFlow and Keras are imported first and not counted.

``--published [DIR]`` instead times the conversion (plan + Keras build, initial weights: no caffemodel is
published with them) of every published net in ``DIR`` (default ``../shared/caffe/real`` beside the
repository, or ``$KERAS_MARGIN_SHARED/caffe/real``) in each phase it has, as converters.caffe.published lists
them, one line per net and phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_TARGET_S = 10.0
MEMORY_TARGET_RATIO = 3.0

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, threading, time, tracemalloc
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, {root!r})
    import keras, tensorflow  # imported before the baseline: not part of the conversion's cost
    import converters.caffe.layers, keras_margin.layers
    from converters.caffe import load_caffe_model

    def rss():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset_peak():
        try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set size)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def vm_hwm():
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    peak = {{"sampled": 0}}
    running = True

    def sample():
        while running:
            peak["sampled"] = max(peak["sampled"], rss())
            time.sleep(0.002)

    args = json.loads(sys.argv[1])
    baseline = rss()
    hwm_reset = reset_peak()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    started = time.perf_counter()
    model = load_caffe_model(args["prototxt"], args["caffemodel"], phase="TRAIN", input_shape=(3, 112, 96))
    cold = time.perf_counter() - started
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    running = False
    sampler.join()
    peak_rss = max(peak["sampled"], vm_hwm() if hwm_reset else 0)
    params = model.count_params()
    started = time.perf_counter()
    model.save(os.path.join(args["dir"], "model.keras"))
    save = time.perf_counter() - started
    del model
    started = time.perf_counter()
    load_caffe_model(args["prototxt"], args["caffemodel"], phase="TRAIN", input_shape=(3, 112, 96))
    warm = time.perf_counter() - started
    print(json.dumps({{"cold_s": cold, "warm_s": warm, "save_s": save, "baseline_rss": baseline,
                      "peak_rss": peak_rss, "python_peak": python_peak, "params": params,
                      "hwm_reset": hwm_reset, "threads": os.cpu_count()}}))
    """
)


def write_model(directory: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from converters.caffe.reader import parse_prototxt
    from converters.caffe.writer import write_caffemodel
    from tests.caffe_nets import face_resnet20_blobs, face_resnet20_prototxt

    text = face_resnet20_prototxt("train")
    prototxt = directory / "face_train_test.prototxt"
    prototxt.write_text(text)
    caffemodel = directory / "face_train.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(text).net, face_resnet20_blobs(seed=0))
    return prototxt, caffemodel


def published(directory: Path) -> int:
    """Conversion time of every published net, each phase, in this process (Keras imported first)."""
    import time
    import warnings

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras  # noqa: F401  (imported before timing)

    from converters.caffe import ConversionError, convert
    from converters.caffe.published import PUBLISHED_NETS

    failures = 0
    print(f"Conversion time of the published nets in {directory} ({os.cpu_count()} CPU cores; initial weights)")
    print(f"  {'net':<70} {'phase':<5} {'layers':>6} {'params':>12} {'time':>8}")
    for name, net in PUBLISHED_NETS.items():
        path = directory / name
        for phase in net.phases:
            if not path.is_file():
                print(f"  {name:<70} {phase:<5} missing")
                failures += 1
                continue
            started = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    conversion = convert(path, **net.options(phase))
            except ConversionError as error:
                print(f"  {name:<70} {phase:<5} FAILED: {error}")
                failures += 1
                continue
            elapsed = time.perf_counter() - started
            print(f"  {name:<70} {phase:<5} {len(conversion.model.layers):>6} "
                  f"{conversion.model.count_params():>12,} {elapsed:>7.2f}s")
    return 1 if failures else 0


def _default_published() -> Path:
    shared = os.environ.get("KERAS_MARGIN_SHARED")
    return (Path(shared) if shared else ROOT.parent / "shared") / "caffe" / "real"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="write the files into DIR and keep them")
    parser.add_argument("--published", metavar="DIR", nargs="?", const=str(_default_published()), default=None,
                        help="time the conversion of every published net in DIR instead")
    args = parser.parse_args()
    if args.published:
        return published(Path(args.published))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.keep or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        prototxt, caffemodel = write_model(directory)
        size = caffemodel.stat().st_size
        child = subprocess.run(
            [sys.executable, "-c", CHILD.format(root=str(ROOT)),
             json.dumps({"prototxt": str(prototxt), "caffemodel": str(caffemodel), "dir": str(directory)})],
            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        result = json.loads(child.stdout.strip().splitlines()[-1])
    added = result["peak_rss"] - result["baseline_rss"]
    mb = 1e6
    print(f"AM-Softmax training model: {result['params']:,} parameters; caffemodel {size / mb:.1f} MB "
          f"({result['threads']} CPU cores)")
    print(f"  conversion time      {result['cold_s']:.2f} s first in the process, {result['warm_s']:.2f} s second "
          f"(target < {TIME_TARGET_S:.0f} s); .keras save {result['save_s']:.2f} s")
    print(f"  peak memory added    {added / mb:.0f} MB = {added / size:.2f}x the caffemodel "
          f"(target < {MEMORY_TARGET_RATIO:.0f}x; resident set: {result['baseline_rss'] / mb:.0f} MB after "
          f"importing TensorFlow -> {result['peak_rss'] / mb:.0f} MB peak"
          f"{'' if result['hwm_reset'] else ', sampled every 2 ms'})")
    print(f"  Python heap peak     {result['python_peak'] / mb:.0f} MB (tracemalloc: NumPy blobs, protobuf messages)")
    ok = result["cold_s"] < TIME_TARGET_S and added < MEMORY_TARGET_RATIO * size
    print(f"  {'within' if ok else 'OUTSIDE'} targets")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

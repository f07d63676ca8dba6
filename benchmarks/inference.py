"""Per-face inference latency of the converted AM-Softmax Face-ResNet-20 (112x96 input, 512-d fc5) in Keras, ONNX
Runtime and LiteRT at batch 1 and 32, side by side with OpenCV dnn running the caffemodel, plus export figures.

OpenCV's Caffe importer has no Flip layer (nor happynear's Normalize), so the runtimes are compared on the trunk
(data -> fc5, one forward pass per face); the deploy net's mirror trick (two passes per face) is timed separately.
Weights are seeded random (same cost as the released ones). Run by hand:
    python benchmarks/inference.py [--repeats 10] [--threads N] [--small] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

FULL = dict(widths=(64, 128, 256, 512), embedding=512)
SMALL = dict(widths=(16, 32, 64, 128), embedding=128)  # --small: a quick smoke run


def write_files(directory: Path, net: dict) -> dict[str, Path]:
    """The training prototxt's caffemodel (every layer, as Caffe's solver writes it) and the prototxts."""
    from converters.caffe import write_caffemodel
    from converters.caffe.reader import parse_prototxt
    from tests.caffe_nets import face_resnet20_blobs, face_resnet20_prototxt

    train = face_resnet20_prototxt("train", **net)
    caffemodel = directory / "face_train.caffemodel"
    write_caffemodel(caffemodel, parse_prototxt(train).net, face_resnet20_blobs(**net, seed=0))
    files = {"caffemodel": caffemodel}
    for kind, name in (("trunk", "face_trunk"), ("deploy", "face_deploy_mirror_normalize")):
        path = directory / f"{name}.prototxt"
        path.write_text(face_resnet20_prototxt(kind, **net, batch=1))
        files[kind] = path
    return files


def median_seconds(run, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def keras_runner(model):
    def run(x):
        return np.asarray(model.predict_on_batch(x))
    return run


def onnx_runner(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return session.run(None, {name: x})[0]
    return run


def litert_runner(path: Path, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    state = {"shape": None}

    def run(x):
        if state["shape"] != x.shape:  # resizing re-plans the graph: done once per batch size, not timed
            interpreter.resize_tensor_input(input_index, x.shape, strict=True)
            interpreter.allocate_tensors()
            state["shape"] = x.shape
        interpreter.set_tensor(input_index, x)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)
    return run


def opencv_runner(prototxt: Path, caffemodel: Path, threads: int):
    import cv2

    cv2.setNumThreads(threads)
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def run(x):  # NHWC in, like the others; the NCHW transpose is part of the cost of using OpenCV here
        net.setInput(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), "data")
        return net.forward("fc5").reshape(len(x), -1)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per figure (median; default 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per runtime (default: cores)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--small", action="store_true", help="a quarter of the channels (quick smoke run)")
    parser.add_argument("--keep", metavar="DIR", help="write the model files into DIR and keep them")
    args = parser.parse_args()

    import cv2
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras_margin  # noqa: F401
    from converters.caffe import CaffeWarning, load_caffe_model
    from keras_margin.export import export_onnx, export_tflite

    net = SMALL if args.small else FULL
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.keep or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        files = write_files(directory, net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaffeWarning)
            trunk = load_caffe_model(files["trunk"], files["caffemodel"])
            deploy = load_caffe_model(files["deploy"], files["caffemodel"])
        rng = np.random.default_rng(0)
        largest = max(args.batch_sizes)
        faces = ((rng.integers(0, 256, (largest, 112, 96, 3)) - 128.0) * 0.0078125).astype(np.float32)
        check = faces[:8]

        print(f"AM-Softmax Face-ResNet-20 trunk (data -> fc5): {trunk.count_params():,} parameters, 112x96x3 -> "
              f"{net['embedding']}; {args.threads} threads per runtime on {os.cpu_count()} CPU cores; "
              f"median of {args.repeats} runs")
        print(f"versions: TensorFlow {tf.__version__}, Keras {keras.__version__}, "
              f"onnxruntime {__import__('onnxruntime').__version__}, "
              f"ai-edge-litert {_version('ai-edge-litert')}, OpenCV {cv2.__version__}")
        print("\nexport (parity against Keras on 8 random faces and on the first alone, in each file's runtime):")
        exports = {}
        started = time.perf_counter()
        exports["onnx"] = export_onnx(trunk, directory / "trunk.onnx", inputs=check, verbose=False)
        timings = {"onnx": time.perf_counter() - started}
        for quantize in (None, "float16", "dynamic"):
            started = time.perf_counter()
            exports[quantize or "float32"] = export_tflite(trunk, directory / f"trunk_{quantize or 'float32'}.tflite",
                                                           quantize=quantize, inputs=check, verbose=False)
            timings[quantize or "float32"] = time.perf_counter() - started
        for key, report in exports.items():
            print(f"  {report}  ({timings[key]:.1f} s)")

        runners = {
            "Keras (TF, predict_on_batch)": keras_runner(trunk),
            "ONNX Runtime (float32)": onnx_runner(exports["onnx"].path, args.threads),
            "LiteRT (float32)": litert_runner(exports["float32"].path, args.threads),
            "LiteRT (float16 weights)": litert_runner(exports["float16"].path, args.threads),
            "LiteRT (dynamic int8 weights)": litert_runner(exports["dynamic"].path, args.threads),
            "OpenCV dnn (caffemodel)": opencv_runner(files["trunk"], files["caffemodel"], args.threads),
        }
        reference = runners["OpenCV dnn (caffemodel)"](check)
        header = "".join(f"  batch {size:>3} ms/face" for size in args.batch_sizes)
        print(f"\nper-face latency, trunk (one forward pass per face):\n  {'runtime':<31}{header}  "
              "fc5 vs OpenCV (max abs | min cos)")
        for name, run in runners.items():
            cells = ""
            for size in args.batch_sizes:
                x = faces[:size]
                cells += f"  {1e3 * median_seconds(lambda: run(x), args.repeats) / size:>17.2f}"
            got = run(check)
            error = np.abs(got - reference).max()
            cos = np.min(np.sum(got * reference, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1))
            print(f"  {name:<31}{cells}  {error:.1e} | {cos:.6f}")

        print("\ndeploy net with the mirror trick (normalize(fc5(x) + fc5(mirror x)): two passes per face; "
              "OpenCV has no Flip layer):")
        deploy_onnx = export_onnx(deploy, directory / "deploy.onnx", inputs=check, verbose=False)
        deploy_tflite = export_tflite(deploy, directory / "deploy.tflite", inputs=check, verbose=False)
        print(f"  {deploy_onnx}\n  {deploy_tflite}")
        deploy_runners = {
            "Keras (TF, predict_on_batch)": keras_runner(deploy),
            "ONNX Runtime (float32)": onnx_runner(deploy_onnx.path, args.threads),
            "LiteRT (float32)": litert_runner(deploy_tflite.path, args.threads),
        }
        print(f"  {'runtime':<31}{header}")
        for name, run in deploy_runners.items():
            cells = ""
            for size in args.batch_sizes:
                x = faces[:size]
                cells += f"  {1e3 * median_seconds(lambda: run(x), args.repeats) / size:>17.2f}"
            print(f"  {name:<31}{cells}")
    return 0


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())

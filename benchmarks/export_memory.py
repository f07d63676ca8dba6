"""Peak memory of `keras-margin export` (ONNX and TFLite) for the converted AM-Softmax deploy net.

The net is Face-ResNet-20 on 112x96 faces with the published layer sizes (about 22.6M parameters, from the
deploy prototxt with seeded weights this script writes to a temporary directory), converted with
`keras-margin convert`. Each export runs in a fresh process; its peak resident set size (the kernel's maxrss)
minus that of a process that only imports TensorFlow, Keras, tf2onnx and the LiteRT interpreter is the memory
the export itself needs, printed as a multiple of the model's weight bytes (README "Known limits" records it).

Run by hand:  python benchmarks/export_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "keras_margin_cli"]
IMPORTS = ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import tensorflow, keras, tf2onnx, onnxruntime; "
           "from ai_edge_litert import interpreter")


def _peak_rss(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of ``command`` run in its own process (a fresh one each time)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=ROOT)
    return int(out.stdout.split()[-1]) * 1024, time.perf_counter() - started


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from converters.caffe.reader import parse_prototxt
    from converters.caffe.writer import write_caffemodel
    from tests.caffe_nets import face_resnet20_blobs, face_resnet20_prototxt

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        text = face_resnet20_prototxt("deploy")
        prototxt, caffemodel = directory / "face_deploy.prototxt", directory / "face.caffemodel"
        prototxt.write_text(text)
        write_caffemodel(caffemodel, parse_prototxt(text).net, face_resnet20_blobs(seed=0))
        model = directory / "face.keras"
        subprocess.run([*CLI, "convert", str(prototxt), str(caffemodel), "-o", str(model), "--quiet"], check=True,
                       cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        import keras

        import keras_margin  # noqa: F401  (registers the layers the converted model names)

        weights = sum(int(w.numpy().nbytes) for w in keras.saving.load_model(model).weights)
        baseline, _ = _peak_rss([sys.executable, "-c", IMPORTS])
        print(f"converted AM-Softmax deploy net: {weights / 2**20:.1f} MiB of weights; "
              f"baseline (imports only) {baseline / 2**30:.2f} GiB; {os.cpu_count()} CPU cores")
        for flag, name in (("--onnx", "face.onnx"), ("--tflite", "face.tflite")):
            peak, seconds = _peak_rss([*CLI, "export", str(model), flag, str(directory / name)])
            extra = peak - baseline
            print(f"  export {flag:<8} peak {peak / 2**30:.2f} GiB, beyond the imports {extra / 2**30:.2f} GiB = "
                  f"{extra / weights:.1f}x the weights ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

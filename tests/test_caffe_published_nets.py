"""Every published net of shared/caffe/real converts in every phase it has and matches OpenCV's Caffe importer.

The reference is OpenCV's own importer (``cv2.dnn.readNetFromCaffe``) on the same prototxt and the same
weights: the nets' initial weights drawn from their fillers (no caffemodel is published with them here),
with the fork layers OpenCV lacks run by their handlers' NumPy stand-ins (NormFace's Parameter agents, which no
OpenCV graph can hold, are left out of that run: ``numpy_checked`` names the tests that check them against the
fork's C++ transcribed in NumPy, on the same published files). Fork layers are also checked
against NumPy transcriptions of the forks' C++ in test_caffe_fork_*.py / test_caffe_agents.py /
test_caffe_train_phase.py; this module is the breadth check. Skipped when the shared folder is absent
(``$KERAS_MARGIN_SHARED`` points the tests at another copy).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from converters.caffe.published import PUBLISHED_NETS
from tests.caffe_nets import SHARED, shared_missing

REAL = SHARED / "caffe" / "real"

#: Nets whose parity run costs more than a few seconds on 2 cores (tens of millions of weights drawn,
#: written and read by OpenCV); their conversion is still checked in every phase.
HEAVY = {"BVLC_caffe__models__bvlc_reference_caffenet__deploy.prototxt"}

CASES = [(name, phase) for name, net in PUBLISHED_NETS.items() for phase in net.phases]


def _path(name):
    path = REAL / name
    if not path.is_file():
        pytest.skip(shared_missing(path, f"the published prototxt {name}"))
    return path


def test_the_table_lists_every_published_file():
    if not REAL.is_dir():
        pytest.skip(shared_missing(REAL, "the published prototxts"))
    assert sorted(PUBLISHED_NETS) == sorted(path.name for path in REAL.glob("*.prototxt"))


@pytest.mark.parametrize("name,phase", CASES, ids=[f"{name.split('__', 1)[-1][:48]}-{phase}" for name, phase in CASES])
def test_published_net_converts_and_matches_opencv(name, phase):
    from converters.caffe import convert, parity_report

    path = _path(name)
    options = PUBLISHED_NETS[name].options(phase)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CaffeWarning here is a defect: fields or layers silently skipped
        conversion = convert(path, **options)
    assert conversion.plan.phase == phase
    assert not conversion.plan.unknown_fields, [str(field) for field in conversion.plan.unknown_fields]
    assert conversion.model.count_params() > 0 or conversion.plan.parameter_count == 0
    if name in HEAVY:
        return
    report = parity_report(path, None, "opencv", batch_size=1, atol=1e-4, rtol=1e-4, **options)
    assert report.ok, str(report)
    compared = {row.blob for row in report.rows}
    outputs = {blob.split("#")[0] for blob in conversion.plan.outputs}
    if PUBLISHED_NETS[name].numpy_checked:  # agents from a batch-free Parameter: OpenCV cannot run them
        assert report.skipped, str(report)
    else:
        assert outputs & compared, f"no net output was compared: {sorted(outputs)} vs {sorted(compared)}"
    assert all(np.isfinite(row.max_abs) and row.cosine > 1 - 1e-6 for row in report.rows if row.shape), str(report)

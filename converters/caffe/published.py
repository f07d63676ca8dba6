"""The published Caffe nets the converter is checked on, and what each needs besides its prototxt.

Each entry names a file as ``shared/caffe/real/`` stores it (``<owner>_<repo>__<path with / as __>``; see
its PROVENANCE.md for repository and commit) and the arguments ``convert`` needs for it: the image size of
data layers that do not state one (``ImageData`` without ``new_height``/``new_width``, LMDB ``Data``), the
declared input of a head fragment (NormFace's heads read ``last_ip_layer``, the 512-d feature of their trunk;
GNAP reads ``res4_3``, Face-ResNet's last 512 x 7 x 6 map), and the NetState stage a TEST net needs. Used by
the tests, ``benchmarks/convert.py --published`` and README.

Example:
>>> PUBLISHED_NETS["happynear_NormFace__prototxt__scaled_cosine_softmax.prototxt"].input_shape
{'last_ip_layer': (512,)}
>>> sorted({net.repository for net in PUBLISHED_NETS.values()})[:2]
['BVLC/caffe', 'KaimingHe/deep-residual-networks']
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PublishedNet", "PUBLISHED_NETS", "FACE_IMAGE"]

#: (C, H, W) of the aligned face crops of SphereFace, AM-Softmax and NormFace's Face-ResNet.
FACE_IMAGE = (3, 112, 96)


@dataclass(frozen=True)
class PublishedNet:
    """A published prototxt and the ``convert`` arguments it needs (``options(phase)``)."""

    file: str
    repository: str
    role: str
    input_shape: object = None
    #: phase -> NetState stages that phase needs (a solver's test_state)
    stages: dict = field(default_factory=dict)
    #: the phases the file distinguishes (include/exclude rules or training-only layers)
    phases: tuple = ("TEST",)
    #: where the layers OpenCV cannot run (stand_ins.NotRun) are checked against NumPy instead
    numpy_checked: str = ""

    def options(self, phase: str = "TEST") -> dict:
        """Keyword arguments of ``convert`` / ``parity_report`` for ``phase``."""
        options: dict = {"phase": phase}
        if self.input_shape is not None:
            options["input_shape"] = self.input_shape
        if self.stages.get(phase):
            options["stage"] = list(self.stages[phase])
        return options


_BOTH = ("TEST", "TRAIN")
_FRAGMENT = {"last_ip_layer": (512,)}

PUBLISHED_NETS: dict[str, PublishedNet] = {net.file: net for net in (
    PublishedNet("BVLC_caffe__examples__cifar10__cifar10_quick.prototxt", "BVLC/caffe", "CIFAR-10 quick"),
    PublishedNet("BVLC_caffe__examples__mnist__lenet.prototxt", "BVLC/caffe", "LeNet deploy"),
    PublishedNet("BVLC_caffe__examples__mnist__lenet_consolidated_solver.prototxt", "BVLC/caffe",
                 "LeNet V1 inside a solver (net_param), TEST by stage", input_shape=(1, 28, 28),
                 stages={"TEST": ("test-on-test-set",)}, phases=_BOTH),
    PublishedNet("BVLC_caffe__examples__mnist__lenet_train_test.prototxt", "BVLC/caffe", "LeNet train/test (LMDB)",
                 input_shape=(1, 28, 28), phases=_BOTH),
    PublishedNet("BVLC_caffe__models__bvlc_googlenet__deploy.prototxt", "BVLC/caffe", "GoogLeNet deploy"),
    PublishedNet("BVLC_caffe__models__bvlc_reference_caffenet__deploy.prototxt", "BVLC/caffe", "CaffeNet deploy"),
    PublishedNet("KaimingHe_deep-residual-networks__prototxt__ResNet-50-deploy.prototxt",
                 "KaimingHe/deep-residual-networks", "ResNet-50 deploy"),
    PublishedNet("forresti_SqueezeNet__SqueezeNet_v1.0__deploy.prototxt", "forresti/SqueezeNet", "SqueezeNet 1.0"),
    PublishedNet("forresti_SqueezeNet__SqueezeNet_v1.1__deploy.prototxt", "forresti/SqueezeNet", "SqueezeNet 1.1"),
    PublishedNet("happynear_AMSoftmax__prototxt__GNAP.prototxt", "happynear/AMSoftmax",
                 "GNAP pooling fragment (Normalize 2 tops, Reduction, ChannelScale)",
                 input_shape={"res4_3": (512, 7, 6)}),
    PublishedNet("happynear_AMSoftmax__prototxt__auto__face_train_test_auto.prototxt", "happynear/AMSoftmax",
                 "AM-Softmax with the automatic margin (GlobalLSEMargin)", input_shape=FACE_IMAGE, phases=_BOTH),
    PublishedNet("happynear_AMSoftmax__prototxt__face_deploy_mirror_normalize.prototxt", "happynear/AMSoftmax",
                 "AM-Softmax deploy (mirror + normalize)"),
    PublishedNet("happynear_AMSoftmax__prototxt__face_train_test.prototxt", "happynear/AMSoftmax",
                 "AM-Softmax training net (s=30, m=0.35)", input_shape=FACE_IMAGE, phases=_BOTH),
    PublishedNet("happynear_AMSoftmax__prototxt__face_train_test_wo_fn.prototxt", "happynear/AMSoftmax",
                 "AM-Softmax without feature normalization (ChannelScale)", input_shape=FACE_IMAGE, phases=_BOTH),
    PublishedNet("happynear_NormFace__prototxt__combine_softmax_contrastive.prototxt", "happynear/NormFace",
                 "normalized softmax + 0.01 C-contrastive", input_shape=_FRAGMENT, phases=_BOTH,
                 numpy_checked="tests/test_caffe_agents.py"),
    PublishedNet("happynear_NormFace__prototxt__example_of_mirror_face.prototxt", "happynear/NormFace",
                 "Light CNN deploy with the mirror face"),
    PublishedNet("happynear_NormFace__prototxt__normalized_Euclidean_contrastive.prototxt", "happynear/NormFace",
                 "C-contrastive (InnerDistance agents)", input_shape=_FRAGMENT, phases=_BOTH),
    PublishedNet("happynear_NormFace__prototxt__normalized_Euclidean_triplet.prototxt", "happynear/NormFace",
                 "C-triplet (Parameter agents)", input_shape=_FRAGMENT, phases=_BOTH,
                 numpy_checked="tests/test_caffe_agents.py"),
    PublishedNet("happynear_NormFace__prototxt__scaled_cosine_softmax.prototxt", "happynear/NormFace",
                 "normalized softmax with a learned scale", input_shape=_FRAGMENT, phases=_BOTH),
    PublishedNet("shicai_MobileNet-Caffe__mobilenet_deploy.prototxt", "shicai/MobileNet-Caffe", "MobileNet v1"),
    PublishedNet("shicai_MobileNet-Caffe__mobilenet_v2_deploy.prototxt", "shicai/MobileNet-Caffe", "MobileNet v2"),
    PublishedNet("wy1iu_sphereface__train__code__sphereface_deploy.prototxt", "wy1iu/sphereface",
                 "SphereFace-20 deploy"),
    PublishedNet("wy1iu_sphereface__train__code__sphereface_model.prototxt", "wy1iu/sphereface",
                 "SphereFace-20 training net (A-Softmax m=4)", input_shape=FACE_IMAGE, phases=_BOTH),
)}

"""NormFace's agent objectives (Wang et al. 2017, arXiv 1704.06369, Sec. 4, Eqs. 10-11): C-contrastive and
C-triplet on the squared distances between unit features and unit class agents, ``D = 2 - 2 cos``.

The agents are the class weight columns of a cosine head, so both objectives are functions of the head's
cosines and the labels, like every other objective; they follow the authors' Caffe layers
(happynear/caffe-windows, branch ``ms``: ``general_contrastive_loss_layer``, ``general_triplet_loss_layer``).
"""

from __future__ import annotations

from keras import ops

from keras_margin import _validation

__all__ = ["agent_distances", "c_contrastive", "c_triplet", "check_c_contrastive_parameters",
           "check_c_triplet_parameters", "C_CONTRASTIVE_MARGIN", "C_TRIPLET_MARGIN", "C_TRIPLET_CENTER"]

C_CONTRASTIVE_MARGIN = 1.0  # paper and released configs (negative_margin: 1)
C_TRIPLET_MARGIN = 0.8  # released config (margin: 0.8, hardest_only: true)
C_TRIPLET_CENTER = True  # released config (add_center_loss: true, also the proto default)


def check_c_contrastive_parameters(owner: str, margin=C_CONTRASTIVE_MARGIN) -> dict:
    """C-contrastive's hyper-parameter, checked: margin in [0, 4] (squared unit distances lie in [0, 4]).

    Example:
    >>> check_c_contrastive_parameters("CContrastiveLoss", 1)
    {'margin': 1.0}
    """
    return {"margin": _validation.check_number(owner, "margin", margin, low=0.0, high=4.0)}


def check_c_triplet_parameters(owner: str, margin=C_TRIPLET_MARGIN, center=C_TRIPLET_CENTER) -> dict:
    """C-triplet's hyper-parameters, checked: margin in [0, 4], center a bool.

    Example:
    >>> check_c_triplet_parameters("CTripletLoss", 0.8, True)
    {'margin': 0.8, 'center': True}
    """
    if not isinstance(center, bool):
        raise ValueError(f"{owner}: `center` must be a bool; got {center!r}.")
    return {"margin": _validation.check_number(owner, "margin", margin, low=0.0, high=4.0), "center": center}


def agent_distances(cos_theta):
    """Squared distance between unit vectors from their cosine: ``D = ||f~ - W~||^2 = 2 - 2 cos``, in [0, 4]."""
    return 2.0 - 2.0 * ops.cast(cos_theta, "float32")


def _target_mask(cos_theta, class_ids):
    num_classes = cos_theta.shape[-1]
    return ops.equal(ops.arange(num_classes, dtype="int32")[None, :], ops.cast(class_ids, "int32")[:, None])


def c_contrastive(cos_theta, class_ids, margin: float = C_CONTRASTIVE_MARGIN):
    """Per-sample C-contrastive loss: the own agent pulled in, every other agent pushed beyond the margin.

    Formula:
    ```
    L_i = D_{i,y} + sum_{j != y} max(0, margin - D_ij),   D = 2 - 2 cos(theta)
    ```
    Every negative is summed (no mining, no averaging), as the Caffe layer does with its released settings
    (positive_margin 0, negative_margin 1, both weights 1). ``margin=0`` leaves only the pull ``D_{i,y}``:
    NormFace's normalized "softmax + center" term.
    """
    distances = agent_distances(cos_theta)
    is_target = _target_mask(cos_theta, class_ids)
    pull = ops.sum(ops.where(is_target, distances, 0.0), axis=-1)
    push = ops.sum(ops.where(is_target, 0.0, ops.relu(margin - distances)), axis=-1)
    return pull + push


def c_triplet(cos_theta, class_ids, margin: float = C_TRIPLET_MARGIN, center: bool = True):
    """Per-sample C-triplet loss against the nearest negative agent, with the released config's center pull.

    Formula:
    ```
    k* = argmin_{j != y} D_ij
    hinge_i = max(0, margin + D_{i,y} - D_{i,k*})               the value returned, in both cases
    center=False: gradient of hinge_i
    center=True:  gradient of D_{i,y} - [hinge_i > 0] * D_{i,k*}  (the Caffe layer's add_center_loss)
    ```
    With ``center=True`` the own-class distance is always pulled in, also when the hinge is inactive, and
    counted once when it is active; the reported value stays the hinge alone, as the Caffe layer reports it.
    """
    distances = agent_distances(cos_theta)
    is_target = _target_mask(cos_theta, class_ids)
    positive = ops.sum(ops.where(is_target, distances, 0.0), axis=-1)
    nearest_negative = ops.min(ops.where(is_target, float("inf"), distances), axis=-1)
    hinge = ops.relu(margin + positive - nearest_negative)
    if not center:
        return hinge
    active = ops.stop_gradient(ops.cast(hinge > 0.0, "float32"))
    surrogate = positive - active * nearest_negative
    return ops.stop_gradient(hinge) + surrogate - ops.stop_gradient(surrogate)

"""Independent NumPy (float64) references for the margin-softmax losses, written from the papers' formulas.

Owns cosines, target logits, softmax cross-entropy, reductions, NormFace's bound on s and finite
differences; it imports nothing from keras_margin, so the tests compare two independent computations.

Sources, the papers and the authors' released code:

- NormFace: F. Wang, X. Xiang, J. Cheng, A. L. Yuille, "NormFace: L2 Hypersphere Embedding for Face
  Verification", ACM MM 2017, arXiv 1704.06369 (Eq. 6); code github.com/happynear/NormFace.
- SphereFace: W. Liu, Y. Wen, Z. Yu, M. Li, B. Raj, L. Song, "SphereFace: Deep Hypersphere Embedding for Face
  Recognition", CVPR 2017, arXiv 1704.08063 (Eq. 7); code github.com/wy1iu/sphereface
  (``margin_inner_product_layer.cpp``: psi, lambda annealing).
- AM-Softmax: F. Wang, J. Cheng, W. Liu, H. Liu, "Additive Margin Softmax for Face Verification", IEEE SPL 2018,
  arXiv 1801.05599 (Eq. 4); code github.com/happynear/AMSoftmax. Equal to CosFace's LMCL (H. Wang et al.,
  CVPR 2018, arXiv 1801.09414).
- ArcFace and the combined margin: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss
  for Deep Face Recognition", CVPR 2019, arXiv 1801.07698 (Eqs. 3-4); code github.com/deepinsight/insightface
  (``recognition/arcface_torch/losses.py``: ArcFace and CombinedMarginLoss).
- X2-Softmax: J. Xu, X. Liu, X. Zhang, Y.-W. Si, X. Li, Z. Shi, K. Wang, X. Gong, "X2-Softmax: Margin Adaptive
  Loss Function for Face Recognition", arXiv 2312.05281 (Eq. 8), and the authors' PyTorch release with it.
"""

import numpy as np

#: The clamp before any arccos (d arccos(t)/dt is unbounded at +-1): cos is kept in [-1 + eps, 1 - eps].
CLAMP_EPS = 1e-7


# --------------------------------------------------------------------------------------------------
# Cosines and angles
# --------------------------------------------------------------------------------------------------
def cosine(x, kernel):
    """cos(theta_j) = <x/|x|, W_j/|W_j|> with W in Keras layout (d, C), normalized per class (column)."""
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    x_unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    w_unit = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    return x_unit @ w_unit


def clamp_bounds(eps=CLAMP_EPS):
    """The bounds [-1 + eps, 1 - eps] as they land in float32, the dtype the package computes margins in.

    float32(1 - 1e-7) is 1 - 2**-23: the float64 value 1 - 1e-7 is not representable there, and at
    cos = +-1 the target logit depends on the bound actually used (X2 at cos = -1: d z/d theta ~ 362).
    """
    return float(np.float32(-1.0 + eps)), float(np.float32(1.0 - eps))


def angle(cos, eps=CLAMP_EPS):
    """theta = arccos(cos) after the clamp above (used by every objective written in theta)."""
    lo, hi = clamp_bounds(eps)
    return np.arccos(np.clip(np.asarray(cos, dtype=np.float64), lo, hi))


# --------------------------------------------------------------------------------------------------
# Target logits z_y (one per objective); every other logit is s * cos(theta_j)
# --------------------------------------------------------------------------------------------------
def normface_target(cos, s):
    """NormFace: z_y = s * cos(theta_y) (no margin)."""
    return s * np.asarray(cos, dtype=np.float64)


def amsoftmax_target(cos, s, m):
    """AM-Softmax / CosFace: z_y = s * (cos(theta_y) - m)."""
    return s * (np.asarray(cos, dtype=np.float64) - m)


def arcface_target(cos, s, m, eps=CLAMP_EPS):
    """ArcFace, InsightFace convention: s*cos(theta + m) while theta + m <= pi, else s*(cos - m*sin(m))."""
    cos = np.asarray(cos, dtype=np.float64)
    theta = angle(cos, eps)
    with_margin = np.cos(theta + m)
    fallback = cos - m * np.sin(m)
    return s * np.where(theta + m <= np.pi, with_margin, fallback)


def arcface_threshold(m):
    """The cosine where ArcFace switches to its fallback: cos(pi - m) (the target logit jumps there)."""
    return float(np.cos(np.pi - m))


def combined_threshold(m1, m2):
    """The angle theta_t = (pi - m2) / m1 where m1*theta + m2 reaches pi, or None when theta_t >= pi
    (then cos(m1*theta + m2) - m3 is non-increasing in theta on all of [0, pi] and needs no fallback)."""
    theta_t = (np.pi - m2) / m1
    return None if theta_t >= np.pi else float(theta_t)


def combined_fallback_offset(m1, m2):
    """The constant c of the combined margin's fallback z_y/s = cos(theta) - m3 - c beyond theta_t:
    m2*sin(m2) when m1 == 1 (InsightFace's ArcFace fallback), else 1 + cos(theta_t) (continuous at theta_t)."""
    if m1 == 1.0:
        return m2 * np.sin(m2)
    return 1.0 + np.cos((np.pi - m2) / m1)


def combined_target(cos, s, m1, m2, m3, eps=CLAMP_EPS):
    """Combined margin with the monotone fallback: z_y = s * (cos(m1*theta + m2) - m3) while
    theta <= theta_t = (pi - m2)/m1, else s * (cos(theta) - m3 - c) (c: ``combined_fallback_offset``)."""
    cos = np.asarray(cos, dtype=np.float64)
    theta = angle(cos, eps)
    plain = np.cos(m1 * theta + m2) - m3
    theta_t = combined_threshold(m1, m2)
    if theta_t is None:
        return s * plain
    fallback = cos - m3 - combined_fallback_offset(m1, m2)
    return s * np.where(theta <= theta_t, plain, fallback)


def combined_target_plain(cos, s, m1, m2, m3, eps=CLAMP_EPS):
    """The plain combined formula s * (cos(m1*theta + m2) - m3) with no fallback (not monotone past theta_t)."""
    return s * (np.cos(m1 * angle(cos, eps) + m2) - m3)


def x2_target(cos, s, a, h, k, eps=CLAMP_EPS):
    """X2-Softmax: z_y = s * (a*(theta - h)^2 + k), theta from the clamped cosine."""
    theta = angle(cos, eps)
    return s * (a * (theta - h) ** 2 + k)


def x2_target_derivative(cos, s, a, h, eps=CLAMP_EPS):
    """Analytic d z_y / d cos(theta_y) = s * 2a(theta - h) * (-1/sin(theta)) (inside the clamp)."""
    theta = angle(cos, eps)
    return s * 2.0 * a * (theta - h) * (-1.0 / np.sin(theta))


def psi(cos, m):
    """SphereFace psi(theta) = (-1)^k cos(m*theta) - 2k, k = floor(m*theta/pi) clipped to m-1.

    Computed through arccos (the package uses Chebyshev polynomials and no arccos: independent routes).
    """
    theta = np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0))
    k = np.minimum(np.floor(m * theta / np.pi), m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


def sphereface_boundaries(m):
    """The cosines cos(j*pi/m), j = 1..m-1, where psi's branch k changes."""
    return [float(np.cos(j * np.pi / m)) for j in range(1, m)]


def sphereface_target(cos, m, s, lam=0.0):
    """Feature-normalized SphereFace: z_y = s * (lam*cos + psi(theta)) / (1 + lam) (not the original)."""
    cos = np.asarray(cos, dtype=np.float64)
    return s * (lam * cos + psi(cos, m)) / (1.0 + lam)


def sphereface_lambda(iteration, base=1000.0, gamma=0.12, power=1.0, lambda_min=5.0):
    """Caffe MarginInnerProduct's annealing: max(lambda_min, base * (1 + gamma*iteration)^(-power))."""
    return max(lambda_min, base * (1.0 + gamma * iteration) ** (-power))


def sphereface_caffe_logits(x, kernel, labels, m, lam):
    """Label-aware (original Caffe) SphereFace: target |x|*(lam*cos + psi)/(1+lam), others |x|*cos."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    cos = cosine(x, kernel)
    labels = sparse_labels(labels, cos.shape[1])
    logits = norms[:, None] * cos
    rows = np.arange(len(labels))
    cos_y = cos[rows, labels]
    logits[rows, labels] = norms * (lam * cos_y + psi(cos_y, m)) / (1.0 + lam)
    return logits


# --------------------------------------------------------------------------------------------------
# Analytic derivatives d z_y / d cos(theta_y), float64 (the edge-precision tests' reference gradients)
# --------------------------------------------------------------------------------------------------
# Angle terms are written with theta = arccos(cos) and d theta / d cos = -1/sin(theta), evaluated inside
# the clamp (cos strictly within [-1 + eps, 1 - eps]); beyond it an angle term is constant (derivative 0).
def _inside_clamp(cos, eps=CLAMP_EPS):
    lo, hi = clamp_bounds(eps)
    return (cos > lo) & (cos < hi)


def psi_derivative(cos, m):
    """d psi / d cos = (-1)^k * m * sin(m*theta) / sin(theta), k = floor(m*theta/pi) clipped to m-1;
    m^2 at cos = +-1 (the limit at both ends)."""
    cos = np.asarray(cos, dtype=np.float64)
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    k = np.minimum(np.floor(m * theta / np.pi), m - 1)
    sin = np.sin(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sin > 0.0, np.sin(m * theta) / sin, (-1.0) ** k * m)
    return (-1.0) ** k * m * ratio


def sphereface_target_derivative(cos, m, s, lam=0.0):
    """d/d cos of s * (lam*cos + psi) / (1 + lam)."""
    return s * (lam + psi_derivative(cos, m)) / (1.0 + lam)


def arcface_target_derivative(cos, s, m, eps=CLAMP_EPS):
    """s * sin(theta + m) / sin(theta) while theta + m <= pi (0 beyond the clamp), s on the fallback."""
    cos = np.asarray(cos, dtype=np.float64)
    theta = angle(cos, eps)
    with_margin = np.where(_inside_clamp(cos, eps), np.sin(theta + m) / np.sin(theta), 0.0)
    return s * np.where(theta + m <= np.pi, with_margin, 1.0)


def combined_target_derivative(cos, s, m1, m2, m3, eps=CLAMP_EPS):
    """s * m1 * sin(m1*theta + m2) / sin(theta) while theta <= theta_t (0 beyond the clamp), s on the
    fallback; s everywhere for (1, 0, m3), which is cos - m3 with no angle."""
    cos = np.asarray(cos, dtype=np.float64)
    if m1 == 1.0 and m2 == 0.0:
        return np.full(cos.shape, float(s))
    theta = angle(cos, eps)
    plain = np.where(_inside_clamp(cos, eps), m1 * np.sin(m1 * theta + m2) / np.sin(theta), 0.0)
    theta_t = combined_threshold(m1, m2)
    if theta_t is None:
        return s * plain
    return s * np.where(theta <= theta_t, plain, 1.0)


# --------------------------------------------------------------------------------------------------
# Logits, cross-entropy, reductions
# --------------------------------------------------------------------------------------------------
def sparse_labels(y_true, num_classes):
    """Class ids (batch,) from (batch,), (batch, 1) ids or a one-hot (batch, C)."""
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        return np.argmax(y, axis=1).astype(np.int64)
    return y.reshape(-1).astype(np.int64)


def margin_logits(cos, labels, s, target_logit):
    """z_j = s * cos_j for every class, then z_y replaced by target_logit(cos_y)."""
    cos = np.asarray(cos, dtype=np.float64)
    labels = sparse_labels(labels, cos.shape[1])
    rows = np.arange(cos.shape[0])
    logits = s * cos
    logits[rows, labels] = target_logit(cos[rows, labels])
    return logits


def logsumexp(logits):
    """Stable log-sum-exp over the last axis, float64."""
    z = np.asarray(logits, dtype=np.float64)
    top = np.max(z, axis=-1, keepdims=True)
    return (top + np.log(np.sum(np.exp(z - top), axis=-1, keepdims=True)))[..., 0]


def softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def softmax_cross_entropy(logits, labels):
    """Per-sample -log(exp(z_y) / sum_j exp(z_j)) = logsumexp(z) - z_y."""
    z = np.asarray(logits, dtype=np.float64)
    labels = sparse_labels(labels, z.shape[1])
    return logsumexp(z) - z[np.arange(z.shape[0]), labels]


def softmax_cross_entropy_grad(logits, labels):
    """d loss_i / d z_ij = softmax(z_i)_j - [j == y_i] (per sample, before any reduction)."""
    z = np.asarray(logits, dtype=np.float64)
    labels = sparse_labels(labels, z.shape[1])
    grad = softmax(z)
    grad[np.arange(z.shape[0]), labels] -= 1.0
    return grad


def reduce(per_sample, sample_weight=None, reduction="sum_over_batch_size"):
    """Keras' reductions: None -> w*l; "sum" -> sum(w*l); "sum_over_batch_size" -> sum(w*l) / batch."""
    values = np.asarray(per_sample, dtype=np.float64)
    if sample_weight is not None:
        values = values * np.asarray(sample_weight, dtype=np.float64).reshape(values.shape)
    if reduction is None or reduction == "none":
        return values
    if reduction == "sum":
        return np.sum(values)
    if reduction == "sum_over_batch_size":
        return np.sum(values) / values.size
    raise ValueError(f"unknown reduction {reduction!r}")


def margin_loss(cos, labels, s, target_logit, sample_weight=None, reduction="sum_over_batch_size"):
    """The whole objective: cross-entropy over margin_logits, then Keras' reduction."""
    per_sample = softmax_cross_entropy(margin_logits(cos, labels, s, target_logit), labels)
    return reduce(per_sample, sample_weight, reduction)


def margin_loss_gradient(cos, labels, s, target_logit, target_derivative):
    """d loss_i / d cos_ij of the per-sample cross-entropy (one row per sample), analytic, float64:
    (softmax(z_i)_j - [j == y_i]) * d z_ij / d cos_ij, with d z / d cos = s off the target and
    target_derivative(cos_y) on it."""
    cos = np.asarray(cos, dtype=np.float64)
    labels = sparse_labels(labels, cos.shape[1])
    rows = np.arange(cos.shape[0])
    dz_dcos = np.full(cos.shape, float(s))
    dz_dcos[rows, labels] = target_derivative(cos[rows, labels])
    return softmax_cross_entropy_grad(margin_logits(cos, labels, s, target_logit), labels) * dz_dcos


# --------------------------------------------------------------------------------------------------
# NormFace's agent objectives (Sec. 4, Eqs. 10-11) on D = 2 - 2 cos, and their gradients w.r.t. cos
# --------------------------------------------------------------------------------------------------
def agent_distance(cos):
    return 2.0 - 2.0 * np.asarray(cos, dtype=np.float64)


def c_contrastive(cos, labels, margin=1.0):
    """L_i = D_iy + sum_{j != y} max(0, margin - D_ij)."""
    d = agent_distance(cos)
    target = np.eye(d.shape[1], dtype=bool)[sparse_labels(labels, d.shape[1])]
    return np.sum(np.where(target, d, np.maximum(0.0, margin - d)), axis=1)


def c_contrastive_gradient(cos, labels, margin=1.0):
    """d L_i / d cos_ij: -2 on the target, +2 on each negative with margin - D_ij > 0, else 0."""
    d = agent_distance(cos)
    target = np.eye(d.shape[1], dtype=bool)[sparse_labels(labels, d.shape[1])]
    return np.where(target, -2.0, np.where(margin - d > 0.0, 2.0, 0.0))


def c_triplet_gradient(cos, labels, margin=0.8, center=True):
    """The hinge max(0, margin + D_iy - min_{j != y} D_ij)'s gradient (-2 on the target, +2 on the nearest
    negative, when active); with center (the Caffe layer's add_center_loss) the -2 on the target is always on."""
    d = agent_distance(cos)
    labels = sparse_labels(labels, d.shape[1])
    rows = np.arange(d.shape[0])
    negatives = d.copy()
    negatives[rows, labels] = np.inf
    nearest = np.argmin(negatives, axis=1)
    active = margin + d[rows, labels] - negatives[rows, nearest] > 0.0
    grad = np.zeros_like(d)
    grad[rows, labels] = np.where(active | center, -2.0, 0.0)
    grad[rows, nearest] = np.where(active, 2.0, 0.0)
    return grad


# --------------------------------------------------------------------------------------------------
# NormFace's bound and finite differences
# --------------------------------------------------------------------------------------------------
def normface_scale_lower_bound(num_classes, probability):
    """NormFace: s >= (C-1)/C * ln((C-1) * P / (1-P))."""
    c = float(num_classes)
    p = float(probability)
    return (c - 1.0) / c * np.log((c - 1.0) * p / (1.0 - p))


def central_difference(fn, x, step=1e-6):
    """d fn / d x by central differences, element by element, in float64 (fn maps an array to a scalar)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    grad_flat = grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        up = float(fn(x))
        flat[i] = saved - step
        down = float(fn(x))
        flat[i] = saved
        grad_flat[i] = (up - down) / (2.0 * step)
    return grad


# --------------------------------------------------------------------------------------------------
# Objectives with a batch statistic (issue 16), transcribed from the released code
#
# - CurricularFace: Y. Huang, Y. Wang, Y. Tai, X. Liu, P. Shen, S. Li, J. Li, F. Huang, "CurricularFace: Adaptive
#   Curriculum Learning Loss for Deep Face Recognition", CVPR 2020, arXiv 2004.00288; code
#   github.com/HuangYG123/CurricularFace (``head/metrics.py``, ``CurricularFace.forward``).
# - AdaCos: X. Zhang, R. Zhao, Y. Qiao, X. Wang, H. Li, "AdaCos: Adaptively Scaling Cosine Logits for Effectively
#   Learning Deep Face Representations", CVPR 2019, arXiv 1905.00292 (Eqs. 15-16); code
#   github.com/4uiiurz1/pytorch-adacos (``metrics.py``, ``AdaCos.forward``).

def curricularface_forward(cos, labels, t, s=64.0, m=0.5, update=True):
    """One ``CurricularFace.forward`` of the authors' code, float64: (logits, t after the call).

    ``update=False`` keeps ``t`` as given (for finite differences, where the code's ``no_grad`` update is a
    constant)."""
    cos = np.clip(np.array(cos, dtype=np.float64), -1.0, 1.0)
    rows, labels = np.arange(cos.shape[0]), sparse_labels(labels, cos.shape[1])
    target = cos[rows, labels].reshape(-1, 1)
    sin_theta = np.sqrt(1.0 - target ** 2)
    cos_theta_m = target * np.cos(m) - sin_theta * np.sin(m)
    mask = cos > cos_theta_m
    final_target = np.where(target > np.cos(np.pi - m), cos_theta_m, target - np.sin(np.pi - m) * m)
    if update:
        t = target.mean() * 0.01 + (1 - 0.01) * t
    out = cos.copy()
    out[mask] = cos[mask] * (t + cos[mask])
    out[rows, labels] = final_target[:, 0]
    return out * s, t


def adacos_initial_scale(num_classes):
    """``self.s = math.sqrt(2) * math.log(num_classes - 1)``."""
    return np.sqrt(2.0) * np.log(num_classes - 1)


def adacos_forward(cos, labels, s, median="lower", update=True):
    """One ``AdaCos.forward`` (with labels) of the reference code, float64: (logits, s after the call).

    ``median="lower"`` is ``torch.median`` (the lower middle value of an even count), ``"midpoint"`` NumPy's."""
    cos = np.array(cos, dtype=np.float64)
    labels = sparse_labels(labels, cos.shape[1])
    if update:
        theta = np.arccos(np.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7))
        one_hot = np.zeros_like(cos)
        one_hot[np.arange(cos.shape[0]), labels] = 1.0
        b_avg = np.sum(np.where(one_hot < 1, np.exp(s * cos), 0.0)) / cos.shape[0]
        target_theta = np.sort(theta[one_hot == 1])
        theta_med = (target_theta[(target_theta.size - 1) // 2] if median == "lower" else np.median(target_theta))
        s = np.log(b_avg) / np.cos(min(np.pi / 4, theta_med))
    return s * cos, s


def adaface_forward(embeddings, cos, labels, batch_mean, batch_std, s=64.0, m=0.4, h=0.333, t_alpha=0.01,
                    update=True):
    """One ``AdaFace.forward`` of the authors' code (github.com/mk-minchul/AdaFace ``head.py``; Kim, Jain, Liu,
    "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022, arXiv 2204.00964), float64:
    (logits, batch_mean, batch_std after the call). ``norms`` are those of ``embeddings``; ``cos`` its cosines."""
    eps = 1e-3
    cos = np.clip(np.array(cos, dtype=np.float64), -1 + eps, 1 - eps)
    labels = sparse_labels(labels, cos.shape[1])
    norms = np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1, keepdims=True)
    safe_norms = np.clip(norms, 0.001, 100)
    if update:
        batch_mean = safe_norms.mean() * t_alpha + (1 - t_alpha) * batch_mean
        batch_std = safe_norms.std(ddof=1) * t_alpha + (1 - t_alpha) * batch_std
    margin_scaler = np.clip((safe_norms - batch_mean) / (batch_std + eps) * h, -1, 1)
    one_hot = np.zeros_like(cos)
    one_hot[np.arange(cos.shape[0]), labels] = 1.0
    theta_m = np.clip(np.arccos(cos) + one_hot * (m * margin_scaler * -1), eps, np.pi - eps)
    cos = np.cos(theta_m) - one_hot * (m + m * margin_scaler)
    return cos * s, batch_mean, batch_std


# --------------------------------------------------------------------------------------------------
# MagFace and L-Softmax (issue 16), transcribed from the released code
#
# - MagFace: Q. Meng, S. Zhao, Z. Huang, F. Zhou, "MagFace: A Universal Representation for Face Recognition and
#   Quality Assessment", CVPR 2021, arXiv 2103.06627; code github.com/IrvingMeng/MagFace (``models/magface.py``:
#   ``SoftmaxBuilder._margin``, ``MagLinear.forward``, ``MagLoss``; ``run/trainer.py``: loss_id + lambda_g * loss_g).
# - L-Softmax: W. Liu, Y. Wen, Z. Yu, M. Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks",
#   ICML 2016, arXiv 1612.02295; code github.com/wy1iu/LargeMargin_Softmax_Loss
#   (``src/caffe/layers/largemargin_inner_product_layer.cpp``, ``Forward_cpu``).

def magface_forward(x, kernel, labels, s=64.0, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8, easy_margin=True):
    """``MagLinear.forward`` + ``MagLoss.forward``'s output and g, float64: (logits (B, C), g(a) per sample (B,)).

    The code's loss is ``mean(softmax_cross_entropy(logits, labels)) + lambda_g * mean(g)``."""
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    labels = sparse_labels(labels, kernel.shape[1])
    x_norm = np.clip(np.linalg.norm(x, axis=1, keepdims=True), l_a, u_a)
    ada_margin = (u_margin - l_margin) / (u_a - l_a) * (x_norm - l_a) + l_margin
    cos_m, sin_m = np.cos(ada_margin), np.sin(ada_margin)
    weight_norm = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos_theta = np.clip((x / np.linalg.norm(x, axis=1, keepdims=True)) @ weight_norm, -1, 1)
    sin_theta = np.sqrt(1.0 - cos_theta ** 2)
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    if easy_margin:
        cos_theta_m = np.where(cos_theta > 0, cos_theta_m, cos_theta)
    else:
        mm = np.sin(np.pi - ada_margin) * ada_margin
        threshold = np.cos(np.pi - ada_margin)
        cos_theta_m = np.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    one_hot = np.zeros_like(cos_theta)
    one_hot[np.arange(len(labels)), labels] = 1.0
    output = one_hot * s * cos_theta_m + (1.0 - one_hot) * s * cos_theta
    g = 1 / (u_a ** 2) * x_norm[:, 0] + 1 / x_norm[:, 0]
    return output, g


def lsoftmax_lambda(iteration, base=1000.0, gamma=0.000025, power=35.0, lambda_min=0.0):
    """``lambda_ = max(base * pow(1 + gamma * iter_, -power), lambda_min)`` (iter_ already advanced)."""
    return max(base * (1.0 + gamma * iteration) ** (-power), lambda_min)


def lsoftmax_caffe_forward(x, kernel, labels, m, lam):
    """``LargeMarginInnerProductLayer::Forward_cpu`` for type SINGLE..QUADRUPLE (m = 1..4), float64; ``kernel`` in
    Keras layout (d, C) (the Caffe blob is its transpose). The sign blobs as the layer builds them."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(kernel, dtype=np.float64).T                        # (N, K)
    labels = sparse_labels(labels, weight.shape[0])
    x_norm = np.sqrt(np.sum(x * x, axis=1))
    w_norm = np.sqrt(np.sum(weight * weight, axis=1))
    xw_norm_product = np.outer(x_norm, w_norm) + 0.000000001
    cos_theta = (x @ weight.T) / xw_norm_product
    sign_0 = np.sign(cos_theta)
    top = x @ weight.T
    if m == 1:
        return top
    rows = np.arange(len(labels))
    c = cos_theta[rows, labels]
    p = xw_norm_product[rows, labels]
    if m == 2:
        top[rows, labels] = p * (2.0 * sign_0[rows, labels] * c ** 2 - 1.0)
    elif m == 3:
        sign_1 = np.sign(np.abs(c) - 0.5)
        sign_2 = sign_0[rows, labels] * (sign_1 + 1.0) - 2.0
        top[rows, labels] = p * (sign_1 * (4.0 * c ** 3 - 3.0 * c) + sign_2)
    else:
        sign_3 = sign_0[rows, labels] * np.sign(2.0 * c ** 2 - 1.0)
        sign_4 = 2.0 * sign_0[rows, labels] + sign_3 - 3.0
        top[rows, labels] = p * (sign_3 * (8.0 * c ** 4 - 8.0 * c ** 2 + 1.0) + sign_4)
    top = top + lam * (x @ weight.T)
    return top / (1.0 + lam)

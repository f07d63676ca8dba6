"""From a model's ``InputContract`` and what the caller asked for to the preprocessing actually applied.

The model records what its image input must be (``keras_margin.InputContract``); the caller may give a channel
order, mean, scale and flip. ``resolve_preprocessing`` applies what the model does not do itself, never a step
twice, and says so: a warning when an option doubles a step the model does (the option is dropped), a
``ValueError`` naming the option when it contradicts the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from keras_margin.evaluation.images import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    import keras

    from keras_margin.input_contract import InputContract

__all__ = ["PreprocessingWarning", "Resolved", "resolve_preprocessing", "API_NAMES", "CLI_NAMES"]

#: How messages name the caller's options: the Python API's arguments ...
API_NAMES = {"channel_order": "preprocessing.channel_order", "mean": "preprocessing.mean",
             "scale": "preprocessing.scale", "flip": "flip=True", "ignore": "ignore_contract=True"}
#: ... and ``keras-margin verify``'s flags.
CLI_NAMES = {"channel_order": "--bgr/--rgb", "mean": "--mean", "scale": "--scale", "flip": "--flip",
             "ignore": "--ignore-contract"}


class PreprocessingWarning(UserWarning):
    """An option doubles a step the model does itself, or the model does not record its normalization."""


@dataclass(frozen=True)
class Resolved:
    """The preprocessing to apply: every field set, the flip decision, and what to tell the user.

    Attributes:
        preprocessing: a ``Preprocessing`` with channel_order, mean and scale all set.
        flip: whether to add the mirror image's feature outside the model.
        warnings: one line each (an option dropped because the model does that step, or nothing recorded).
        description: one line: what is applied, and where it comes from.
    """

    preprocessing: Preprocessing
    flip: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    description: str = ""


def _means(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def _same(given, recorded) -> bool:
    a, b = _means(given), _means(recorded)
    if len(a) != len(b):
        if 1 not in (len(a), len(b)):
            return False
        a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a))
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def _text(value) -> str:
    values = _means(value)
    return f"{values[0]:g}" if len(values) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _describe(pre: Preprocessing, flip: bool, flip_in_model: bool, origin: str) -> str:
    norm = ("pixels 0..255 unchanged" if (not _means(pre.mean)[0] and len(_means(pre.mean)) == 1 and pre.scale == 1.0)
            else f"(x - {_text(pre.mean)}) * {pre.scale:g}")
    mirror = ("the model adds the mirror image's feature itself" if flip_in_model else
              "flip: feature(image) + feature(mirror)" if flip else "no flip")
    return f"{pre.channel_order.upper()}, {norm}; {mirror} [{origin}]"


def resolve_preprocessing(contract: "InputContract | keras.Model | None", preprocessing: Preprocessing | None = None,
                          flip: bool | None = None, *, ignore_contract: bool = False,
                          names: Mapping[str, str] = API_NAMES) -> Resolved:
    """The preprocessing and flip to apply to image files for a model with ``contract``.

    Rules (``given``: the fields of ``preprocessing`` that are not None, and ``flip`` when not None):
    ```
    no contract / ignore_contract:  given, else RGB, mean 0, scale 1, no flip (warning when nothing is given)
    pixels="normalized":  the contract's channel order, mean, scale; a given value that differs: ValueError
    pixels="raw":         the contract's channel order only; a given mean/scale (other than 0/1) would
                          normalize twice: warning, dropped; a different channel order: ValueError
    pixels="unknown":     given, else the contract's channel order, mean 0, scale 1 (warning when no mean or
                          scale is given: the normalization is not recorded)
    flip_in_model=True:   never flip outside; flip=True would mirror twice: warning, dropped
    ```

    Args:
        contract: the model's ``InputContract``, a model (its contract is looked up with
            ``find_input_contract``), or None.
        preprocessing: what the caller asked for; None fields are "not given". Defaults to None.
        flip: the caller's flip, or None (not given). Defaults to None.
        ignore_contract: use only what is given (with the old defaults), as if the model recorded nothing.
            Defaults to False.
        names: how messages name the options (``API_NAMES`` or ``CLI_NAMES``). Defaults to ``API_NAMES``.

    Returns:
        Resolved: the full ``Preprocessing``, the flip, the warnings and a one-line description.

    Raises:
        ValueError: a given option contradicts the contract (the message names the option and the fix).

    Example:
    >>> from keras_margin.input_contract import InputContract
    >>> raw = InputContract("raw", "bgr", mean=128, scale=1 / 128, flip_in_model=True, source="train prototxt")
    >>> resolved = resolve_preprocessing(raw, Preprocessing(mean=128.0, scale=1 / 128), flip=True)
    >>> resolved.preprocessing.given(), resolved.flip
    ({'channel_order': 'bgr', 'mean': 0.0, 'scale': 1.0}, False)
    >>> len(resolved.warnings)
    2
    >>> print(resolved.description)
    BGR, pixels 0..255 unchanged; the model adds the mirror image's feature itself [model's input contract: \
raw BGR pixels 0..255 (the model applies (x - 128.0) * 0.0078125 itself); the model adds the mirror image's \
feature itself (from train prototxt)]
    """
    given = preprocessing.given() if preprocessing is not None else {}
    size = preprocessing.size if preprocessing is not None else None
    if contract is not None and not _is_contract(contract):
        from keras_margin.input_contract import find_input_contract

        contract = find_input_contract(contract)
    warnings: list[str] = []
    if contract is None or ignore_contract:
        pre = Preprocessing(size=size, channel_order=given.get("channel_order", "rgb"), mean=given.get("mean", 0.0),
                            scale=given.get("scale", 1.0))
        origin = f"given; the model's input contract is ignored ({names['ignore']})" if contract is not None \
            else "given" if given else "defaults"
        if contract is None and not given:
            warnings.append(
                "the model records no input contract (keras_margin.InputContract), so its input normalization is "
                f"unknown: feeding RGB pixels 0..255 unchanged; pass {names['mean']}/{names['scale']}/"
                f"{names['channel_order']} if it expects normalized or BGR input")
        return Resolved(pre, bool(flip), tuple(warnings), _describe(pre, bool(flip), False, origin))

    recorded = contract.describe()
    fix = f"drop it (the model records its input), or pass {names['ignore']} to use your options instead"
    order = contract.channel_order
    if "channel_order" in given and given["channel_order"] != order:
        message = (f"{names['channel_order']}: {given['channel_order'].upper()} contradicts the model's input "
                   f"contract ({recorded})")
        if contract.pixels != "unknown":
            raise ValueError(f"{message}; {fix}")
        warnings.append(f"{message}; using {given['channel_order'].upper()} as asked")
        order = given["channel_order"]
    mean, scale = 0.0, 1.0
    if contract.pixels == "normalized":
        mean = contract.mean if len(contract.mean) > 1 else contract.mean[0]
        scale = contract.scale
        for key, recorded_value in (("mean", mean), ("scale", scale)):
            if key in given and not _same(given[key], recorded_value):
                raise ValueError(f"{names[key]} {_text(given[key])} contradicts the model's input contract, which "
                                 f"records {key} {_text(recorded_value)} ({recorded}); {fix}")
    elif contract.pixels == "raw":
        doubled = [f"{names[key]} {_text(given[key])}" for key, identity in (("mean", 0.0), ("scale", 1.0))
                   if key in given and not _same(given[key], identity)]
        if doubled:
            warnings.append(f"{' '.join(doubled)} ignored: the model normalizes its input itself ({recorded}); "
                            "applying it here too would normalize twice")
    else:
        mean, scale = given.get("mean", 0.0), given.get("scale", 1.0)
        if "mean" not in given and "scale" not in given:
            warnings.append(f"the model's input contract does not record its normalization ({recorded}): feeding "
                            f"{order.upper()} pixels 0..255 unchanged; pass {names['mean']}/{names['scale']} if it "
                            "expects normalized input")
    use_flip = bool(flip)
    if contract.flip_in_model and flip:
        warnings.append(f"{names['flip']} ignored: the model adds the mirror image's feature itself ({recorded}); "
                        "flipping outside too would mirror twice")
        use_flip = False
    pre = Preprocessing(size=size, channel_order=order, mean=mean, scale=scale)
    origin = f"model's input contract: {recorded}"
    return Resolved(pre, use_flip, tuple(warnings), _describe(pre, use_flip, contract.flip_in_model, origin))


def _is_contract(value) -> bool:
    return all(hasattr(value, name) for name in ("pixels", "channel_order", "flip_in_model", "describe"))

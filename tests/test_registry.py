"""Enhancer and classifier registries: lookup, errors, the interpolation controls."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from core.enhance import create_enhancer, get_enhancer_spec, list_enhancers, register_enhancer
from core.models import create_classifier, list_classifiers, spec_of
from core.registry import Registry


@dataclass(frozen=True)
class ThingSpec:
    name: str
    factory: object
    description: str
    size: int = 1


def test_registry_refuses_duplicates_and_names_choices():
    r = Registry("thing", ThingSpec, attach=lambda built, spec: (built, spec.size))
    r.register("a", "an a", size=3)(lambda k, scale=2: k * scale)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a", "again")(lambda: None)
    with pytest.raises(ValueError, match="unknown thing 'b'; choose from a"):
        r.get("b")
    assert r.create("a", 5, scale=None) == (10, 3)  # None kwargs dropped; the spec reaches the built object
    with pytest.raises(ValueError, match="registered twice"):
        register_enhancer("original", "again", scale=1)(lambda **_: None)


def test_lists_and_patterns():
    assert {"original", "bicubic-x4", "lanczos-x4", "realesrgan-x4plus"} <= set(list_enhancers())
    assert list_enhancers("realesr*") and all(n.startswith("realesr") for n in list_enhancers("realesr*"))
    assert {"resnet50", "resnet18", "efficientnet_lite0", "simple_cnn"} <= set(list_classifiers())
    assert get_enhancer_spec("original").identity and not get_enhancer_spec("bicubic-x4").identity


@pytest.mark.parametrize("name", ["bicubic-x4", "lanczos-x4"])
def test_interpolation_controls_upscale_x4(name):
    im = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    enh = create_enhancer(name, device=None)  # None kwargs are dropped
    out = enh.enhance_batch([im, im[:12]])
    assert out[0].shape == (96, 128, 3) and out[1].shape == (48, 128, 3) and out[0].dtype == np.uint8
    assert enh.weights_id() != create_enhancer("original").weights_id()
    # a constant image stays constant: interpolation adds pixels, not content
    flat = np.full((8, 8, 3), 77, np.uint8)
    assert (enh.enhance_batch([flat])[0] == 77).all()


def test_classifier_heads_and_offline_pretrained():
    model, prov = create_classifier("efficientnet_lite0", 4, "imagenet")
    assert prov["source"].startswith("pypi:") and len(prov["sha256"]) == 64
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert spec_of(model).mean == (0.5, 0.5, 0.5)  # the spec travels with the model (normalisation, head)
    model, prov = create_classifier("simple_cnn", 4, "none")
    assert model.fc.out_features == 4 and prov["source"] == "none"
    assert spec_of(model).name == "simple_cnn" and "wbc_spec" not in str(model.state_dict().keys())
    with pytest.raises(ValueError, match="no classifier spec"):
        spec_of(torch.nn.Linear(2, 2))

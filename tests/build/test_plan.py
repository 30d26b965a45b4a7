"""What the plan keeps of each layer and flat image, and how a failure finds its images."""

from __future__ import annotations

from types import SimpleNamespace

from unpacked.build.plan import SOURCES, Plan, _add_image
from unpacked.registry.resolved import Layer, PlatformImage

LAYER = Layer("sha256:" + "1" * 64, 10, "application/vnd.oci.image.layer.v1.tar+gzip",
              "sha256:" + "2" * 64)
IMAGE = PlatformImage("linux/amd64", "sha256:" + "a" * 64,
                      "application/vnd.oci.image.manifest.v1+json", None, "sha256:" + "3" * 64,
                      None, [LAYER])


def _items(count: int) -> list:
    return [SimpleNamespace(ref=SimpleNamespace(url=f"https://reg.example/img:{i}"), repo="r",
                            name=f"reg.example/img:{i}") for i in range(count)]


def test_a_shared_layer_keeps_its_first_sources_and_every_image():
    """An ingest tries the first SOURCES images that carry a layer (in recipe order); the
    plan keeps no more of them, however many images share a base layer."""
    plan, items = Plan(), _items(SOURCES + 3)
    for item in items:
        _add_image(plan, item, IMAGE)
    entry = plan.layers[LAYER.digest]
    assert entry.sources == [(f"https://reg.example/img:{i}", LAYER) for i in range(SOURCES)]
    assert entry.images == [i.name for i in items]


def test_a_failed_layer_or_flat_image_names_the_images_it_serves():
    plan, items = Plan(), _items(3)
    for item in items:
        _add_image(plan, item, IMAGE)
    names = [i.name for i in items]
    assert plan.users("layer:" + "1" * 64) == names
    assert plan.users("flat:" + "3" * 64) == names
    assert plan.users("layer:" + "9" * 64) == [] and plan.users("image:x") == []
    assert plan.users("flat:" + "1" * 64) == [], "a layer is not a flat image"

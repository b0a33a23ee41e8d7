"""A procedurally generated web site of shape pictures with alt text, served on loopback, with its ground truth."""

from pipeline.demo_site.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SceneSpec,
    ShapeSpec,
    describe,
    different_scene,
    random_scene,
    render_scene,
    scene_attributes,
    scene_from_attributes,
)
from pipeline.demo_site.server import DemoSiteServer, serve
from pipeline.demo_site.site import (
    KINDS,
    DemoSite,
    DemoSiteConfig,
    build_site,
    mismatch_share,
    read_ground_truth,
    write_ground_truth,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "KINDS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "DemoSite",
    "DemoSiteConfig",
    "DemoSiteServer",
    "SceneSpec",
    "ShapeSpec",
    "build_site",
    "describe",
    "different_scene",
    "mismatch_share",
    "random_scene",
    "read_ground_truth",
    "render_scene",
    "scene_attributes",
    "scene_from_attributes",
    "serve",
    "write_ground_truth",
]

"""A scene's layout per image, from the compiler's geometry pass (no model, no torch): what `preview`,
`preview --on`, `build --masks` and `watch` draw or write.

``scene_layout`` runs the passes up to ``geometry``; ``write_canvas_masks`` writes one job's region
masks at canvas size (``<name>.mask-<entity>.png``, white inside, grey where feathered), atomically.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Layout:
    """The regions of every job of one scene."""

    ir: object  # the IR after the geometry pass
    canvas: tuple[int, int]
    name: str  # the scene's name
    regions: dict[str, list] = field(default_factory=dict)  # job id → [(entity, Region)], scene order
    image_size: tuple[int, int] | None = None  # the built images' size: the canvas, or a hires pass's

    def regions_at(self, job: str, size: tuple[int, int]) -> list:
        """The regions of ``job`` on an image of ``size`` (a hires image: the same fractions of its larger canvas,
        compiler/hires.py ``scaled``)."""
        regs = self.regions.get(job, [])
        if tuple(size) == tuple(self.canvas):
            return regs
        from scenec.compiler.hires import scaled

        sx, sy = size[0] / self.canvas[0], size[1] / self.canvas[1]
        return [(eid, scaled(r, sx, sy)) for eid, r in regs]


def plain_region(r):
    """The geometry pass's region as a `compiler.geometry.Region` (what preview and the masks draw)."""
    from scenec.compiler.geometry import Region

    return Region(r.entity, r.geom, r.feather_px, r.z)


def scene_layout(file: Path, model: str | None = None, overrides=(), ls=None) -> Layout:
    """The layout of ``file`` (or of the already loaded scene ``ls``); raises ``SceneError``."""
    from scenec.compiler.passes import run_passes
    from scenec.spec.load import load_scene

    ls = ls if ls is not None else load_scene(file, overrides=overrides)
    ir = run_passes(ls, model=model, until="geometry")
    canvas = (ls.scene.canvas.width, ls.scene.canvas.height)
    size = canvas
    if ls.scene.hires is not None:
        from scenec.compiler.hires import canvas_of

        size = canvas_of(canvas, ls.scene.hires.scale, ir.info.family.multiple)
    out = Layout(ir, canvas, ls.name, image_size=size)
    for job in ir.jobs():
        regs = []
        for s in ir.streams(job.id):
            r = ir.region_of(s.id)
            if r is not None:
                regs.append((s.name, plain_region(r)))
        out.regions[job.id] = regs
    return out


def mask_name(image_stem: str, entity: str) -> str:
    return f"{image_stem}.mask-{re.sub(r'[^A-Za-z0-9._-]+', '_', entity) or '_'}.png"


def write_canvas_masks(regions: list, canvas: tuple[int, int], image: Path) -> list[Path]:
    """Each region's coverage at canvas size beside ``image`` (an 8-bit greyscale PNG per entity)."""
    import io

    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from scenec.compiler.raster import rasterize
    from scenec.spec.fsio import atomic_write

    written = []
    for eid, reg in regions:
        cov = rasterize(reg.geom, reg.feather_px, canvas, 1)
        im = Image.fromarray(np.clip(np.round(cov * 255.0), 0, 255).astype(np.uint8), mode="L")
        info = PngInfo()
        info.add_text("scenec:image", image.name)
        info.add_text("scenec:entity", eid)
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=info)
        p = image.with_name(mask_name(image.stem, eid))
        atomic_write(p, buf.getvalue())
        written.append(p)
    return written

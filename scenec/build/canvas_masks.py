"""``scenec build --masks``: canvas-size region masks beside every selected, up-to-date image.

Masks come from the scene's geometry (:mod:`scenec.layout`), not from the model: an image that is
already up to date gets its masks without being built again, and no model is loaded for it. Masks are
not part of an output's cache key; the manifest lists each output's mask files.
"""

from __future__ import annotations

from .manifest import Manifest, locked_all
from .planning import BatchPlan, Item


def write_build_masks(items: list[Item], bp: BatchPlan, options, say) -> dict[str, list[str]]:
    """Write the masks of every item whose manifest entry is current (built now or cached); record them
    in the manifests. Returns the mask files written, by image (absolute paths). A scene whose layout cannot be computed
    or a directory that cannot be written is said, and the others go on."""
    from scenec.layout import scene_layout, write_canvas_masks
    from scenec.spec.diagnostics import SceneError

    by_dir: dict = {}
    for it in items:
        by_dir.setdefault(it.out_dir, []).append(it)
    layouts: dict = {}
    written: dict[str, list[str]] = {}
    with locked_all(sorted(by_dir)) as unwritable:
        for d, its in by_dir.items():
            if d in unwritable:
                continue
            man = Manifest.load(d)
            changed = False
            for it in its:
                e = man.outputs.get(it.name)
                if e is None or e.get("key") != it.key or not (d / e["image"]).is_file():
                    continue  # not built (failed or not selected)
                if it.scene_file not in layouts:
                    try:
                        layouts[it.scene_file] = scene_layout(it.scene_file, options.model, options.overrides)
                    except SceneError as err:
                        layouts[it.scene_file] = None
                        say(f"scenec: {it.display}: no masks: {err}")
                lay = layouts[it.scene_file]
                if lay is None:
                    continue
                size = lay.image_size or lay.canvas  # a `hires` image is larger than the canvas
                try:
                    paths = write_canvas_masks(lay.regions_at(it.job["id"], size), size, d / e["image"])
                except OSError as err:
                    say(f"scenec: cannot write masks of {it.name}: {err.strerror or err}")
                    continue
                e["masks"] = [p.relative_to(d).as_posix() for p in paths]
                written[str(d / e["image"])] = [str(p) for p in paths]
                changed = True
            if changed:
                try:
                    man.save()
                except OSError as err:
                    say(f"scenec: masks written, but {man.path} could not be updated: {err.strerror or err}")
    return written

"""`scenec preview` (a scene's layouts, or its regions over a built image with --on) and `scenec watch`,
registered on the app by scenec/cli.py. No torch unless `watch --build` builds."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from scenec.cli_options import GUIDANCE_OPTION, SEED_OPTION, SET_OPTION, STEPS_OPTION, local_model, overrides
from scenec.exits import EXIT_INVALID, bad_path, fail_invalid, internal, path_error, print_diags


def _layout_jobs(ir) -> list[dict]:
    """One layout per (group, variant): seeds do not change it."""
    from scenec.compiler.ir import ConditionNode
    from scenec.layout import plain_region

    jobs, seen = [], set()
    for job in ir.jobs():
        key = (job.group, job.variant)
        if key in seen:
            continue
        seen.add(key)
        regions, refs, related, whole = [], [], [], []
        for s in ir.streams(job.id):
            r = ir.region_of(s.id)
            if r is not None:
                regions.append((s.name, plain_region(r)))
            elif s.role == "entity":
                whole.append(s.name)  # a variant's prompt acts on the whole canvas
        by_entity = dict(regions)
        for c in ir.succ(job.id, ConditionNode):
            if c.entity in by_entity:
                refs.append((c.entity, c.path, c.fit, by_entity[c.entity]))
            if c.related is not None:
                related.append((c.entity, c.related))
        title = ir.scene.name if job.group is None else f"{job.group} / {job.variant}"
        jobs.append({"title": title, "group": job.group, "regions": regions, "references": refs, "related": related,
                     "whole_canvas": whole})
    return jobs


def render_layouts(ir, out: Path) -> None:
    """The layout sheet of a scene's IR (after geometry) at ``out``; raises OSError."""
    from scenec.compiler.preview import render_preview

    bg = ir.scene.scene.background.image
    kwargs = {"background": ir.scene.resolve(("background", "image"), bg)} if bg else {}
    render_preview(ir.scene, _layout_jobs(ir), out, **kwargs)


def _usage(msg: str) -> None:
    print(f"scenec: {msg}", file=sys.stderr)
    raise typer.Exit(EXIT_INVALID)


def _image_job(image: Path, lay) -> str:
    """The job of ``lay`` that ``image`` shows: from its PNG text (scenec:job), its sidecar, or its name."""
    import json

    from PIL import Image

    try:
        with Image.open(image) as im:
            size, meta = im.size, dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError) as e:
        _usage(f"--on {image}: not a readable image ({e})")
    if not meta.get("scenec:job"):
        try:
            side = json.loads(image.with_suffix(".json").read_text(encoding="utf-8"))
            meta = side if isinstance(side, dict) and side.get("image") == image.name else meta
        except (OSError, ValueError):
            pass
    scene_name, job = meta.get("scenec:scene"), meta.get("scenec:job") or image.stem
    if scene_name and scene_name != lay.name:
        _usage(f"--on {image}: built from scene `{scene_name}`, not from `{lay.name}`")
    if job not in lay.regions:  # built with other seeds (--seed): the same group/variant has the same layout
        g, v = meta.get("scenec:group") or None, meta.get("scenec:variant") or None
        same = [j.id for j in lay.ir.jobs() if (j.group, j.variant) == (g, v)] if meta.get("scenec:job") else []
        if not same:
            known = ", ".join(sorted(lay.regions)[:8])
            _usage(f"--on {image}: image `{job}` is not an image of scene `{lay.name}` (its images: {known})")
        job = same[0]
    want = lay.image_size or lay.canvas  # a `hires` scene's images are larger than its canvas
    if size != want:
        said = f"the scene's canvas {lay.canvas[0]}x{lay.canvas[1]}"
        if want != lay.canvas:
            said = f"the scene's images {want[0]}x{want[1]} ({said} with `hires`)"
        _usage(f"--on {image}: the image is {size[0]}x{size[1]}, {said}")
    return job


def preview(file: Path = typer.Argument(..., help="scene file"),
            out: Path = typer.Option(..., "-o", "--out", help="PNG to write"),
            on: Optional[Path] = typer.Option(None, "--on", help="a built image of this scene: draw its regions, "
                                              "labels and z-order over it (job from its metadata or name)"),
            model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                                help="model alias, id or directory"),
            seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
            guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION):
    """Draw each image's layout (regions, references, related regions; groups as contact sheets), or with
    --on IMAGE the regions over a built image."""
    from scenec.layout import scene_layout
    from scenec.spec.diagnostics import SceneError

    if out.is_dir():
        bad_path(out, "is a directory (-o names the PNG to write)")
    if out.suffix.lower() != ".png":
        bad_path(out, "preview writes a PNG: name it .png")
    if on is not None and not on.is_file():
        bad_path(on, "no such image (--on names a built PNG)")
    try:
        lay = scene_layout(file, model, overrides(seed, steps, guidance, set_))
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    try:
        if on is None:
            render_layouts(lay.ir, out)
        else:
            from PIL import Image

            from scenec.compiler.preview import render_overlay

            job = _image_job(on, lay)
            with Image.open(on) as im:
                render_overlay(im, lay.regions_at(job, im.size), out, title=job)
    except OSError as e:
        path_error(e)
    print(f"preview written to {out}", file=sys.stderr)


def _check(file: Path, model, ovr, out: Path, build: bool) -> list[str]:
    """Validate ``file`` and write its preview (and build it); print what happened. The files it read."""
    from scenec.compiler.check import check_partial, check_scene
    from scenec.compiler.resolve import resolve_model
    from scenec.layout import scene_layout
    from scenec.spec.diagnostics import Diagnostics, SceneError
    from scenec.spec.fsio import recording_inputs
    from scenec.spec.load import load_scene

    diags = Diagnostics()
    with recording_inputs() as inputs:
        try:
            ls = load_scene(file, diags, ovr)
            _, info = resolve_model(ls, model, diags)
            check_scene(ls, info, diags, model, ())
            lay = scene_layout(file, model, ovr, ls=ls)
        except SceneError as e:
            check_partial(e, model)
            diags, lay = e.diagnostics, None
        except Exception as e:  # noqa: BLE001 - a watch survives whatever one save does
            diags, lay = None, None
            print(f"scenec: {file}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
    if diags is not None:
        print_diags(diags)
    stamp = time.strftime("%H:%M:%S")
    if lay is None or (diags is not None and diags.has_errors()):
        n = len(diags.errors) if diags is not None else 1
        print(f"[{stamp}] {file}: {n} error{'s' if n != 1 else ''}; watching", file=sys.stderr, flush=True)
        return [str(file), *inputs]
    try:
        render_layouts(lay.ir, out)
        print(f"[{stamp}] {file}: valid; preview written to {out}", file=sys.stderr, flush=True)
    except OSError as e:
        print(f"[{stamp}] scenec: cannot write {out}: {e.strerror or e}", file=sys.stderr, flush=True)
    if build:
        _build(file, model, ovr)
    return [str(file), *inputs]


def _build(file: Path, model, ovr) -> None:
    from scenec.build.driver import build_batch
    from scenec.build.options import BuildOptions

    try:
        build_batch([str(file)], BuildOptions(model=model, overrides=ovr))
    except Exception as e:  # noqa: BLE001 - a failed build is said; the watch goes on
        print(f"scenec: {file}: build stopped: {e}", file=sys.stderr, flush=True)


def _stamp(path: str):
    try:
        st = Path(path).stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


def watch(files: List[Path] = typer.Argument(..., help="scene files"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="directory for the previews "
                                             "(default: beside each scene, SCENE.preview.png)"),
          build: bool = typer.Option(False, "--build", help="also build the scene (incrementally) after each save"),
          model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                              help="model alias, id or directory"),
          interval: float = typer.Option(0.5, "--interval", help="seconds between checks for saves"),
          max_cycles: int = typer.Option(0, "--max-cycles", hidden=True, help="stop after N checks (tests)"),
          seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
          guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION):
    """Re-validate and re-preview each scene on every save (its includes and images too); --build rebuilds.
    Errors print at FILE:LINE:COL and the watch goes on; Ctrl-C stops it after the check in progress
    (exit 0), a second Ctrl-C at once."""
    ovr = overrides(seed, steps, guidance, set_)
    for f in files:
        if not f.is_file():
            bad_path(f, "is a directory (watch takes scene files: name each, or a glob your shell expands)"
                     if f.is_dir() else "no such scene file")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            path_error(e)
    seen: dict[Path, dict] = {}  # scene → {path it read: stamp}
    cycles = 0
    stop: list[int] = []

    def on_sigint(signum, frame):
        """The first Ctrl-C stops after the check in progress (never an exception inside a library
        call); a second one interrupts it."""
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        while not stop:
            for f in files:
                old = seen.get(f)
                if old is None or any(_stamp(p) != s for p, s in old.items()):
                    dest = (out or f.parent) / f"{f.stem}.preview.png"
                    before = _stamp(str(f))  # a save while checking is seen next time
                    read = dict.fromkeys(_check(f, model, ovr, dest, build))
                    seen[f] = {p: _stamp(p) for p in read} | {str(f): before}
            cycles += 1
            if max_cycles and cycles >= max_cycles:
                break
            if cycles == 1:
                print(f"watching {len(files)} scene{'s' if len(files) != 1 else ''} (Ctrl-C to stop)",
                      file=sys.stderr, flush=True)
            end = time.monotonic() + max(0.05, interval)
            while not stop and time.monotonic() < end:
                time.sleep(0.05)
        if stop:
            print("scenec: watch stopped", file=sys.stderr)
    except KeyboardInterrupt:
        print("scenec: watch stopped", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, previous)
    raise typer.Exit(0)

"""Occlusion speed: z-occlusion of N entities in one image (goal: <= 1 s for 2000 entities).

Two layouts, generated from a seed (boxes and ellipses mixed, 1024x1024 canvas):

- ``pile``: shapes 2-27 % of the canvas side at random places, so most end up hidden under others
  (the worst case: every hidden one is also diagnosed, with who hides it);
- ``crowd``: a jittered grid of shapes a little larger than their cell, so most stay visible and
  each overlaps its neighbours.

For each it times the occlusion alone (``compiler.occlusion.occlude`` on the built shapes), the
compiler's ``resolve_regions`` (building the shapes, then occlusion), the whole ``check_geometry``
(also the size and feather warnings and every hidden region's diagnostic) and a cold ``scenec validate``
process. ``--direct`` takes the direct difference for every entity instead, as before the tiled coverage
(quadratic: minutes at 3500).

Usage: python bench/bench_occlusion.py [--n 2000 3500] [--layouts pile crowd] [--direct] [--reps 3] [--no-cli]
"""
import argparse
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import use_checkout


def scene_text(n: int, layout: str, seed: int = 0) -> str:
    rnd = random.Random(seed)
    lines = ["scenec: 1", "model: tiny", "canvas: {width: 1024, height: 1024}", "background: {prompt: bg}",
             "entities:"]
    side = math.ceil(math.sqrt(n))
    for i in range(n):
        if layout == "pile":
            w, h = rnd.uniform(0.02, 0.27), rnd.uniform(0.02, 0.27)
            x0, y0 = rnd.uniform(0, 1 - w), rnd.uniform(0, 1 - h)
        else:  # crowd: a cell per entity, the shape 1.3x the cell, jittered
            cell = 1.0 / side
            w = h = 1.3 * cell
            x0 = min(max(0.0, (i % side) * cell + rnd.uniform(-0.2, 0.2) * cell - 0.15 * cell), 1 - w)
            y0 = min(max(0.0, (i // side) * cell + rnd.uniform(-0.2, 0.2) * cell - 0.15 * cell), 1 - h)
        if i % 2:
            shape = f"{{box: [{x0:.5f}, {y0:.5f}, {x0 + w:.5f}, {y0 + h:.5f}]}}"
        else:
            shape = (f"{{ellipse: {{center: [{x0 + w / 2:.5f}, {y0 + h / 2:.5f}], "
                     f"radii: [{w / 2:.5f}, {h / 2:.5f}]}}}}")
        lines.append(f"  - {{id: e{i}, prompt: p{i}, shape: {shape}}}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 3500])
    ap.add_argument("--layouts", nargs="+", default=["pile", "crowd"])
    ap.add_argument("--direct", action="store_true", help="the direct difference for every entity (old algorithm)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-cli", action="store_true", help="skip the cold `scenec validate` process")
    args = ap.parse_args()

    use_checkout()
    from scenec.compiler import occlusion
    from scenec.compiler.caps import FLUX
    from scenec.compiler.geometry import check_geometry, resolve_regions
    from scenec.compiler.shapes import shape_geometry
    from scenec.spec.diagnostics import Diagnostics
    from scenec.spec.load import load_scene

    if args.direct:
        occlusion.EXACT_MAX = sys.maxsize
    print(f"{'layout':<6} {'n':>5}  {'occlusion':>9}  {'resolve_regions':>15}  {'check_geometry':>14}  "
          f"{'validate':>8}  hidden  ({'direct' if args.direct else 'tiled'}; median of {args.reps})")
    canvas = (1024, 1024)
    with tempfile.TemporaryDirectory() as d:
        for layout in args.layouts:
            for n in args.n:
                f = Path(d) / f"{layout}-{n}.yaml"
                f.write_text(scene_text(n, layout))
                ls = load_scene(f)
                ids = [e.id for e in ls.scene.entities]
                geoms = {i: shape_geometry(ls, e.shape, ("entities", i, "shape"), canvas, Diagnostics())
                         for i, e in enumerate(ls.scene.entities)}
                keys = {i: (float(i), i) for i in geoms}
                occ, res, full = [], [], []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    occlusion.occlude(geoms, keys, canvas)
                    occ.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    regions = resolve_regions(ls, ids, canvas, Diagnostics())
                    res.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    check_geometry(ls, FLUX, Diagnostics())
                    full.append(time.perf_counter() - t0)
                cli = "-"
                if not args.no_cli and not args.direct:
                    t0 = time.perf_counter()
                    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(f)], capture_output=True)
                    cli = f"{time.perf_counter() - t0:.2f} s"
                    assert r.returncode == 2, r.stderr.decode()[-500:]  # more entities than Flux allows
                hidden = sum(1 for r in regions.values() if r.geom.is_empty)
                print(f"{layout:<6} {n:>5}  {statistics.median(occ):>7.3f} s  {statistics.median(res):>13.3f} s  "
                      f"{statistics.median(full):>12.3f} s  {cli:>8}  {hidden:>6}", flush=True)


if __name__ == "__main__":
    main()

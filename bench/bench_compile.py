"""Compile-time geometry speed (goal on this 2-core machine):

- regions (shapes, boolean ops, z-occlusion) + rasterising every region to the Flux grids
  (latent 8 px/cell, token 16 px/cell) for a 32-entity 1024x1024 scene with polygons, ellipses,
  boolean ops and feathering: <= 100 ms in total.

Also prints the px_per_cell=1 rasterisation time (previews, `explain --masks`).

Usage: python bench/bench_compile.py [--reps 20] [--entities 32] [--canvas 1024]
"""
import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

GOAL_MS = 100.0


def scene_yaml(n: int, size: int, seed: int = 0) -> str:
    """A busy layout: boxes, star polygons, ellipses, unions, differences, intersections, feathering."""
    rnd = random.Random(seed)
    lines = ["scenec: 1", "model: flux-dev", f"canvas: {{width: {size}, height: {size}}}",
             "background: {prompt: 'a busy street'}", "entities:"]

    side = math.ceil(math.sqrt(n))

    def pt(i):  # a jittered grid: neighbours overlap, nothing is hidden entirely
        return ((i % side + 0.5 + rnd.uniform(-0.3, 0.3)) / side,
                (i // side + 0.5 + rnd.uniform(-0.3, 0.3)) / side)

    def ellipse(cx, cy, r):
        return f"{{ellipse: {{center: [{cx:.4f}, {cy:.4f}], radii: [{r:.4f}, {r * rnd.uniform(0.6, 1.4):.4f}]}}}}"

    def star(cx, cy, r, k):
        pts = []
        for j in range(2 * k):
            a = math.pi * j / k
            rr = r if j % 2 == 0 else r * 0.45
            pts.append(f"[{cx + rr * math.cos(a):.4f}, {cy + rr * math.sin(a):.4f}]")
        return "{polygon: [" + ", ".join(pts) + "]}"

    for i in range(n):
        cx, cy = pt(i)
        r = rnd.uniform(0.6, 1.0) / side
        kind = i % 6
        if kind == 0:
            shape = f"{{box: [{max(0, cx - r):.4f}, {max(0, cy - r):.4f}, {min(1, cx + r):.4f}, {min(1, cy + r):.4f}]}}"
        elif kind == 1:
            shape = star(cx, cy, r, rnd.randint(5, 9))
        elif kind == 2:
            shape = ellipse(cx, cy, r)
        elif kind == 3:
            shape = f"{{union: [{ellipse(cx, cy, r)}, {star(cx + r * 0.6, cy, r * 0.8, 6)}]}}"
        elif kind == 4:
            shape = f"{{difference: [{ellipse(cx, cy, r)}, {ellipse(cx + r * 0.3, cy - r * 0.2, r * 0.5)}]}}"
        else:
            shape = (f"{{intersection: [{ellipse(cx, cy, r)}, "
                     f"{{box: [{cx - r * 0.8:.4f}, {cy - r:.4f}, {cx + r:.4f}, {cy + r * 0.7:.4f}]}}]}}")
        lines.append(f"  - id: e{i}")
        lines.append(f"    prompt: 'thing {i}'")
        lines.append(f"    shape: {shape}")
        if i % 4 != 3:
            lines.append(f"    feather: {rnd.choice([0.01, 0.02, 0.03])}")
        if i % 7 == 0:
            lines.append(f"    z: {rnd.randint(0, n)}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--entities", type=int, default=32)
    ap.add_argument("--canvas", type=int, default=1024)
    args = ap.parse_args()

    from scenec.compiler import geometry as geo
    from scenec.compiler import raster
    from scenec.compiler.caps import FLUX
    from scenec.spec.diagnostics import Diagnostics
    from scenec.spec.load import load_scene

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "scenec.toml").write_text("")
        f = Path(d) / "busy.yaml"
        f.write_text(scene_yaml(args.entities, args.canvas))
        ls = load_scene(f)
    canvas = (args.canvas, args.canvas)
    ids = [e.id for e in ls.scene.entities]

    def once():
        raster._FEATHER_CACHE.clear()
        diags = Diagnostics()
        t0 = time.perf_counter()
        regions = geo.resolve_regions(ls, ids, canvas, diags)
        t1 = time.perf_counter()
        for r in regions.values():
            for _, px in FLUX.grids:
                raster.rasterize(r.geom, r.feather_px, canvas, px)
        t2 = time.perf_counter()
        assert not diags.has_errors(), [str(x) for x in diags]
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, regions

    once()  # warm-up (imports, caches of shapely)
    runs = [once() for _ in range(args.reps)]
    reg = statistics.median(r[0] for r in runs)
    ras = statistics.median(r[1] for r in runs)
    tot = statistics.median(r[0] + r[1] for r in runs)
    best = min(r[0] + r[1] for r in runs)
    print(f"{args.entities} entities, {args.canvas}x{args.canvas}, median of {args.reps}:")
    print(f"  regions (shapes, boolean ops, occlusion): {reg:7.1f} ms")
    print(f"  rasterise to latent (8 px) + token (16 px): {ras:7.1f} ms")
    print(f"  total: {tot:7.1f} ms, best {best:.1f} ms  (goal <= {GOAL_MS:.0f} ms) {'OK' if tot <= GOAL_MS else 'OVER'}")

    regions = runs[-1][2]
    shared = []
    for _ in range(args.reps):
        raster._FEATHER_CACHE.clear()
        t0 = time.perf_counter()
        for r in regions.values():
            raster.rasterize_grids(r.geom, r.feather_px, canvas, FLUX.grids)
        shared.append((time.perf_counter() - t0) * 1e3)
    print(f"  rasterise with rasterize_grids (token grid = block mean of latent): {statistics.median(shared):7.1f} ms")
    t0 = time.perf_counter()
    for r in regions.values():
        raster.rasterize(r.geom, r.feather_px, canvas, 1)
    print(f"  rasterise at canvas resolution (1 px), all regions: {(time.perf_counter() - t0) * 1e3:7.1f} ms")

    # the whole compile as `scenec compile` runs it: load, check, passes, lowering (no disk write)
    from scenec.compiler import compile_scene

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "scenec.toml").write_text("")
        f = Path(d) / "busy.yaml"
        f.write_text(scene_yaml(args.entities, args.canvas))
        compile_scene(f)  # warm-up
        whole = []
        for _ in range(args.reps):
            raster._FEATHER_CACHE.clear()
            t0 = time.perf_counter()
            compile_scene(f)
            whole.append((time.perf_counter() - t0) * 1e3)
    print(f"  whole compile_scene (load + check + passes + lower): median {statistics.median(whole):7.1f} ms, "
          f"best {min(whole):.1f} ms")


if __name__ == "__main__":
    main()

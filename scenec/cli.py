"""The `scenec` command line.

Exit status: 0 success, 1 a build failed, 2 invalid input (every problem printed as
FILE:LINE:COL: error: MESSAGE). No command prints a traceback for bad input; set SCENEC_DEBUG=1
to see one for an internal error. validate/compile/explain/preview/schema never import torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from scenec.exits import EXIT_BUILD_FAILED, EXIT_INVALID, bad_path, fail_invalid, internal, path_error, print_diags
from scenec.spec.diagnostics import printable

LORA_HELP = "PATH[:SCALE]: a LoRA .safetensors on the whole image (repeatable; after the scene's own)"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile declarative scene files into attention masks and schedules, and build images.")

@app.command()
def validate(files: List[Path] = typer.Argument(..., help="scene files"),
             model: Optional[str] = typer.Option(None, "--model", help="model alias, id or directory to check "
                                                 "against (default: the scene's `model`, scenec.toml's "
                                                 "`default_model`, else flux-dev)"),
             lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP)):
    """Check scene files; print every problem at FILE:LINE:COL, including what the model's family cannot run
    (canvas sizes, methods, entities per image)."""
    from scenec.spec.diagnostics import Diagnostics, SceneError
    from scenec.spec.load import load_scene

    from scenec.compiler.check import check_scene
    from scenec.compiler.resolve import resolve_model

    bad = 0
    for f in files:
        diags = Diagnostics()
        try:
            ls = load_scene(f, diags)
            _, info = resolve_model(ls, model, diags)
            check_scene(ls, info, diags, model, lora or ())
        except SceneError as e:
            diags = e.diagnostics
        except Exception as e:  # noqa: BLE001 - never a traceback for a user's file
            internal(e)
        print_diags(diags)
        if diags.has_errors():
            bad += 1
    if bad:
        print(f"{bad} of {len(files)} file{'s' if len(files) != 1 else ''} invalid", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    print(f"ok: {len(files)} file{'s' if len(files) != 1 else ''} valid", file=sys.stderr)


@app.command("compile")
def compile_(file: Path = typer.Argument(..., help="scene file"),
             out: Path = typer.Option(..., "-o", "--out", help="plan directory to write"),
             model: Optional[str] = typer.Option(None, "--model", help="model alias, id or directory"),
             lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP)):
    """Compile a scene to a plan: DIR/plan.json + DIR/tensors.safetensors; prints the plan hash."""
    from scenec.spec.diagnostics import SceneError

    from scenec.compiler import compile_scene

    if out.exists() and not out.is_dir():
        bad_path(out, "exists and is not a directory (-o names the plan directory)")
    try:
        plan = compile_scene(file, model=model, lora=lora or ())
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    try:
        plan.write(out)
    except OSError as e:
        path_error(e)
    for w in plan.warnings:
        print(w.format(), file=sys.stderr)
    print(plan.plan_hash)


@app.command()
def explain(file: Path = typer.Argument(..., help="scene file"),
            after: Optional[str] = typer.Option(None, "--after", help="print the IR after this pass: check, expand, geometry, schedule or lower"),
            masks: Optional[Path] = typer.Option(None, "--masks", help="write each job's region masks as PNGs here"),
            model: Optional[str] = typer.Option(None, "--model", help="model alias, id or directory")):
    """Print the IR as text (after every pass, or --after PASS)."""
    from scenec.spec.diagnostics import SceneError
    from scenec.spec.load import load_scene

    from scenec.compiler.passes import PASS_NAMES, run_passes
    from scenec.compiler.printer import print_ir

    if after is not None and after not in PASS_NAMES:
        print(f"scenec: unknown pass `{after}`; passes: {', '.join(PASS_NAMES)}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    try:
        ir = run_passes(load_scene(file), model=model, until=None if after in (None, "lower") else after)
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    sys.stdout.write(print_ir(ir))
    if masks is not None:
        from scenec.compiler.preview import write_mask_pngs

        if "geometry" not in ir.passes:
            ir = run_passes(ir.scene, model=model, until="geometry")
        for job in ir.jobs():
            regs = {}
            for s in ir.streams(job.id):
                r = ir.region_of(s.id)
                if r is not None:
                    regs[s.name] = _region(r)
            try:
                write_mask_pngs(regs, ir.canvas, masks / job.id)
            except OSError as e:
                path_error(e)
        print(f"masks written to {masks}", file=sys.stderr)


def _region(r):
    from scenec.compiler.geometry import Region

    return Region(r.entity, r.geom, r.feather_px, r.z)


@app.command()
def preview(file: Path = typer.Argument(..., help="scene file"),
            out: Path = typer.Option(..., "-o", "--out", help="PNG to write"),
            model: Optional[str] = typer.Option(None, "--model", help="model alias, id or directory")):
    """Draw each image's layout (regions, references, related regions; groups as contact sheets)."""
    from scenec.spec.diagnostics import SceneError
    from scenec.spec.load import load_scene

    from scenec.compiler.ir import ConditionNode
    from scenec.compiler.passes import run_passes
    from scenec.compiler.preview import render_preview

    if out.is_dir():
        bad_path(out, "is a directory (-o names the PNG to write)")
    try:
        ir = run_passes(load_scene(file), model=model, until="geometry")
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    jobs = []
    seen = set()
    for job in ir.jobs():
        key = (job.group, job.variant)
        if key in seen:  # seeds do not change the layout
            continue
        seen.add(key)
        regions, refs, related, whole = [], [], [], []
        for s in ir.streams(job.id):
            r = ir.region_of(s.id)
            if r is not None:
                regions.append((s.name, _region(r)))
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
    bg = ir.scene.scene.background.image
    kwargs = {}
    if bg:
        kwargs["background"] = ir.scene.resolve(("background", "image"), bg)
    try:
        render_preview(ir.scene, jobs, out, **kwargs)
    except OSError as e:
        path_error(e)
    print(f"preview written to {out}", file=sys.stderr)


@app.command()
def schema():
    """Print the JSON Schema of scene files."""
    from scenec.spec.schema import scene_schema_text

    sys.stdout.write(scene_schema_text())


STARTER = """\
# yaml-language-server: $schema={schema}
scenec: 1
model: tiny                      # offline random model: makes noise, not pictures; try flux-dev
canvas: {{width: 256, height: 256}}
sampler: {{steps: 4, seed: 1}}
background:
  prompt: "a vibrant meadow under a clear blue sky"
entities:
  - id: fox
    prompt: "a red fox running"
    shape: {{box: [0.1, 0.5, 0.5, 0.95]}}
  - id: eagle
    prompt: "an eagle soaring"
    shape: {{ellipse: {{center: [0.7, 0.25], radii: [0.2, 0.12]}}}}
output:
  dir: out
"""


@app.command()
def init(directory: Path = typer.Argument(Path("."), help="project directory"),
         force: bool = typer.Option(False, "--force", help="overwrite existing files")):
    """Start a project: scenec.toml and a starter scene."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        path_error(e)
    toml = directory / "scenec.toml"
    scene = directory / "scene.yaml"
    for f in (toml, scene):
        if f.exists() and not force:
            print(f"scenec: {f} exists (use --force to overwrite)", file=sys.stderr)
            raise typer.Exit(EXIT_INVALID)
    try:
        toml.write_text("# scenec project: paths in scenes must stay inside this directory\n"
                        "[project]\ndefault_model = \"tiny\"\n")
        scene.write_text(STARTER.format(schema="https://scenec.dev/schemas/scene.schema.json"))
    except OSError as e:
        path_error(e)
    print(f"wrote {toml} and {scene}; next: scenec build {scene}", file=sys.stderr)


@app.command()
def build(files: List[str] = typer.Argument(..., help="scene files, directories (searched recursively) or globs"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory (overrides output.dir)"),
          model: Optional[str] = typer.Option(None, "--model", help="model alias, id or local diffusers directory"),
          device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32"),
          lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
          offload: str = typer.Option("none", "--offload", help="none | model | sequential: CPU offload (CUDA)"),
          quantize: str = typer.Option("none", "--quantize", help="none | nf4 | int8 | fp8 (CUDA; scenec[quant])"),
          masks: bool = typer.Option(False, "--masks", help="also write attention masks at token resolution"),
          compile_: bool = typer.Option(False, "--compile", help="torch.compile the model's repeated blocks"),
          select: Optional[List[str]] = typer.Option(None, "--select", "-s", help="build only: NAME, GROUP/"
                                                     "VARIANT, scene:, group:, path:, seed:, KEY=VALUE, docs/batch.md"),
          exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="skip these (same syntax as --select)"),
          force: bool = typer.Option(False, "--force", help="rebuild selected outputs even when up to date"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list what would be built and why; build nothing"),
          executor: str = typer.Option("local", "--executor", help="local | ray"),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local Ray)"),
          workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: 1 per GPU, else CPU)"),
          weights_hash: str = typer.Option("stat", "--weights-hash",
                                           help="identity of local model dirs: stat (names, sizes, mtimes) | content"),
          batch_size: int = typer.Option(1, "--batch-size", "-b",
                                         help="run up to N compatible jobs (any scenes) as one batch on the model "
                                              "(Flux and SD; docs/batch.md)"),
          json_: bool = typer.Option(False, "--json", help="print a one-line JSON summary")):
    """Build scenes incrementally: only outputs whose cache key changed (scenec-manifest.json in each OUTDIR)."""
    import json
    import time

    from scenec.build.options import BatchError, BuildOptions
    from scenec.build.reporting import BuildReport

    report, t0 = BuildReport(), time.perf_counter()

    def end(code: int, message: str | None = None) -> None:
        """Every build ends with its summary line, whatever stopped it."""
        if message:
            print(message, file=sys.stderr)
        report.finish(time.perf_counter() - t0, not_selected=0)
        raise typer.Exit(code)

    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        end(EXIT_INVALID, f"scenec: --dtype must be bf16, fp16 or fp32, not `{dtype}`")
    if device is not None and device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        end(EXIT_INVALID, f"scenec: --device must be cuda or cpu, not `{device}`")
    from scenec.build.driver import build_batch
    from scenec.runtime.memory import problem
    if why := problem(offload, quantize, device, values_only=dry_run):  # before anything loads
        end(EXIT_INVALID, f"scenec: {why}")
    try:
        summary = build_batch(files, BuildOptions(
            out=out, model=model, select=select or (), exclude=exclude or (), force=force, masks=masks,
            weights_hash=weights_hash, dry_run=dry_run, device=device, dtype=dtype, batch_size=batch_size,
            compile=compile_, executor=executor, address=address, workers=workers, lora=lora or (),
            offload=offload, quantize=quantize), report=report)
    except BatchError as e:
        end(EXIT_INVALID, f"scenec: {e}")
    except KeyboardInterrupt:
        end(130, "scenec: interrupted")
    except Exception as e:  # noqa: BLE001
        if os.environ.get("SCENEC_DEBUG"):
            raise
        end(EXIT_BUILD_FAILED, f"scenec: internal error: {type(e).__name__}: {e} (set SCENEC_DEBUG=1 for a traceback)")
    if dry_run and not json_:
        for o in summary["outputs"]:
            if o["status"] == "would-build":
                print(f"{o['state']:<9} {printable(o['image'])}  ({o['reason']}; {o['scene']})")
    if json_:
        print(json.dumps({k: summary[k] for k in ("built", "cached", "failed", "invalid", "outputs")}))
    if summary.get("invalid"):
        raise typer.Exit(EXIT_INVALID)
    if summary.get("failed"):
        raise typer.Exit(EXIT_BUILD_FAILED)


@app.command()
def status(files: List[str] = typer.Argument(..., help="scene files, directories or globs"),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory (overrides output.dir)"),
           model: Optional[str] = typer.Option(None, "--model", help="model alias, id or local diffusers directory"),
           select: Optional[List[str]] = typer.Option(None, "--select", "-s", help="only these (docs/batch.md)"),
           exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="not these"),
           weights_hash: str = typer.Option("stat", "--weights-hash", help="stat | content (local model dirs)"),
           lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
           verbose: bool = typer.Option(False, "-v", "--verbose", help="list up-to-date outputs too"),
           exit_code: bool = typer.Option(False, "--exit-code", help="exit 1 when an output is missing or stale"),
           json_: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Show missing and stale outputs against the scene files, like `git status` (no model, no torch)."""
    import json

    from scenec.build.options import BatchError, BuildOptions
    from scenec.build.reporting import format_status
    from scenec.build.reporting import status as run_status

    try:
        rep = run_status(files, BuildOptions(out=out, model=model, select=select or (), exclude=exclude or (),
                                             weights_hash=weights_hash, lora=lora or ()))
    except BatchError as e:
        print(f"scenec: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    except Exception as e:  # noqa: BLE001
        internal(e)
    print_diags(rep["diagnostics"])
    for f, msg in rep["failed_compile"]:
        print(f"scenec: {f}: {msg}", file=sys.stderr)
    if json_:
        print(json.dumps({k: rep[k] for k in ("outputs", "orphaned", "counts", "stale", "invalid", "scenes")}))
    else:
        print(format_status(rep, verbose=verbose))
    if rep["invalid"]:
        raise typer.Exit(EXIT_INVALID)
    if exit_code and (rep["stale"] or rep["failed_compile"]):
        raise typer.Exit(EXIT_BUILD_FAILED)


# --- eval / tune / split (logic in scenec/eval.py, metrics.py, clip.py, tune.py, isotonic.py, split.py) --

def _fail_eval(e) -> None:
    print(f"scenec: {e}", file=sys.stderr)
    raise typer.Exit(getattr(e, "exit_code", EXIT_INVALID))


# the metric's options, shared by `eval` and `tune` (the objective tune maximises is eval's metric)
CLIP_OPTION = typer.Option("openai/clip-vit-large-patch14", "--clip",
                           help="CLIP model id or local directory; `tiny` (random), `none` to skip CLIPScore")
WEIGHTS_OPTION = typer.Option("1,1", "--weights", help="a,b of the combined metric a·BgSim + b·CLIPScore")
TEXT_OPTION = typer.Option("full", "--text", help="CLIPScore text: full (entity + background) | entity")
SEGMENTER_OPTION = typer.Option(None, "--segmenter", help="module:function masking prompt variants")


@app.command("eval")
def eval_(directory: Path = typer.Argument(..., help="directory of built images and their sidecars"),
          scene: Optional[List[Path]] = typer.Option(None, "--scene", help="scene file the images were built from"),
          plan: Optional[List[Path]] = typer.Option(None, "--plan", help="compiled plan directory instead of --scene"),
          group: Optional[List[str]] = typer.Option(None, "--group", help="only these groups"),
          clip: str = CLIP_OPTION, weights: str = WEIGHTS_OPTION, text: str = TEXT_OPTION,
          segmenter: Optional[str] = SEGMENTER_OPTION,
          model: Optional[str] = typer.Option(None, "--model", help="the --model the images were built with"),
          json_: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Coupled-generation metrics per group: BgSim, CLIPScore and a·BgSim + b·CLIPScore."""
    import json

    from scenec.spec.diagnostics import SceneError

    from scenec.eval import evaluate_dir, load_segmenter, render_table
    from scenec.metrics import EvalError, parse_weights

    try:
        w = parse_weights(weights)
        seg = load_segmenter(segmenter)
        report = evaluate_dir(directory, scenes=scene or (), plan_dirs=plan or (), clip=clip, weights=w,
                              segmenter=seg, text=text, model=model, groups=group or None)
    except EvalError as e:
        _fail_eval(e)
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        from scenec.spec.errors import RuntimeErrorBase

        if isinstance(e, RuntimeErrorBase):
            _fail_eval(EvalError(str(e), exit_code=EXIT_BUILD_FAILED))
        internal(e)
    for msg in report["warnings"]:
        print(f"scenec: warning: {msg}", file=sys.stderr)
    if json_:
        print(json.dumps(report, indent=1))
    else:
        from rich.console import Console

        Console().print(render_table(report))


@app.command()
def tune(file: Path = typer.Argument(..., help="scene file"),
         group: Optional[str] = typer.Option(None, "--group", help="the group to tune (default: the only one)"),
         budget: int = typer.Option(20, "--budget", help="number of θ candidates to evaluate (each builds the group)"),
         method: str = typer.Option("both", "--method", help="param | vector | both"),
         out: Optional[Path] = typer.Option(None, "-o", "--out", help="schedule file (default: schedules/SCENE-GROUP.json)"),
         clip: str = CLIP_OPTION, weights: str = WEIGHTS_OPTION, text: str = TEXT_OPTION,
         segmenter: Optional[str] = SEGMENTER_OPTION,
         model: Optional[str] = typer.Option(None, "--model", help="model alias, id or local diffusers directory"),
         device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)"),
         dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32"),
         seed: int = typer.Option(0, "--seed", help="seed of the vector search's random directions")):
    """Optimise a group's θ schedule (non-decreasing, in [0, 1]) for a·BgSim + b·CLIPScore; resumable."""
    from scenec.spec.diagnostics import SceneError

    from scenec.eval import load_segmenter
    from scenec.metrics import EvalError, parse_weights
    from scenec.tune import tune as run_tune

    try:
        w = parse_weights(weights)
        seg = load_segmenter(segmenter)
        res = run_tune(file, group=group, budget=budget, method=method, output=out, weights=w,
                       clip=None if clip.lower() == "none" or w[1] == 0 else clip, model=model,
                       device=device, dtype=dtype, segmenter=seg, text=text, seed=seed)
    except EvalError as e:
        _fail_eval(e)
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    best = res["best"]
    print(f"scenec: {res['evaluated']} candidates ({res['built']} built now); best {best['objective']:.4f} "
          f"by {best['method']}; wrote {res['output']} (state: {res['state']})", file=sys.stderr)
    print(f"add to group `{res['group']}`:  {res['line']}", file=sys.stderr)
    print(res["line"])


@app.command()
def split(file: Path = typer.Argument(..., help="text file: one full prompt per line"),
          out: Path = typer.Option(..., "-o", "--out", help="scene file to write"),
          model: str = typer.Option("tiny", "--model", help="the scene's `model`"),
          canvas: str = typer.Option("1024x1024", "--canvas", help="WIDTHxHEIGHT"),
          group: str = typer.Option("split", "--group", help="the group's id"),
          llm: Optional[str] = typer.Option(None, "--llm", help="split with this local causal LM (transformers)"),
          force: bool = typer.Option(False, "--force", help="overwrite an existing scene file")):
    """Split N prompts into one shared background + N entity prompts; write a scene with one group."""
    from scenec.split import SplitError, heuristic_split, llm_split, parse_canvas, read_prompts, scene_text

    try:
        width, height = parse_canvas(canvas)
        if out.exists() and not force:
            raise SplitError(f"{out} exists (use --force to overwrite)")
        prompts = read_prompts(file)
        if llm:
            from scenec.split import transformers_generator

            res = llm_split(prompts, transformers_generator(llm))
        else:
            res = heuristic_split(prompts)
    except SplitError as e:
        print(f"scenec: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    except Exception as e:  # noqa: BLE001
        internal(e)
    for w in res.warnings:
        print(f"scenec: warning: {w}", file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(scene_text(res, model=model, width=width, height=height, group=group, source=file.name),
                       encoding="utf-8")
    except OSError as e:
        path_error(e)
    print(f"wrote {out}: background {res.background!r}, {len(res.entities)} variants; next: scenec validate {out}",
          file=sys.stderr)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("scenec: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a traceback is a bug report, shown only on request
        if os.environ.get("SCENEC_DEBUG"):
            raise
        print(f"scenec: internal error: {type(e).__name__}: {e} (set SCENEC_DEBUG=1 for a traceback)",
              file=sys.stderr)
        sys.exit(EXIT_BUILD_FAILED)


if __name__ == "__main__":
    main()

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

from scenec.cli_layout import preview, watch
from scenec.cli_options import (
    GUIDANCE_OPTION,
    LORA_HELP,
    SEED_OPTION,
    SET_OPTION,
    STEPS_OPTION,
    check_loras,
    local_model,
    overrides,
    project_targets,
    weights_hash_of,
)
from scenec.cli_tools import eval_, show, split, tune
from scenec.cli_train import train_adapter
from scenec.exits import (EXIT_BUILD_FAILED, EXIT_INVALID, Terminated, bad_path, fail_invalid, internal, path_error,
                          print_diags, sigterm_raises)
from scenec.spec.diagnostics import printable

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile declarative scene files into attention masks and schedules, and build images.")


def _version(value: bool) -> None:
    if value:
        from scenec import __version__

        print(f"scenec {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print scenec's version and exit")):
    """Compile declarative scene files into attention masks and schedules, and build images."""

@app.command()
def validate(files: Optional[List[str]] = typer.Argument(
                 None, help="scene files, directories (searched recursively) or globs; a library file (only `defs`) "
                 "is checked as one; default: the project"),
             model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                                 help="model alias, id or directory to check "
                                                 "against (default: the scene's `model`, scenec.toml's "
                                                 "`default_model`, else flux-dev)"),
             lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
             seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
             guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION):
    """Check scene files; print every problem at FILE:LINE:COL, including what the model's family cannot run
    (canvas sizes, methods, entities per image)."""
    from scenec.spec.diagnostics import Diagnostics, SceneError
    from scenec.spec.load import load_scene

    from scenec.compiler.check import check_partial, check_scene
    from scenec.compiler.resolve import resolve_model

    from scenec.build.discovery import discover, is_library_file
    from scenec.spec.load import load_library

    ovr = overrides(seed, steps, guidance, set_)
    check_loras(lora)
    found, problems = discover(project_targets(files, "validate"), libraries=True)
    print_diags(problems)
    bad = sum(d.severity == "error" for d in problems)
    flags: set = set()  # a problem with a flag (--steps abc) is the same for every file: printed once
    for f in found:
        diags = Diagnostics()
        if is_library_file(f):
            load_library(f, diags)
            print_diags(diags)
            bad += diags.has_errors()
            continue
        try:
            ls = load_scene(f, diags, ovr)
            _, info = resolve_model(ls, model, diags)
            check_scene(ls, info, diags, model, lora or ())
        except SceneError as e:
            check_partial(e, model)  # the checks' problems too, with the bad values left out
            diags = e.diagnostics
        except Exception as e:  # noqa: BLE001 - never a traceback for a user's file
            internal(e)
        print_diags([d for d in diags.sorted() if d.pos.line or d.format() not in flags])
        flags.update(d.format() for d in diags if not d.pos.line)
        if diags.has_errors():
            bad += 1
    n = len(found) + sum(d.severity == "error" for d in problems)
    if bad:
        print(f"{bad} of {n} file{'s' if n != 1 else ''} invalid", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    print(f"ok: {n} file{'s' if n != 1 else ''} valid", file=sys.stderr)


@app.command("compile")
def compile_(file: Path = typer.Argument(..., help="scene file"),
             out: Path = typer.Option(..., "-o", "--out", help="plan directory to write"),
             model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                                 help="model alias, id or directory"),
             lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
             seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
             guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION):
    """Compile a scene to a plan: DIR/plan.json + DIR/tensors.safetensors; prints the plan hash."""
    from scenec.spec.diagnostics import SceneError

    from scenec.compiler import compile_scene

    if out.exists() and not out.is_dir():
        bad_path(out, "exists and is not a directory (-o names the plan directory)")
    check_loras(lora)
    try:
        plan = compile_scene(file, model=model, lora=lora or (), overrides=overrides(seed, steps, guidance, set_))
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
            after: Optional[str] = typer.Option(None, "--after", help="print only the IR after this pass: check, "
                                                "expand, geometry, schedule, or lower (the plan)"),
            masks: Optional[Path] = typer.Option(None, "--masks", help="write each job's region masks as PNGs here"),
            model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                                help="model alias, id or directory"),
            seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
            guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION):
    """Print the IR as text after every pass, then the plan (or only what --after PASS made)."""
    from scenec.spec.diagnostics import SceneError
    from scenec.spec.load import load_scene

    from scenec.compiler import explain_scene
    from scenec.compiler.passes import PASS_NAMES, run_passes

    if after is not None and after not in PASS_NAMES:
        print(f"scenec: unknown pass `{after}`; passes: {', '.join(PASS_NAMES)}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    if masks is not None and masks.exists() and not masks.is_dir():
        bad_path(masks, "exists and is not a directory (--masks names the directory for the mask PNGs)")
    try:
        text, ir = explain_scene(load_scene(file, overrides=overrides(seed, steps, guidance, set_)), model, after)
    except SceneError as e:
        fail_invalid(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    sys.stdout.write(text)
    if masks is not None:
        from scenec.compiler.preview import write_mask_pngs
        from scenec.layout import plain_region

        if "geometry" not in ir.passes:
            ir = run_passes(ir.scene, model=model, until="geometry")
        for job in ir.jobs():
            regs = {}
            for s in ir.streams(job.id):
                r = ir.region_of(s.id)
                if r is not None:
                    regs[s.name] = plain_region(r)
            try:
                write_mask_pngs(regs, ir.canvas, masks / job.id)
            except OSError as e:
                path_error(e)
        print(f"masks written to {masks}", file=sys.stderr)


app.command()(preview)


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
    """Start a project: scenec.toml, a starter scene, and the scene schema its modeline points at (editors
    complete and check scene files offline)."""
    from scenec.spec.fsio import atomic_write
    from scenec.spec.schema import scene_schema_text

    if directory.exists() and not directory.is_dir():
        bad_path(directory, "exists and is not a directory (init takes the project directory)")
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
        atomic_write(toml, b"# scenec project: paths in scenes must stay inside this directory\n"
                           b"[project]\ndefault_model = \"tiny\"\n")
        (directory / "schemas").mkdir(exist_ok=True)  # generated: rewritten by every init, this scenec's schema
        atomic_write(directory / "schemas" / "scene.schema.json", scene_schema_text().encode())
        atomic_write(scene, STARTER.format(schema="schemas/scene.schema.json").encode())
    except OSError as e:
        path_error(e)
    print(f"wrote {toml}, {scene} and {directory / 'schemas' / 'scene.schema.json'}; next: scenec build {scene}",
          file=sys.stderr)


@app.command()
def build(files: Optional[List[str]] = typer.Argument(None, help="scene files, directories (searched recursively) "
                                                                 "or globs; default: the project"),
          from_: Optional[Path] = typer.Option(None, "--from", help="rebuild this PNG from the scene embedded in it "
                                               "(with -o DIR; its files from the project root)"),
          project: Optional[Path] = typer.Option(None, "--project", help="with --from: the project root holding "
                                                 "the scene's files (default: nearest scenec.toml up from here)"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory (overrides output.dir)"),
          model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                              help="model alias, id or local diffusers directory"),
          device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32"),
          lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
          offload: str = typer.Option("none", "--offload", help="none | model | sequential: CPU offload (CUDA)"),
          quantize: str = typer.Option("none", "--quantize",
                                       help="none | nf4 | int8 | fp8 (CUDA; the scenec\\[quant] extra)"),
          masks: bool = typer.Option(False, "--masks", help="also write canvas-size region masks beside the images "
                                                "(up-to-date images are not rebuilt)"),
          compile_: bool = typer.Option(False, "--compile", help="torch.compile the model's repeated blocks"),
          select: Optional[List[str]] = typer.Option(None, "--select", "-s", help="build only: NAME, GROUP/"
                                                     "VARIANT, scene:, group:, path:, seed:, KEY=VALUE, docs/batch.md"),
          exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="skip these (same syntax as --select)"),
          force: bool = typer.Option(False, "--force", help="rebuild selected outputs even when up to date"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list what would be built and why; build nothing"),
          executor: str = typer.Option("local", "--executor", help="local | ray"),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local Ray)"),
          workers: Optional[int] = typer.Option(None, "--workers", help="Ray workers (default: 1 per GPU, else CPU)"),
          weights_hash: Optional[str] = typer.Option(
              None, "--weights-hash", help="identity of local model dirs: stat (names, sizes, mtimes) | content; "
              "default: scenec.toml's weights_hash, else stat"),
          batch_size: int = typer.Option(1, "--batch-size", "-b",
                                         help="run up to N compatible jobs (any scenes) as one batch on the model "
                                              "(Flux and SD; docs/batch.md)"),
          seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
          guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION,
          quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress display and no line per image; "
                                                                  "problems and the summary line still print"),
          json_: bool = typer.Option(False, "--json", help="print a one-line JSON summary")):
    """Build scenes incrementally: only outputs whose cache key changed (scenec-manifest.json in each OUTDIR);
    `--from IMAGE.png -o DIR` rebuilds one built image from the scene embedded in it."""
    import json
    import time

    from scenec.build.options import BatchError, BuildOptions
    from scenec.build.reporting import BuildReport

    # on a terminal: a live display (model loading, each image's steps, steps/s, time left)
    report, t0 = BuildReport(live=True, lines=not quiet), time.perf_counter()

    def summary_json(summary: dict, error: str | None = None) -> str:
        keys = ("built", "cached", "failed", "invalid", "outputs")
        return json.dumps({**{k: summary[k] for k in keys}, **({"error": error} if error else {})})

    def end(code: int, message: str | None = None) -> None:
        """Every build ends with its summary line (with --json, its JSON too), whatever stopped it."""
        if message:
            print(message, file=sys.stderr)
        summary = report.finish(time.perf_counter() - t0, not_selected=0)
        if json_:  # a CI script parsing stdout gets JSON however the build ended
            print(summary_json(summary, (message or "").removeprefix("scenec: ") or f"exit status {code}"))
        raise typer.Exit(code)

    if dtype is not None and dtype not in ("bf16", "fp16", "fp32"):
        end(EXIT_INVALID, f"scenec: --dtype must be bf16, fp16 or fp32, not `{dtype}`")
    if device is not None and device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        end(EXIT_INVALID, f"scenec: --device must be cuda or cpu, not `{device}`")
    if from_ is None:
        files = project_targets(files, "build")
    else:
        if files:
            end(EXIT_INVALID, "scenec: give scene files to build, or --from IMAGE.png (not both)")
        # --from rebuilds the image as it was made: a flag that would change it (or what is built) is refused
        ignored = [flag for flag, given in (
            ("--model", model), ("--lora", lora), ("--offload", offload != "none"), ("--quantize", quantize != "none"),
            ("--masks", masks), ("--compile", compile_), ("--select", select), ("--exclude", exclude),
            ("--force", force), ("--dry-run", dry_run), ("--executor", executor != "local"), ("--address", address),
            ("--workers", workers), ("--weights-hash", weights_hash is not None), ("--batch-size", batch_size != 1),
            ("--seed", seed), ("--steps", steps), ("--guidance", guidance), ("--set", set_)) if given]
        if ignored:
            end(EXIT_INVALID, f"scenec: --from rebuilds the image as it was made; {', '.join(ignored)} cannot be "
                "combined with it (to change it, build its scene: `scenec show IMAGE.png` prints it)")
        from scenec.cli_tools import build_from

        return build_from(from_, out, project, device, dtype, quiet, json_)
    ovr = overrides(seed, steps, guidance, set_, on_error=lambda msg: end(EXIT_INVALID, msg))
    weights = weights_hash_of(weights_hash)  # a bad scenec.toml value: one line, exit 2
    check_loras(lora, on_error=lambda msg: end(EXIT_INVALID, msg))
    from scenec.build.driver import build_batch
    from scenec.runtime.memory import problem
    if why := problem(offload, quantize, device, values_only=dry_run):  # before anything loads
        end(EXIT_INVALID, f"scenec: {why}")
    try:
        with sigterm_raises() as sigterm:  # `timeout`, a CI runner's cancel: stopped as Ctrl-C stops it
            summary = build_batch(files, BuildOptions(
                out=out, model=model, select=select or (), exclude=exclude or (), force=force, masks=masks,
                weights_hash=weights, dry_run=dry_run, device=device, dtype=dtype, batch_size=batch_size,
                compile=compile_, executor=executor, address=address, workers=workers, lora=lora or (),
                offload=offload, quantize=quantize, overrides=ovr), report=report)
    except BatchError as e:
        end(EXIT_INVALID, f"scenec: {e}")
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated) or sigterm.is_set()
        end(143 if term else 130, "scenec: terminated (SIGTERM)" if term else "scenec: interrupted")
    except Exception as e:  # noqa: BLE001
        if os.environ.get("SCENEC_DEBUG"):
            raise
        end(EXIT_BUILD_FAILED, f"scenec: internal error: {type(e).__name__}: {e} (set SCENEC_DEBUG=1 for a traceback)")
    if dry_run and not json_:
        would = [o for o in summary["outputs"] if o["status"] == "would-build"]
        for o in would:
            print(f"{o['state']:<9} {printable(o['image'])}  ({o['reason']}; {o['scene']})")
        if not would:  # (with invalid scenes: nothing more that can be built until they are fixed)
            bad = summary.get("invalid")
            print(f"nothing to build: {summary['cached']} up to date"
                  + (f", {bad} invalid scene{'s' if bad != 1 else ''} (above)" if bad else ""))
    if json_:
        print(summary_json(summary))
    if summary.get("invalid"):
        raise typer.Exit(EXIT_INVALID)
    if summary.get("failed"):
        raise typer.Exit(EXIT_BUILD_FAILED)


@app.command()
def status(files: Optional[List[str]] = typer.Argument(None, help="scene files, directories or globs; default: the "
                                                                  "project"),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory (overrides output.dir)"),
           model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                               help="model alias, id or local diffusers directory"),
           select: Optional[List[str]] = typer.Option(None, "--select", "-s", help="only these (docs/batch.md)"),
           exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="not these"),
           weights_hash: Optional[str] = typer.Option(None, "--weights-hash", help="stat | content (local model "
                                                      "dirs); default: scenec.toml's weights_hash, else stat"),
           lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
           seed: Optional[str] = SEED_OPTION, steps: Optional[str] = STEPS_OPTION,
           guidance: Optional[str] = GUIDANCE_OPTION, set_: Optional[List[str]] = SET_OPTION,
           verbose: bool = typer.Option(False, "-v", "--verbose", help="list up-to-date outputs too"),
           exit_code: bool = typer.Option(False, "--exit-code", help="exit 1 when an output is missing or stale"),
           json_: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Show missing and stale outputs against the scene files, like `git status` (no model, no torch)."""
    import json

    from scenec.build.options import BatchError, BuildOptions
    from scenec.build.reporting import format_status
    from scenec.build.reporting import status as run_status

    check_loras(lora)
    files = project_targets(files, "show the status of")
    weights = weights_hash_of(weights_hash)  # before the try: a bad scenec.toml value is exit 2, not internal
    try:
        rep = run_status(files, BuildOptions(out=out, model=model, select=select or (), exclude=exclude or (),
                                             weights_hash=weights, lora=lora or (), last_out=out is None,
                                             overrides=overrides(seed, steps, guidance, set_)))
    except BatchError as e:
        print(f"scenec: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    except Exception as e:  # noqa: BLE001
        internal(e)
    print_diags(rep["diagnostics"])
    for f, msg in rep["failed_compile"]:
        print(f"scenec: {f}: {msg}", file=sys.stderr)
    if json_:
        print(json.dumps({k: rep[k] for k in ("outputs", "orphaned", "counts", "stale", "invalid", "scenes",
                                              "followed")}))
    else:
        print(format_status(rep, verbose=verbose))
    if rep["invalid"]:
        raise typer.Exit(EXIT_INVALID)
    if exit_code and (rep["stale"] or rep["failed_compile"]):
        raise typer.Exit(EXIT_BUILD_FAILED)


# commands defined in other modules, in the order `scenec --help` and docs/cli.md list them
app.command("eval")(eval_)
app.command()(tune)
app.command()(split)
app.command()(show)
app.command()(watch)
app.command("train-adapter")(train_adapter)


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

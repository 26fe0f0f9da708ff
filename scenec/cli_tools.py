"""`scenec eval`, `tune` and `split`, registered on the app by scenec/cli.py (their logic: scenec/eval.py,
metrics.py, clip.py, tune.py, isotonic.py, split.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from scenec.cli_options import LORA_HELP, check_loras, local_model
from scenec.exits import EXIT_BUILD_FAILED, EXIT_INVALID, fail_invalid, internal, path_error


def _fail_eval(e) -> None:
    print(f"scenec: {e}", file=sys.stderr)
    raise typer.Exit(getattr(e, "exit_code", EXIT_INVALID))


# the metric's options, shared by `eval` and `tune` (the objective tune maximises is eval's metric)
CLIP_OPTION = typer.Option("openai/clip-vit-large-patch14", "--clip",
                           help="CLIP model id or local directory; `tiny` (random), `none` to skip CLIPScore")
WEIGHTS_OPTION = typer.Option("1,1", "--weights", help="a,b of the combined metric a·BgSim + b·CLIPScore")
TEXT_OPTION = typer.Option("full", "--text", help="CLIPScore text: full (entity + background) | entity")
SEGMENTER_OPTION = typer.Option(None, "--segmenter", help="module:function masking prompt variants")


def eval_(directory: Path = typer.Argument(..., help="directory of built images and their sidecars"),
          scene: Optional[List[Path]] = typer.Option(None, "--scene", help="scene file the images were built from"),
          plan: Optional[List[Path]] = typer.Option(None, "--plan", help="compiled plan directory instead of --scene"),
          group: Optional[List[str]] = typer.Option(None, "--group", help="only these groups"),
          clip: str = CLIP_OPTION, weights: str = WEIGHTS_OPTION, text: str = TEXT_OPTION,
          segmenter: Optional[str] = SEGMENTER_OPTION,
          model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                              help="the --model the images were built with"),
          lora: Optional[List[str]] = typer.Option(None, "--lora", help="PATH[:SCALE]: the --lora the images were "
                                                   "built with (with --scene; a --plan has its LoRAs)"),
          json_: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Coupled-generation metrics per group: BgSim, CLIPScore and a·BgSim + b·CLIPScore."""
    import json

    from scenec.eval import evaluate_dir, load_segmenter, render_table
    from scenec.metrics import EvalError, parse_weights
    from scenec.spec.diagnostics import SceneError

    check_loras(lora)
    try:
        w = parse_weights(weights)
        seg = load_segmenter(segmenter)
        report = evaluate_dir(directory, scenes=scene or (), plan_dirs=plan or (), clip=clip, weights=w,
                              segmenter=seg, text=text, model=model, lora=lora or (),
                              groups=group or None)
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


def tune(file: Path = typer.Argument(..., help="scene file"),
         group: Optional[str] = typer.Option(None, "--group", help="the group to tune (default: the only one)"),
         budget: int = typer.Option(20, "--budget", help="number of θ candidates to evaluate (each builds the group)"),
         method: str = typer.Option("both", "--method", help="param | vector | both"),
         out: Optional[Path] = typer.Option(None, "-o", "--out",
                                            help="schedule file (default: schedules/SCENE-GROUP.json)"),
         clip: str = CLIP_OPTION, weights: str = WEIGHTS_OPTION, text: str = TEXT_OPTION,
         segmenter: Optional[str] = SEGMENTER_OPTION,
         model: Optional[str] = typer.Option(None, "--model", callback=local_model,
                                             help="model alias, id or local diffusers directory"),
         lora: Optional[List[str]] = typer.Option(None, "--lora", help=LORA_HELP),
         device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default: cuda if available)"),
         dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32"),
         seed: int = typer.Option(0, "--seed", help="seed of the vector search's random directions")):
    """Optimise a group's θ schedule (non-decreasing, in [0, 1]) for a·BgSim + b·CLIPScore; resumable."""
    from scenec.eval import load_segmenter
    from scenec.metrics import EvalError, parse_weights
    from scenec.spec.diagnostics import SceneError
    from scenec.tune import tune as run_tune

    from scenec.runtime.memory import device_problem

    if why := device_problem(device):
        print(f"scenec: {why}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    check_loras(lora)
    try:
        w = parse_weights(weights)
        if clip.lower() == "none":  # docs: `--clip none` is BgSim only (b = 0), not "the metric is undefined"
            w = (w[0], 0.0)
        if w == (0.0, 0.0):
            raise EvalError("--weights: both terms weigh 0 (or --clip none with a = 0): nothing to optimise")
        seg = load_segmenter(segmenter)
        res = run_tune(file, group=group, budget=budget, method=method, output=out, weights=w,
                       clip=None if clip.lower() == "none" or w[1] == 0 else clip, model=model, lora=lora or (),
                       device=device, dtype=dtype, segmenter=seg, text=text, seed=seed)
    except KeyboardInterrupt:
        print("scenec: interrupted (the evaluations so far are kept: run it again to resume)", file=sys.stderr)
        raise typer.Exit(130)
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
        from scenec.split import check_group_id

        width, height = parse_canvas(canvas, model)
        check_group_id(group)
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
        from scenec.split import write_schema_for

        out.parent.mkdir(parents=True, exist_ok=True)
        schema = write_schema_for(out)  # the modeline points at a file that exists: editors need no server
        from scenec.spec.fsio import atomic_write

        atomic_write(out, scene_text(res, model=model, width=width, height=height, group=group, source=file.name,
                                     schema=schema).encode("utf-8"))  # an interrupted split leaves no half scene
    except OSError as e:
        path_error(e)
    print(f"wrote {out}: background {res.background!r}, {len(res.entities)} variants; next: scenec validate {out}",
          file=sys.stderr)


def show(image: Path = typer.Argument(..., help="a PNG built by scenec"),
         json_: bool = typer.Option(False, "--json", help="print the metadata as JSON")):
    """Print what made a built image: the resolved scene, sampler settings, model, LoRAs, files and versions
    (its PNG text chunks; `scenec build --from IMAGE.png` rebuilds it)."""
    import json

    from scenec.rebuild import RebuildError, as_record, describe, read_metadata

    try:
        meta = read_metadata(image)
    except RebuildError as e:
        print(f"scenec: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    print(json.dumps(as_record(meta), indent=1) if json_ else describe(image, meta))


def build_from(image: Path, out, project, device, dtype, quiet: bool, json_: bool) -> None:
    """`scenec build --from IMAGE.png -o DIR`: rebuild one image from its embedded scene (scenec/rebuild.py)."""
    import json

    from scenec.rebuild import RebuildError, rebuild
    from scenec.spec.diagnostics import SceneError

    from scenec.runtime.memory import device_problem

    if out is None:
        print("scenec: --from needs -o DIR (where to write the rebuilt image)", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    if why := device_problem(device):
        print(f"scenec: {why}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    say = None if quiet or json_ else (lambda msg: print(f"scenec: {msg}", file=sys.stderr))
    try:
        r = rebuild(image, out, root=project, device=device, dtype=dtype, say=say)
    except RebuildError as e:
        print(f"scenec: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    except SceneError as e:
        print(f"scenec: {image}: its embedded scene does not compile here:", file=sys.stderr)
        fail_invalid(e)
    except OSError as e:
        path_error(e)
    except Exception as e:  # noqa: BLE001
        internal(e)
    if json_:
        print(json.dumps(r))
    if r.get("status") != "built":
        print(f"scenec: rebuilding {image} failed: {r.get('error')}", file=sys.stderr)
        raise typer.Exit(EXIT_BUILD_FAILED)
    if not quiet and not json_:
        same = ("byte-identical to the original" if r["identical"] else
                "differs from the original (another device, dtype, model weights or library versions?)")
        print(f"rebuilt {r['image']}: {same}", file=sys.stderr)

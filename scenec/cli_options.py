"""Options several commands share: the scene overrides (``--seed``, ``--steps``, ``--guidance``, ``--set``;
scenec/spec/overrides.py) and how their parsing fails (one line naming the flag, exit 2)."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from scenec.exits import EXIT_INVALID

SEED_OPTION = typer.Option(None, "--seed", help="override sampler.seed: N, A..B (inclusive) or A,B,C")
STEPS_OPTION = typer.Option(None, "--steps", help="override sampler.steps")
GUIDANCE_OPTION = typer.Option(None, "--guidance", help="override sampler.guidance")
LORA_HELP = "PATH[:SCALE]: a LoRA .safetensors on the whole image (repeatable; after the scene's own)"
SET_OPTION = typer.Option(None, "--set", help="override any scene value: KEY.PATH=VALUE (repeatable; list "
                                              "items by index or id: entities.fox.prompt=...)")


def overrides(seed: Optional[str], steps: Optional[str], guidance: Optional[str], sets: Optional[List[str]],
              on_error=None) -> tuple:
    """The overrides the flags ask for; a flag that cannot be read prints one line and exits 2 (through
    ``on_error(message)`` when given: a build still ends with its summary line)."""
    from scenec.spec.overrides import OverrideError, from_flags

    try:
        return from_flags(seed, steps, guidance, sets or ())
    except OverrideError as e:
        if on_error is not None:
            on_error(f"scenec: {e}")
        print(f"scenec: {e}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID) from None


def local_model(value: Optional[str]) -> Optional[str]:
    """``--model`` as a shell means it: a local directory or checkpoint file from the current directory (as
    ``--lora``'s paths), made absolute; an alias or hub id as given. A scene's own ``model`` is relative to the
    scene, scenec.toml's to the project root."""
    from pathlib import Path

    from scenec.compiler.caps import ALIASES

    if value and value not in ALIASES and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def check_loras(lora: Optional[List[str]], on_error=None) -> None:
    """The ``--lora`` arguments checked once, before any scene: each problem one line, exit 2 (through
    ``on_error(message)`` when given)."""
    from scenec.compiler.lora import cli_lora_problems

    problems = cli_lora_problems(lora)
    if not problems:
        return
    message = "\n".join(f"scenec: {p}" for p in problems)
    if on_error is not None:
        on_error(message)
    print(message, file=sys.stderr)
    raise typer.Exit(EXIT_INVALID)


def project_targets(files: Optional[List[str]], verb: str) -> List[str]:
    """``files``, or with none the project, as dbt runs its own: the directory of the nearest scenec.toml from
    here up (its scenes found recursively). Outside a project, one line and exit 2."""
    from pathlib import Path

    from scenec.spec.paths import PROJECT_FILE

    if files:
        return files
    here = Path.cwd()
    for d in (here, *here.parents):
        if (d / PROJECT_FILE).is_file():
            return [str(d)]
    print(f"scenec: give scene files to {verb}: no {PROJECT_FILE} here or above (not in a project; `scenec init` "
          "makes one)", file=sys.stderr)
    raise typer.Exit(EXIT_INVALID)


def weights_hash_of(flag: Optional[str]) -> str:
    """How local model directories are identified: ``--weights-hash``, else ``weights_hash`` in the `[project]` table
    of the working directory's project (CI on fresh checkouts sets `content`: new files' times would read as new
    weights under `stat`), else `stat`. A value that is neither is one line at its line of scenec.toml, exit 2."""
    from pathlib import Path

    from scenec.spec.paths import PROJECT_FILE, ProjectFileError, project_config, project_key_line

    if flag is not None:
        return flag
    here = Path.cwd()
    root = next((d for d in (here, *here.parents) if (d / PROJECT_FILE).is_file()), None)
    if root is None:
        return "stat"
    try:
        value = project_config(root).get("weights_hash", "stat")
    except ProjectFileError:
        return "stat"  # the scenes' checks report the file at its line
    if value not in ("stat", "content"):
        print(f"{root / PROJECT_FILE}:{project_key_line(root, 'weights_hash')}:1: error: `weights_hash` must be "
              f"\"stat\" or \"content\", not {value!r}", file=sys.stderr)
        raise typer.Exit(EXIT_INVALID)
    return value


"""docs/cli.md, generated from the commands themselves so the reference cannot drift.

Regenerate with ``python -m scenec.docgen > docs/cli.md`` (a test fails when it is stale);
``python -m scenec.docgen language`` regenerates docs/language.md's key tables (scenec/docgen_language.py).
"""

from __future__ import annotations

import inspect

HEADER = """\
# Command-line reference

Generated from the commands (`python -m scenec.docgen > docs/cli.md`). Exit status for every
command: 0 success, 1 a build failed, 2 invalid input. Problems in scene files print as
`FILE:LINE:COL: error: MESSAGE` (warnings: `warning:`), all of them, never a traceback
(`SCENEC_DEBUG=1` shows one for an internal error). `validate`, `compile`, `explain`, `preview`,
`schema`, `init`, `status` and `split` never import torch.
"""


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def cli_markdown() -> str:
    import typer.main

    from scenec.cli import app

    group = typer.main.get_command(app)
    out = [HEADER]
    for name, cmd in group.commands.items():
        doc = inspect.cleandoc(cmd.help or "")
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        usage = " ".join([f"scenec {name}", "[OPTIONS]"] + [
            (a.name.upper() + ("..." if a.nargs == -1 else "")) if a.required else f"[{a.name.upper()}]" for a in args])
        out.append(f"## `scenec {name}`\n\n{doc}\n\n```\n{usage}\n```\n")
        rows = []
        for p in cmd.params:
            if p.name == "help":
                continue
            if p.param_type_name == "argument":
                names = p.name.upper()
            else:
                names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            default = "" if p.default in (None, False, (), []) or callable(p.default) else f"`{p.default}`"
            rows.append(f"| {names} | {_cell(getattr(p, 'help', '') or '')} | {default} |")
        if rows:
            out.append("| argument / option | meaning | default |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["language"]:  # docs/language.md's key tables (scenec/docgen_language.py)
        from scenec.docgen_language import main

        sys.exit(main(sys.argv[2:]))
    sys.stdout.write(cli_markdown())

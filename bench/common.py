"""What the benchmark scripts share: importing scenec from this checkout, and loading an anchor script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def use_checkout() -> None:
    """Import scenec from this checkout: installed (``pip install -e .``), or a bare checkout (a device
    machine) whose folders are mapped onto the package as pyproject.toml maps them."""
    sys.path.insert(0, str(ROOT))
    import scenec

    try:
        import scenec.runtime  # noqa: F401
    except ImportError:
        scenec.__path__.append(str(ROOT))  # scenec.spec → spec/, scenec.runtime → runtime/, …


def load_anchor(path: str | None, name: str):
    """The anchor benchmark ``name`` as a module: from ``--anchor PATH``, else a copy kept in
    ``bench/anchor/NAME.py`` of this checkout, else None."""
    p = Path(path) if path else ROOT / "bench" / "anchor" / f"{name}.py"
    if p.is_file():
        spec = importlib.util.spec_from_file_location(name, p)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # torch.compile resolves the processors' module by name
        spec.loader.exec_module(mod)
        return mod
    if path:
        raise SystemExit(f"--anchor {path}: no such file")
    return None

"""Scene language v1: YAML loading with source positions, pydantic models, diagnostics."""

from .diagnostics import Diagnostic, Diagnostics, Pos, SceneError
from .load import LoadedScene, load_scene
from .models import Scene

__all__ = ["Diagnostic", "Diagnostics", "Pos", "SceneError", "LoadedScene", "load_scene", "Scene"]

"""A visual prompt and SOW's attention modulation in one Flux image (tiny model): the scene validates, a visual
prompt of scale 0 leaves the SOW-modulated image byte for byte, and at scale 1 it changes it. The kernel's
equation (one softmax over the modulated scores and the extra logits) is tests/test_attention_extra.py's."""

import numpy as np
import torch
from PIL import Image

from scenec.compiler import compile_scene
from scenec.runtime import attention
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import tiny_backend

SCENE = """scenec: 1
model: tiny
canvas: {{width: 128, height: 128}}
sampler: {{steps: 4, seed: 5}}
background: {{prompt: "a meadow"}}
entities:
  - id: fox
    prompt: "a red fox"
    shape: {{box: [0.0, 0.5, 0.5, 1.0]}}
    reference: {{image: fox.png, cycles: 2, window: [0.9, 0.3], related: {{box: [0.4, 0.4, 1.0, 1.0]}},
                modulation: {modulation}}}
  - id: cat
    prompt: "a cat"
    shape: {{box: [0.5, 0.0, 1.0, 0.5]}}
{cat}"""


def latents(tmp_path, name, cat="", modulation="{suppress: 1.0, enhance: 1.0}"):
    d = tmp_path / name
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / "fox.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "cat.png")
    (d / "s.yaml").write_text(SCENE.format(cat=cat, modulation=modulation), encoding="utf-8")
    plan = compile_scene(d / "s.yaml")
    return run_job(tiny_backend(), plan, plan.jobs[0], decode=False).latents


def test_visual_prompt_beside_sow_modulation_on_flux(tmp_path, monkeypatch):
    plain = latents(tmp_path, "plain")
    assert float((plain - latents(tmp_path, "unmodulated", modulation="false")).abs().max()) > 1e-4  # SOW acts
    zero = latents(tmp_path, "zero", cat="    visual: {image: cat.png, scale: 0}\n")
    assert torch.equal(zero, plain)  # the merged softmax adds exactly nothing at scale 0
    merged = []
    orig = attention._modulate

    def spy(*a, lse=False, **kw):
        out = orig(*a, lse=lse, **kw)
        merged.append(lse and out is not None)
        return out

    monkeypatch.setattr(attention, "_modulate", spy)
    on = latents(tmp_path, "on", cat="    visual: {image: cat.png, scale: 1.0}\n")
    assert any(merged)  # modulated calls that also held the visual tokens
    assert torch.isfinite(on).all()
    assert float((on - plain).abs().max()) > 1e-3

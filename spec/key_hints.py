"""Hints for an unknown key that is another tool's name for a setting, or scenec's own key in the wrong mapping.

A1111 (its UI and API: ``cfg_scale``, ``denoising_strength``, ``sampler_name``), ComfyUI (KSampler's ``cfg``,
``denoise``, ``scheduler``; LoraLoader's ``strength_model``) and diffusers' pipeline arguments
(``guidance_scale``, ``num_inference_steps``, ``negative_prompt``) name the settings a scene holds
(docs/from-a1111-comfyui.md). difflib alone hinted wrongly for some: ``cfg_scale`` → ``cfg_rescale`` (a 0–1
share, not the CFG scale), a top-level ``prompt`` → ``prompt_syntax``.
"""

from __future__ import annotations

from typing import Iterable

from .diagnostics import did_you_mean

# another tool's key → scenec's key path (from the top of a scene)
OTHER_NAMES = {
    "cfg": "sampler.guidance", "cfg_scale": "sampler.guidance", "guidance_scale": "sampler.guidance",
    "num_inference_steps": "sampler.steps", "sampling_steps": "sampler.steps",
    "sampler": "sampler.solver", "sampler_name": "sampler.solver", "sampler_index": "sampler.solver",
    "noise_seed": "sampler.seed", "guidance_rescale": "sampler.cfg_rescale",
    "denoise": "background.strength", "denoising_strength": "background.strength",
    "init_image": "background.image", "init_images": "background.image",
    "negative_prompt": "background.negative",
    "loras": "model.lora", "ckpt_name": "model", "checkpoint": "model", "controlnet": "control",
    # A1111's hires fix (its API's enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps; its UI's "Upscale by")
    "enable_hr": "hires", "hr_scale": "hires.scale", "upscale_by": "hires.scale", "hr_upscaler": "hires.upscaler",
    "hr_second_pass_steps": "hires.steps", "hires_steps": "hires.steps",
}
# scenec's own keys, written in a mapping that does not hold them → where they are
ELSEWHERE = {
    "steps": "sampler.steps", "seed": "sampler.seed", "guidance": "sampler.guidance", "solver": "sampler.solver",
    "true_cfg": "sampler.true_cfg", "cfg_rescale": "sampler.cfg_rescale", "freeu": "sampler.freeu",
    "width": "canvas.width", "height": "canvas.height", "tiling": "canvas.tiling",
    "prompt": "background.prompt", "negative": "background.negative", "strength": "background.strength",
    "clip_skip": "model.clip_skip", "vae": "model.vae", "lora": "model.lora", "embeddings": "model.embeddings",
}
# the mappings those hints are for: a scene's top level and its global sections (an entity's or a variant's
# `prompt` is its own, not the background's)
GLOBAL_SECTIONS = ("Scene", "Sampler", "Canvas", "Background", "ModelSpec")
SHAPE_KINDS = {"box": "[x0, y0, x1, y1]", "polygon": "[[x, y], ...]", "ellipse": "{center: [x, y], radii: [rx, ry]}",
               "mask": "refs/mask.png"}
LORA_SCALE = ("weight", "strength", "strength_model", "multiplier", "alpha")
# ControlNet's (A1111's weight, ComfyUI's strength, diffusers' controlnet_conditioning_scale) and IP-Adapter's weight
SCALE = {"Control": ("weight", "strength", "conditioning_scale", "controlnet_conditioning_scale"),
         "Visual": ("weight", "strength", "ip_adapter_scale")}
WINDOW = ("start_percent", "end_percent", "guidance_start", "guidance_end", "control_guidance_start",
          "control_guidance_end", "starting_control_step", "ending_control_step")


def unknown_key_hint(key: str, allowed: Iterable[str], section: str | None) -> str | None:
    """The hint for an unknown ``key`` in a mapping that allows ``allowed`` (``section``: its model's class name)."""
    allowed = list(allowed)
    close = did_you_mean(key, allowed) if allowed else None
    k = str(key).lower()
    target = OTHER_NAMES.get(k) or ELSEWHERE.get(k)
    if target and target.rsplit(".", 1)[-1] in allowed:  # this mapping's own name for it (`negative_prompt`)
        return f"did you mean `{target.rsplit('.', 1)[-1]}`?"
    if section == "Lora" and k in LORA_SCALE or k in SCALE.get(section or "", ()):
        return "did you mean `scale`?"
    if section in ("Control", "Visual") and k in WINDOW:
        return ("the steps it acts in are `window: [FROM, TO]`, noise levels from 1 (the first step) to 0 (the "
                "end): ComfyUI's start/end percent p is about level 1 − p")
    if section in ("Entity", "EntityDef") and k in SHAPE_KINDS:
        return f"`{k}` is `shape.{k}` in an entity: `shape: {{{k}: {SHAPE_KINDS[k]}}}`"
    if section in GLOBAL_SECTIONS:
        if k == "scheduler":
            return ("the schedule is part of `sampler.solver`'s name: `dpm++2m-karras`, `euler-karras`, "
                    "`unipc-karras` (Karras), `dpm++2m` (normal)")
        if k in ("batch_size", "batch_count", "n_iter"):
            return "one image per seed: `sampler: {seed: [1, 2, 3]}`"
        if k in OTHER_NAMES:
            return f"A1111's, ComfyUI's or diffusers' `{key}` is `{target}` in a scene"
        if k in ELSEWHERE:
            return f"`{key}` is `{target}` in a scene"
    return close


__all__ = ["unknown_key_hint"]

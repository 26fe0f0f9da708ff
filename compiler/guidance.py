"""The sampler's checks (the ``check`` pass): ``sampler.solver`` (compiler/solvers.py), and the SD family's
guidance knobs, ``sampler.cfg_rescale`` and ``sampler.freeu``, at the key that has the problem.

- ``cfg_rescale`` is diffusers' ``guidance_rescale`` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
  Steps are Flawed", arXiv 2305.08891, §3.4, Eq. 15-16; ``rescale_noise_cfg``): the CFG output rescaled to the
  positive prediction's standard deviation, mixed by this share. It acts on CFG's output, so it does nothing while
  CFG is off (``guidance ≤ 1``: a warning). Flux has no CFG of its own (its guidance is an embedding), and its
  true CFG is not what the paper rescales nor anything diffusers' FluxPipeline rescales: an error there.
- ``freeu`` is diffusers' ``unet.enable_freeu(s1, s2, b1, b2)`` (Si et al. 2023, FreeU, arXiv 2309.11497): it
  rescales a UNet decoder's features; Flux has no UNet: an error there.
"""

from __future__ import annotations

from .solvers import check_solver


def check_sampler(ls, info, diags, model_override: str | None = None) -> None:
    """``sampler.solver``, ``sampler.cfg_rescale`` and ``sampler.freeu`` against the model's family, and the model's
    own schedule (compiler/levels.py ``check_zero_snr``)."""
    from .levels import check_zero_snr
    from .resolve import model_pos

    check_solver(ls, info, diags)
    check_zero_snr(ls, info, diags, model_pos(ls, model_override, info.spec))
    sc = ls.scene
    fam = info.family
    rescale, freeu = sc.sampler.cfg_rescale, sc.sampler.freeu
    if fam.name == "flux":
        if rescale > 0:
            diags.error(ls.pos(("sampler", "cfg_rescale")), f"`cfg_rescale` rescales classifier-free guidance's "
                        f"output on SD and SDXL models; Flux models such as `{info.spec}` have none (their "
                        "guidance is an embedding, and `true_cfg` is not what diffusers rescales)",
                        hint="remove `sampler.cfg_rescale`")
        if freeu is not None:
            diags.error(ls.key_pos(("sampler", "freeu")), f"`freeu` rescales a UNet's decoder features (SD, SDXL); "
                        f"Flux models such as `{info.spec}` have no UNet", hint="remove `sampler.freeu`")
        return
    g = sc.sampler.guidance if sc.sampler.guidance is not None else info.guidance
    if rescale > 0 and g <= 1:
        diags.warning(ls.pos(("sampler", "cfg_rescale")), f"`cfg_rescale` has no effect: classifier-free guidance "
                      f"is off at `sampler.guidance: {g:g}` (nothing to rescale)",
                      hint="set `sampler.guidance` above 1, or remove `sampler.cfg_rescale`")

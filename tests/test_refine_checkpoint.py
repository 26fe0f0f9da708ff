"""`visual.refine` under gradient checkpointing (Chen et al. 2016): the denoiser's blocks and the VAE are
checkpointed during the refinement only, through scenec's own attention processors, and the gradient of the
refinement's loss is the one without checkpointing — also with Flux's true CFG, whose two model calls set
different attention state (each block is recomputed under the state of the call that ran it)."""

import pytest
import torch
import torch.utils.checkpoint
from test_visual_runtime import BACKENDS, compile_

from scenec.compiler import compile_scene
from scenec.runtime import sampler
from scenec.runtime.methods import visual_refine

FOX = "    visual: {image: fox.png, scale: 1.5, refine: {steps: 1, lr: 0.1, at: [1.0]}}\n"


def first_gradient(tmp_path, model, name, monkeypatch, true_cfg=None):
    """The gradient of the first refinement step's loss w.r.t. the value tokens, and the blocks checkpointed."""
    plan = compile_(tmp_path, name, model, fox=FOX)
    if true_cfg:  # the same scene with true CFG (two model calls per prediction)
        yaml = tmp_path / name / "s.yaml"
        yaml.write_text(yaml.read_text().replace("seed: 5}", f"seed: 5, true_cfg: {true_cfg}}}"))
        plan = compile_scene(yaml)
        assert plan.sampler.true_cfg == true_cfg
    grads, blocks = [], []

    class Adam(torch.optim.Adam):
        def step(self, closure=None):
            grads.append(self.param_groups[0]["params"][0].grad.clone())
            return super().step(closure)

    real = torch.utils.checkpoint.checkpoint

    def spy(fn, *a, **kw):
        blocks.append(fn)
        return real(fn, *a, **kw)

    monkeypatch.setattr(visual_refine.torch.optim, "Adam", Adam)
    monkeypatch.setattr(visual_refine.torch.utils.checkpoint, "checkpoint", spy)
    sampler.run_job(BACKENDS[model](), plan, plan.jobs[0], decode=False)
    monkeypatch.undo()
    return grads[0], len(blocks)


def plain(*modules):
    """A stand-in for `checkpointed` that checkpoints nothing."""
    from contextlib import nullcontext

    return nullcontext()


@pytest.mark.parametrize("model,true_cfg", [("tiny", None), ("tiny", 2.0), ("tiny-sd", None)])
def test_checkpointed_refinement_has_the_plain_gradient(tmp_path, model, true_cfg, monkeypatch):
    be = BACKENDS[model]()
    den = be.transformer if getattr(be, "transformer", None) is not None else be.unet
    g_ckpt, n = first_gradient(tmp_path, model, "a", monkeypatch, true_cfg)
    assert n > 0 and not den.is_gradient_checkpointing and not be.pipe.vae.is_gradient_checkpointing  # restored
    monkeypatch.setattr(visual_refine, "checkpointed", plain)
    g_plain, n_plain = first_gradient(tmp_path, model, "b", monkeypatch, true_cfg)
    assert n_plain == 0 and float(g_plain.abs().max()) > 0
    torch.testing.assert_close(g_ckpt, g_plain, atol=1e-6, rtol=1e-4)


def test_without_the_call_state_the_true_cfg_recomputation_fails(tmp_path, monkeypatch):
    """The restore matters: recomputed under the last call's state (the negative pass, whose visual tokens
    need no gradient), the blocks record other tensors than they did, and torch refuses."""
    monkeypatch.setattr(visual_refine, "CALL_STATE", ())
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        first_gradient(tmp_path, "tiny", "b", monkeypatch, 2.0)

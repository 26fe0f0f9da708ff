"""A1111's prompt editing and alternation (``prompt_syntax: a1111``): ``[from:to:when]``, ``[to:when]``,
``[from::when]``, ``[a|b]``.

The schedule matches A1111's documented examples (``get_learned_conditioning_prompt_schedules``); the step each
text is read at follows A1111's counting (from 0 at the first step run, the first entry ending at or after it), for
a fraction and a step number, img2img included; an SD and an SDXL job equal diffusers' own pipeline fed the
A1111-weighted embeddings of each variant and switched at that step by ``callback_on_step_end``; each variant is
encoded once per run; a prompt without editing is handed to the family as it was; the compiler warns at the
``when`` and no longer calls the supported forms text."""

import pytest
import torch
from test_prompt_weights import messages, reference_pipe, scene, sd_embeds, with_final_bias

from scenec.runtime import sampler as sampler_mod
from scenec.runtime.families import load_backend
from scenec.runtime.prompt_editing import at_level
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import make_plan, sd_plan, tiny_backend
from scenec.spec.prompt_editing import schedule, text_at, variants

# --- the schedule -------------------------------------------------------------------------------------------------


def test_the_schedule_matches_a1111s_documented_examples():
    """modules/prompt_parser.py's doctest of get_learned_conditioning_prompt_schedules (10 steps)."""
    def g(p):
        return [list(e) for e in schedule(p, 10)]

    assert g("test") == [[10, "test"]]
    assert g("a [b:3]") == [[3, "a "], [10, "a b"]]
    assert g("a [b: 3]") == [[3, "a "], [10, "a b"]]
    assert g("a [[[b]]:2]") == [[2, "a "], [10, "a [[b]]"]]
    assert g("[(a:2):3]") == [[3, ""], [10, "(a:2)"]]
    assert g("a [b : c : 1] d") == [[1, "a b  d"], [10, "a  c  d"]]
    assert g("a[b:[c:d:2]:1]e") == [[1, "abe"], [2, "ace"], [10, "ade"]]
    assert g("a [unbalanced") == [[10, "a [unbalanced"]]
    assert g("a [b:.5] c") == [[5, "a  c"], [10, "a b c"]]
    assert g("((a][:b:c [d:3]") == [[3, "((a][:b:c "], [10, "((a][:b:c d"]]
    assert g("[a|(b:1.1)]") == [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]
    assert g("[fe|]male") == [[i, "female" if i % 2 else "male"] for i in range(1, 11)]
    assert g("[fe|||]male") == [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]
    # a `|` outside `[…]` puts the prompt outside A1111's grammar: read whole, no editing
    assert g("a | b [c:d:3]") == [[10, "a | b [c:d:3]"]]
    assert g("[a:" * 600) == [[10, "[a:" * 600]]  # nested past the recursion limit: whole, no traceback
    assert variants("[a::2] BREAK [(b:1.2)|c]", 4) == ["a BREAK (b:1.2)", "a BREAK c", " BREAK (b:1.2)", " BREAK c"]


def test_a_fraction_is_of_the_steps_and_a_number_without_a_dot_is_a_step():
    """A1111's timeline (since 1.6): `0.5` and `1.0` are fractions, `3` a step; step k (from 0) reads the first
    entry ending at or after it, so `[a:b:3]` reads `a` at the steps 0…3."""
    def reads(p, steps=10):
        return [text_at(p, steps, k) for k in range(steps)]

    assert reads("[a:b:3]") == ["a"] * 4 + ["b"] * 6
    assert reads("[a:b:0.5]") == ["a"] * 6 + ["b"] * 4
    assert reads("[a:b:0.25]", 8) == ["a"] * 3 + ["b"] * 5
    assert reads("[a:b:1.0]") == ["a"] * 10 and reads("[a:b:1]") == ["a"] * 2 + ["b"] * 8
    assert reads("[a:b:0]") == ["b"] * 10 and reads("[a:b:9]") == ["a"] * 10  # 9 is the last step: never
    assert reads("[a|b|c]", 6) == ["a", "a", "b", "c", "a", "b"]


# --- the runtime --------------------------------------------------------------------------------------------------

STEPS = 4
# the positive switches after step 2 (its 4th step reads `a blue fox`), the negative after step 1; weights on both
PROMPT, NEGATIVE = "a [(red:1.5):blue:2] fox", "[blurry:(dark:0.7):1] photo"


@pytest.fixture(scope="module")
def sd():
    """A tiny-sd backend of this module's own (its text encoder's final layer norm gets a bias)."""
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    with_final_bias(be.pipe)
    return be


def plan(family, prompt=PROMPT, negative=NEGATIVE, syntax="a1111", steps=STEPS, size=64, **kw):
    def edit(d, t):
        if family == "sdxl":
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
        d["model"]["prompt_syntax"] = syntax
    return sd_plan(steps=steps, edit=edit, seed=5, width=size, height=size, prompt=prompt, negative=negative, **kw)


def latents(be, p):
    return run_job(be, p, p.jobs[0], decode=False).latents


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_an_edited_job_equals_diffusers_switching_the_embeddings_at_a1111s_step(family, sd):
    be = sd if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    ref = reference_pipe(family)
    if family == "sd":
        with_final_bias(ref)
    be.clear_cache()
    ours = latents(be, plan(family))
    sdxl = family == "sdxl"
    with torch.no_grad():
        pos = [sd_embeds(ref, text_at(PROMPT, STEPS, k), "a1111", sdxl) for k in range(STEPS)]
        neg = [sd_embeds(ref, text_at(NEGATIVE, STEPS, k), "a1111", sdxl) for k in range(STEPS)]
    switched = []

    def on_step_end(pipe, i, t, kw):  # diffusers lets a callback replace the embeddings of the steps after i
        k = min(i + 1, STEPS - 1)
        switched.append(k)
        out = {"prompt_embeds": torch.cat([neg[k][0], pos[k][0]])}
        if sdxl:
            out["add_text_embeds"] = torch.cat([neg[k][1], pos[k][1]])
        return out

    kw = {"pooled_prompt_embeds": pos[0][1], "negative_pooled_prompt_embeds": neg[0][1]} if sdxl else {}
    theirs = ref(prompt_embeds=pos[0][0], negative_prompt_embeds=neg[0][0], height=64, width=64,
                 num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                 output_type="latent", callback_on_step_end=on_step_end,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"] + (["add_text_embeds"] if sdxl else []),
                 **kw).images
    assert switched == [1, 2, 3, 3]
    diff = float((ours - theirs).abs().max())
    first = latents(be, plan(family, prompt=text_at(PROMPT, STEPS, 0), negative=text_at(NEGATIVE, STEPS, 0)))
    effect = float((ours - first).abs().max())
    print(f"{family}: max |Δ| vs diffusers switching at A1111's steps = {diff:.3g}; vs no switch {effect:.3g}")
    assert diff == 0.0
    assert effect > 1e-4  # the switches act


@pytest.fixture
def reads(monkeypatch):
    """What each model call reads: (step, the texts of its streams) as the sampler keys its conditioning."""
    seen = []
    original = sampler_mod.texts

    def spy(p, spec, negative):
        out = original(p, spec, negative)
        if not negative:
            seen.append((getattr(p, "step", None), out))
        return out

    monkeypatch.setattr(sampler_mod, "texts", spy)
    return seen


def test_the_switch_step_follows_a1111s_rule_for_a_fraction_and_a_step(sd, reads):
    for prompt, want in (("a [cat:dog:0.5] x", ["cat"] * 4 + ["dog"] * 2),  # int(0.5 · 6) = 3: steps 0…3
                         ("a [cat:dog:1] x", ["cat"] * 2 + ["dog"] * 4)):
        reads.clear()
        latents(sd, plan("sd", prompt=prompt, negative="", steps=6))
        assert [r[0] for r in reads] == list(range(6))
        assert [r[1][0].split()[1] for r in reads] == want


def test_img2img_counts_the_steps_it_runs_from_0_against_all_the_steps(sd, reads):
    """A job whose program starts at level 3 of 6 (img2img at strength 0.5): its first step is step 0, and
    `[cat:dog:1]` switches after its second step (A1111's CFGDenoiser.step starts at 0 in sample_img2img)."""
    program = [{"op": "denoise", "from": i, "to": i + 1, "regional": True, "theta": None, "eta": 0.0}
               for i in range(3, 6)]
    latents(sd, plan("sd", prompt="a [cat:dog:1] x", negative="", steps=6, program=program))
    assert [(r[0], r[1][0]) for r in reads] == [(0, "a cat x"), (1, "a cat x"), (2, "a dog x")]


def test_each_variant_is_encoded_once_per_run(sd):
    calls = []
    hook = sd.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        sd.clear_cache()
        latents(sd, plan("sd", prompt="a [cat|dog] x", negative="blurry", steps=5))
    finally:
        hook.remove()
    assert len(calls) == 3  # `a cat x`, `a dog x`, the negative


def test_a_prompt_without_editing_is_handed_over_as_it_was(sd):
    p = plan("sd", prompt="a (red:1.2) fox, [dark]", negative="blurry")
    assert at_level(p, p.jobs[0], 2) is p
    # editing whose texts are all one: the same image as that text, bit for bit
    same = latents(sd, plan("sd", prompt="a [(red:1.2):(red:1.2):2] fox", negative="[blurry|blurry]"))
    assert torch.equal(same, latents(sd, plan("sd", prompt="a (red:1.2) fox", negative="blurry")))


def test_an_entity_prompt_switches_too(sd, reads):
    ent = [{"id": "pet", "prompt": "a [cat:dog:1]", "token": None}]
    latents(sd, plan("sd", prompt="a meadow", negative="", steps=3, entities=ent))
    assert [r[1][1] for r in reads] == ["a cat", "a cat", "a dog"]


def test_flux_equals_diffusers_switching_the_t5_embeddings_at_a1111s_step():
    """Variants that differ in their weights only (one pooled text): FluxPipeline fed each variant's weighted T5
    sequence, switched by callback_on_step_end (its callback may replace ``prompt_embeds``)."""
    from diffusers import FluxPipeline

    from scenec.runtime.prompt_weights import encode_t5
    from scenec.runtime.tiny import build_tiny_flux

    be, steps, prompt = tiny_backend(), 3, "a [(red:1.3):(red:0.6):1] fox"

    def edit(d, t):
        d["model"]["prompt_syntax"] = "a1111"
    p = make_plan(prompt=prompt, steps=steps, width=64, height=64, seed=4, edit=edit)
    ours = latents(be, p)
    pipe = FluxPipeline(**build_tiny_flux().components())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        seqs = [encode_t5(pipe, text_at(prompt, steps, k), "a1111", 32, 32, dtype=torch.float32, device="cpu")
                for k in range(steps)]
        pooled = pipe._get_clip_prompt_embeds(prompt="a red fox", device="cpu")
    theirs = pipe(prompt_embeds=seqs[0], pooled_prompt_embeds=pooled, height=64, width=64,
                  num_inference_steps=steps, guidance_scale=3.5, generator=torch.Generator().manual_seed(4),
                  output_type="latent", max_sequence_length=32, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                  callback_on_step_end=lambda _p, i, t, kw: {"prompt_embeds": seqs[min(i + 1, steps - 1)]}).images
    assert not torch.equal(seqs[0], seqs[2])
    assert torch.equal(ours, theirs)  # bit for bit


def test_flux_switches_t5_and_the_pooled_text():
    be = tiny_backend()

    def p(prompt):
        def edit(d, t):
            d["model"]["prompt_syntax"] = "a1111"
        return make_plan(prompt=prompt, steps=3, width=64, height=64, edit=edit)

    red, blue = latents(be, p("a (red:1.3) fox")), latents(be, p("a blue fox"))
    edited = latents(be, p("a [(red:1.3):blue:1] fox"))
    assert float((edited - red).abs().max()) > 1e-4 and float((edited - blue).abs().max()) > 1e-4
    assert torch.equal(latents(be, p("a [(red:1.3)|(red:1.3)] fox")), red)


# --- the compiler -------------------------------------------------------------------------------------------------

EDIT = "prompt_syntax: a1111\nsampler: {steps: 20}\n"


def test_supported_editing_is_not_called_text_and_bad_steps_warn_at_the_when(tmp_path):
    assert not messages(scene(tmp_path, "a [cat:dog:0.5] and [fe|]male [x::5] [(red:1.2):4]", EDIT))
    prompt = "a [cat:dog:half] [x:y:19] [a:b] [c:d:0]"
    out = messages(scene(tmp_path, prompt, EDIT))
    assert all(m[0] == "warning" for m in out)
    text = " ".join(m[2] for m in out)
    assert "`half` is not a number" in text and "`[a:b]` is not prompt editing: it has no step" in text
    assert "`[x:y:19]` never switches: the sampler runs 20 steps" in text
    assert "`[c:d:0]` switches before the first step" in text
    col = 12  # `  prompt: "`: the first character's column
    want = [col + prompt.index(s) for s in ("half", "19]", "[a:b]", "0]")]  # at the `when`, or the `[` without one
    assert sorted(m[1] for m in out) == [f"5:{c}" for c in sorted(want)]
    # a bracket pairing with nothing beside an edit: A1111's (ambiguous) parser may read the edit as text
    assert [m for m in messages(scene(tmp_path, "a [cat:dog:5]))", EDIT)) if "pairs with nothing" in m[2]]


def test_img2img_and_the_weights_of_each_variant_are_checked(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    img2img = "  image: init.png\n  strength: 0.5\n" + EDIT  # 10 of the 20 steps run
    assert not messages(scene(tmp_path, "a [cat:dog:8]", img2img))
    (m,) = messages(scene(tmp_path, "a [cat:dog:9]", img2img))
    assert "img2img runs 10 of the 20 steps" in m[2] and "the last is step 9" in m[2]
    out = messages(scene(tmp_path, "a [(cat:1.2.3):dog:5] | b", EDIT))
    assert [m for m in out if m[0] == "warning" and "without editing" in m[2]]
    (m,) = messages(scene(tmp_path, "a [cat:dog:1e999]", EDIT))
    assert m[0] == "error" and "`1e999` is not finite" in m[2] and m[1] == "5:23"
    out = messages(scene(tmp_path, "a [(cat:1.2.3):dog:5]", EDIT))
    assert [m for m in out if m[0] == "error" and "1.2.3" in m[2]]
    out = messages(scene(tmp_path, "a [cat:dog:5] AND b", EDIT))
    assert [m for m in out if "`AND`" in m[2]] and not [m for m in out if "prompt editing" in m[2]]


def test_eval_scores_the_last_steps_words():
    from scenec.eval import prompt_text

    def edit(d, t):
        d["model"]["prompt_syntax"] = "a1111"
    p = make_plan(prompt="a [(cat:1.2):dog:1] [x|y]", steps=4, edit=edit)
    assert prompt_text(p, p.jobs[0].global_.prompt) == "a dog y"

"""Prompt weights and long prompts as A1111 and ComfyUI read them (``prompt_syntax: a1111 | comfy``).

The parse matches A1111's documented examples and ComfyUI's rules; CLIP chunks are 75 tokens between start and
end tokens (A1111's comma backtrack, ComfyUI's whole words, ``BREAK``); a job equals diffusers' own pipeline fed
embeddings weighted by each UI's formula, computed here from the text encoders; a scene without weights makes
the images it made under ``plain``; the compiler's errors and warnings point at the prompt."""

import copy
import textwrap

import pytest
import torch

from scenec.compiler import compile_scene
from scenec.compiler.check import validate_file
from scenec.runtime.families import load_backend
from scenec.runtime.prompt_weights import clip_chunks, encode_t5
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import sd_plan, tiny_backend
from scenec.spec.prompt_syntax import parse

STEPS = 2
PROMPT, NEGATIVE = "a (red:1.5) fox", "(blurry:0.7) photo"


# --- the parse ------------------------------------------------------------------------------------------------

def pairs(text, syntax="a1111"):
    return [[p.text, p.weight] if not p.brk else ["BREAK", -1] for p in parse(text, syntax).pieces]


def test_a1111_parse_matches_its_documented_examples():
    """modules/prompt_parser.py's doctest of parse_prompt_attention, float for float."""
    assert pairs("normal text") == [["normal text", 1.0]]
    assert pairs("an (important) word") == [["an ", 1.0], ["important", 1.1], [" word", 1.0]]
    assert pairs("(unbalanced") == [["unbalanced", 1.1]]
    assert pairs("\\(literal\\]") == [["(literal]", 1.0]]
    assert pairs("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]
    assert pairs("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]
    assert pairs("a cat BREAK a dog") == [["a cat", 1.0], ["BREAK", -1], ["a dog", 1.0]]
    assert pairs("[a BREAKdown]") == [["a BREAKdown", 1 / 1.1]]  # BREAK is a word of its own
    assert parse("(x:1.2.3)", "a1111").errors and not parse("(x:1.2)", "a1111").errors
    assert parse("a ) b", "a1111").text == "a ) b"  # a stray bracket is text
    assert not parse("a (red:1) fox", "a1111").weighted and parse("a (red:1) fox", "a1111").text == "a red fox"


def test_comfy_parse_replaces_weights_and_reads_square_brackets_as_text():
    assert pairs("((a:1.3))", "comfy") == [["a", 1.3]]  # A1111: 1.3 × 1.1
    assert pairs("((a:1.3))") == [["a", 1.3 * 1.1]]
    assert pairs("a (b) [c]", "comfy") == [["a ", 1.0], ["b", 1.1], [" [c]", 1.0]]
    assert pairs("(x:foo)", "comfy") == [["x:foo", 1.1]]  # not a number: text, the bracket's 1.1
    assert pairs("(open", "comfy") == [["(open", 1.0]] and parse("(open", "comfy").problems
    assert pairs("\\(lit\\) (w)", "comfy") == [["(lit) ", 1.0], ["w", 1.1]]
    assert pairs("a BREAK b", "comfy") == [["a BREAK b", 1.0]]


# --- chunks -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd():
    """A tiny-sd backend of this module's own (tests change its text encoder's final layer norm)."""
    return load_backend("tiny-sd", device="cpu", dtype="fp32")


def test_a1111_chunks_are_75_tokens_break_at_a_comma_and_at_break(sd):
    tok = sd.pipe.tokenizer
    one = tok("fox", add_special_tokens=False).input_ids
    assert len(one) == 1
    long = clip_chunks(tok, parse("fox " * 80, "a1111").pieces, "a1111")
    assert [len(c.ids) for c in long] == [77, 77]
    assert long[0].ids == [tok.bos_token_id] + one * 75 + [tok.eos_token_id]
    assert long[1].ids[:7] == [tok.bos_token_id] + one * 5 + [tok.eos_token_id]
    # a comma 10 tokens before the chunk is full: what follows it moves to the next chunk
    text = "fox " * 63 + "fox, " + "fox " * 20
    a = clip_chunks(tok, parse(text, "a1111").pieces, "a1111")
    assert a[0].ids[1:67] == one * 64 + tok("a,", add_special_tokens=False).input_ids[-1:] + [tok.eos_token_id]
    assert a[1].ids[1:21] == one * 20
    brk = clip_chunks(tok, parse("fox BREAK (fox:1.4)", "a1111").pieces, "a1111")
    assert [c.ids[1:3] for c in brk] == [[one[0], tok.eos_token_id]] * 2 and brk[1].weights[1] == 1.4
    # an entity's chunks are not padded
    assert [len(c.ids) for c in clip_chunks(tok, parse("fox fox", "a1111").pieces, "a1111", pad=False)] == [4]


def test_comfy_moves_a_short_word_to_the_next_chunk_whole(sd):
    tok = sd.pipe.tokenizer
    three = tok("fast", add_special_tokens=False).input_ids
    assert len(three) == 3
    text = "fox " * 74 + "fast"
    comfy = clip_chunks(tok, parse(text, "comfy").pieces, "comfy")
    a1111 = clip_chunks(tok, parse(text, "a1111").pieces, "a1111")
    assert comfy[1].ids[1:4] == three and comfy[0].ids[75] == tok.eos_token_id  # 74 tokens, then the end
    assert a1111[0].ids[75] == three[0] and a1111[1].ids[1:3] == three[1:]  # A1111 cuts the word


# --- equal to diffusers fed the UIs' weighted embeddings -------------------------------------------------------

def weighted_reference(te_out, weights, syntax, empty):
    """Each UI's formula on one chunk, written from their descriptions (A1111 EmphasisOriginal, ComfyUI
    encode_token_weights)."""
    w = torch.tensor(weights)[None, :, None]
    if syntax == "a1111":
        out = te_out * w
        return out * (te_out.mean() / out.mean())
    return torch.where(w != 1, empty + (te_out - empty) * w, te_out)


def sd_embeds(pipe, text, syntax, sdxl):
    """The chunk of ``text`` (one, padded to 77) through the encoders, weighted; and SDXL's pooled vector."""
    parsed = parse(text, syntax)
    plain = parsed.text
    outs, pooled = [], None
    encoders = [(pipe.tokenizer, pipe.text_encoder)] + ([(pipe.tokenizer_2, pipe.text_encoder_2)] if sdxl else [])
    for tok, te in encoders:
        ids = tok(plain, padding="max_length", max_length=77, return_tensors="pt").input_ids
        weights = [1.0] * 77
        pos = 1
        for p in parsed.pieces:  # every test piece is whole words: its tokens are its own
            n = len(tok(p.text.strip(), add_special_tokens=False).input_ids)
            weights[pos:pos + n] = [p.weight] * n
            pos += n
        blank = tok("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        if sdxl:
            out = te(ids, output_hidden_states=True)
            z, empty = out.hidden_states[-2], te(blank, output_hidden_states=True).hidden_states[-2]
            if te is getattr(pipe, "text_encoder_2", None):
                pooled = out[0]
        else:
            z, empty = te(ids)[0], te(blank)[0]
        outs.append(weighted_reference(z, weights, syntax, empty))
    return torch.cat(outs, -1), pooled


def with_final_bias(pipe_or_backend_pipe):
    """A text encoder whose final layer norm has a bias (as CLIP's has; the random one's mean is ~0, where A1111's
    mean restore is skipped)."""
    te = pipe_or_backend_pipe.text_encoder
    getattr(te, "text_model", te).final_layer_norm.bias.data.fill_(0.25)


def reference_pipe(family):
    import diffusers

    if family == "sd":
        from scenec.runtime.tiny_sd import build_tiny_sd

        pipe = diffusers.StableDiffusionPipeline(**build_tiny_sd())
    else:
        from scenec.runtime.tiny_sdxl import build_tiny_sdxl

        parts = build_tiny_sdxl()
        parts["tokenizer_2"] = copy.deepcopy(parts["tokenizer"])
        pipe = diffusers.StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plan(family, syntax, prompt=PROMPT, negative=NEGATIVE, **kw):
    def edit(d, t):
        if family == "sdxl":
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
        d["model"]["prompt_syntax"] = syntax
    return sd_plan(steps=STEPS, edit=edit, seed=5, width=128, height=128, prompt=prompt, negative=negative, **kw)


def latents(be, p):
    return run_job(be, p, p.jobs[0], decode=False).latents


@pytest.mark.parametrize("family,syntax", [("sd", "a1111"), ("sd", "comfy"), ("sdxl", "a1111"), ("sdxl", "comfy")])
def test_a_weighted_job_equals_diffusers_fed_the_weighted_embeddings(family, syntax, sd):
    be = sd if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    ref = reference_pipe(family)
    if family == "sd":
        with_final_bias(be.pipe)
        with_final_bias(ref)
        be.clear_cache()
    ours = latents(be, plan(family, syntax))
    with torch.no_grad():
        pos, pooled = sd_embeds(ref, PROMPT, syntax, family == "sdxl")
        neg, npooled = sd_embeds(ref, NEGATIVE, syntax, family == "sdxl")
    kw = {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": npooled} if family == "sdxl" else {}
    theirs = ref(prompt_embeds=pos, negative_prompt_embeds=neg, height=128, width=128, num_inference_steps=STEPS,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images
    if family == "sd":  # the plan's solver is DDIM: diffusers' pipeline runs it as the tiny model's scheduler
        assert type(ref.scheduler).__name__ == "DDIMScheduler"
    diff = float((ours - theirs).abs().max())
    plain = latents(be, plan(family, "plain", prompt=parse(PROMPT, syntax).text, negative=parse(NEGATIVE, syntax).text))
    effect = float((ours - plain).abs().max())
    print(f"{family} {syntax}: max |Δ| vs diffusers = {diff:.3g}; vs unweighted {effect:.3g}")
    assert diff <= 1e-5
    assert effect > 1e-3  # the weights act


@pytest.mark.parametrize("syntax", ["a1111", "comfy"])
def test_a_scene_without_weights_makes_the_images_it_made_under_plain(syntax, sd):
    be = sd
    text = "a red fox, in a meadow"
    ent = [{"id": "fox", "prompt": "a (fox:1)", "token": None}]
    ours = latents(be, plan("sd", syntax, prompt=text, negative="blurry", entities=ent))
    base = latents(be, plan("sd", "plain", prompt=text, negative="blurry",
                            entities=[{**ent[0], "prompt": "a fox"}]))
    assert torch.equal(ours, base)


def test_a_long_prompt_is_read_in_chunks_against_a_short_negative(sd):
    """80 tokens: plain CLIP cuts at 75; a1111 reads 2 chunks (154 keys), the negative one chunk (77: its row padded
    and masked, runtime/backend.assemble)."""
    be = sd
    long = "a fox, " * 27  # 81 tokens on this tokenizer
    weighted = latents(be, plan("sd", "a1111", prompt=long, negative="blurry"))
    be.use_text_options(plan("sd", "a1111"))
    assert be.encode_global(long).shape[1] == 154 and be.encode_global("blurry").shape[1] == 77
    cut = latents(be, plan("sd", "plain", prompt=long, negative="blurry"))
    assert torch.isfinite(weighted).all() and float((weighted - cut).abs().max()) > 1e-4
    # the words past the first chunk act: changing them changes the image
    other = latents(be, plan("sd", "a1111", prompt="a fox, " * 25 + "a cat, a cat,", negative="blurry"))
    assert float((weighted - other).abs().max()) > 1e-4


# --- Flux: T5 --------------------------------------------------------------------------------------------------

def test_flux_t5_weights_follow_each_formula_and_pool_the_plain_text():
    be = tiny_backend()
    pipe = be.pipe
    tok, te = pipe.tokenizer_2, pipe.text_encoder_2
    with torch.no_grad():
        ids = tok("a red fox", padding="max_length", max_length=32, return_tensors="pt").input_ids
        z = te(ids)[0]
        blank = te(tok("", padding="max_length", max_length=32, return_tensors="pt").input_ids)[0]
        w = [1.0] * 32
        w[1] = 1.5  # `red`
        for syntax in ("a1111", "comfy"):
            ours = encode_t5(pipe, "a (red:1.5) fox", syntax, 32, 32, dtype=torch.float32, device="cpu")
            ref = weighted_reference(z, w, syntax, blank)
            if syntax == "a1111" and not bool(z.mean() * (z * torch.tensor(w)[None, :, None]).mean() > 0):
                ref = z * torch.tensor(w)[None, :, None]  # the restore is skipped where the mean changes sign
            assert torch.allclose(ours, ref, atol=1e-6), syntax
        assert encode_t5(pipe, "a (red:1) fox", "a1111", 32, 32, dtype=torch.float32, device="cpu") == "a red fox"


def test_flux_job_with_weights_differs_and_without_equals_plain():
    from scenec.runtime.testing import make_plan

    be = tiny_backend()

    def p(syntax, prompt):
        def edit(d, t):
            d["model"]["prompt_syntax"] = syntax
        return make_plan(prompt=prompt, steps=2, width=64, height=64, edit=edit)

    base = latents(be, p("plain", "a red fox"))
    assert torch.equal(latents(be, p("comfy", "a (red:1.0) fox")), base)
    assert float((latents(be, p("comfy", "a (red:1.8) fox")) - base).abs().max()) > 1e-4


# --- the compiler ------------------------------------------------------------------------------------------------

SCENE = """\
scenec: 1
model: tiny-sd
canvas: {width: 64, height: 64}
background:
  prompt: "PROMPT"
"""


def scene(tmp_path, prompt, extra="", toml=None):
    (tmp_path / "s.yaml").write_text(SCENE.replace("PROMPT", prompt) + extra)
    if toml is not None:
        (tmp_path / "scenec.toml").write_text(toml)
    return tmp_path / "s.yaml"


def messages(path):
    _, diags = validate_file(path)
    return [(d.severity, f"{d.pos.line}:{d.pos.col}", d.message, d.hint) for d in diags.items]


def test_break_on_flux_is_a_warning(tmp_path):
    f = scene(tmp_path, "a cat BREAK a dog", "prompt_syntax: a1111\n")
    f.write_text(f.read_text().replace("tiny-sd", "tiny"))
    out = messages(f)
    assert [(s, at) for s, at, _, _ in out] == [("warning", "5:18")] and "`BREAK` does nothing on Flux" in out[0][2]


def test_plain_prompts_that_look_weighted_get_one_warning_with_the_key_to_set(tmp_path):
    out = messages(scene(tmp_path, "a (red:1.3) fox", "entities: [{id: a, prompt: '(b:2)'}]\n"))
    assert len(out) == 1 and out[0][0] == "warning" and out[0][1] == "5:11"
    assert "`(red:1.3)` is read as text (and 1 more prompts)" in out[0][2] and "prompt_syntax: a1111" in out[0][3]
    assert messages(scene(tmp_path, "a (red:1.3) fox", "prompt_syntax: a1111\n")) == []


def test_the_project_file_sets_the_syntax_and_a_bad_value_is_located(tmp_path):
    path = scene(tmp_path, "a (red:1.3) fox", toml='[project]\nprompt_syntax = "a1111"\n')
    assert messages(path) == []
    p = compile_scene(path)
    assert p.model.prompt_syntax == "a1111" and "prompt_syntax: a1111" in p.doc.scene.resolved
    (tmp_path / "scenec.toml").write_text('[project]\n\nprompt_syntax = "webui"\n')
    _, diags = validate_file(path)
    err = diags.errors
    assert len(err) == 1 and err[0].pos.line == 3 and "must be one of" in err[0].message
    # in other capitals: a hint, and no warning that the prompt's weights are read as text (the value was meant)
    (tmp_path / "scenec.toml").write_text('[project]\nprompt_syntax = "A1111"\n')
    _, diags = validate_file(path)
    assert [(d.severity, d.hint) for d in diags.items] == [("error", "did you mean `a1111`?")], diags.items


def test_long_clip_prompts_warn_under_plain_only_and_the_plan_carries_the_syntax(tmp_path):
    long = "fox " * 90
    assert any("is cut" in m[2] for m in messages(scene(tmp_path, long)))
    plain = compile_scene(scene(tmp_path, long))
    path = scene(tmp_path, long, "prompt_syntax: comfy\n")
    assert messages(path) == []
    comfy = compile_scene(path)
    assert "prompt_syntax" not in plain.json["model"]  # plain plans keep their hashes
    assert comfy.json["model"]["prompt_syntax"] == "comfy"
    assert plain.jobs[0].job_hash != comfy.jobs[0].job_hash


def test_a_bad_weight_is_an_error_from_the_cli(tmp_path):
    import subprocess
    import sys

    path = scene(tmp_path, "a (red:1..2) fox", "prompt_syntax: a1111\n")
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert textwrap.dedent("""\
        s.yaml:5:18: error: `:1..2)`: the weight `1..2` is not a number (A1111 stops on it)""") in r.stderr


def test_every_bad_weight_of_a_prompt_is_an_error_at_its_column(tmp_path):
    """Errors at one position collapse into one, so each is at its own weight: all of them at once."""
    for syntax, prompt, want in (
            ("comfy", "a (x:inf) meadow (y:nan), (z:1e999)",
             [("5:15", "x:inf"), ("5:30", "y:nan"), ("5:39", "z:1e999")]),
            ("a1111", "(a:1.2.3) b (c:4..5)", [("5:14", "1.2.3"), ("5:26", "4..5")])):
        out = [m for m in messages(scene(tmp_path, prompt, f"prompt_syntax: {syntax}\n")) if m[0] == "error"]
        assert [at for _, at, _, _ in out] == [at for at, _ in want], out
        assert all(frag in m[2] for m, (_, frag) in zip(out, want)), out
    # a weight from a matrix value: at the prompt (the source does not show the filled text)
    out = messages(scene(tmp_path, "a {style}", 'prompt_syntax: comfy\nmatrix:\n  style: ["(a:inf)"]\n'))
    assert [(m[1], "a:inf" in m[2]) for m in out if m[0] == "error"] == [("5:11", True)]


def test_eval_scores_the_words_without_the_syntax(tmp_path):
    from scenec.eval import job_text

    p = compile_scene(scene(tmp_path, "a (red:1.3) [fox]", "prompt_syntax: a1111\n"))
    assert job_text(p, p.json["jobs"][0]) == "a red fox"


# --- review: ComfyUI's word split, BREAK's text, odd weights, matrix values, the masked short row -------------

def test_comfy_segments_stay_words_of_their_own():
    """ComfyUI tokenizes each bracket segment's words on their own (comfy/sd1_clip.py tokenize_with_weights):
    `(masterpiece)(best quality)` is `masterpiece`, `best`, `quality`, never the word `masterpiecebest`."""
    words = [w for p in parse("(masterpiece)(best quality)", "comfy").pieces for w in p.text.split()]
    assert words == ["masterpiece", "best", "quality"]
    assert parse("a(b:1)c", "comfy").text.split() == ["a", "b", "c"]
    assert pairs("(unnecessary)(parens)") == [["unnecessaryparens", 1.1]]  # A1111 does merge the text


def test_break_still_separates_the_words_of_the_plain_text():
    assert parse("a cat BREAK a dog", "a1111").text == "a cat a dog"  # Flux's pooled CLIP, eval, T5 counts


def test_weights_that_are_not_finite_are_errors_and_break_in_brackets_warns():
    assert parse("(a:1e999)", "comfy").errors and parse("(a:nan)", "comfy").errors
    assert parse("(a:" + "9" * 400 + ")", "a1111").errors
    assert any("BREAK" in m for m in parse("(a BREAK b)", "a1111").problems)
    assert not parse("a BREAK b", "a1111").problems and not parse("(a BREAK b:1)", "a1111").problems
    # prompt editing is read before this parse, into the texts it parses (spec/prompt_editing.py)
    assert not parse("[(red:1.2)]", "a1111").problems and not parse("[cat:dog:0.5]", "a1111").problems


def test_a1111s_composable_and_warns():
    """A1111 splits a prompt at `AND` into prompts whose predictions it sums; scenec reads the word, and says so."""
    (problem,) = parse("a cat AND a dog:1.2", "a1111").problems
    assert "`AND`" in problem and "composable" in problem
    assert not parse("a sandy beach and a dog", "a1111").problems and not parse("a cat AND a dog", "comfy").problems


def test_comfyuis_embedding_syntax_warns_as_a1111s_lora_syntax_does():
    """ComfyUI loads `embedding:NAME` from its models/embeddings folder; scenec reads it as text, so it says so."""
    (problem,) = parse("(worst quality:1.4), embedding:EasyNegative", "comfy").problems
    assert "`embedding:EasyNegative`" in problem and "model.embeddings" in problem
    assert not parse("an embedding: a vector", "comfy").problems


def test_matrix_values_are_checked_under_the_syntax(tmp_path):
    extra = 'prompt_syntax: a1111\nmatrix:\n  style: ["(oil:1.2.3)", "watercolor"]\n'
    out = messages(scene(tmp_path, "a harbour, {style}", extra))
    assert [m for m in out if m[0] == "error" and "1.2.3" in m[2]]


def test_a_short_negative_row_computes_what_it_alone_would(sd):
    """The claim of runtime/backend.assemble: the 77-key negative beside a 154-key prompt, padded and masked,
    equals diffusers running each row alone (the UNet called per row, the negative on its own 77 keys)."""
    be = sd
    long = "a fox, " * 27
    p = plan("sd", "a1111", prompt=long, negative="blurry")
    ours = latents(be, p)
    be.use_text_options(p)
    pos, neg = be.encode_global(long), be.encode_global("blurry")
    assert pos.shape[1] == 154 and neg.shape[1] == 77
    ref = reference_pipe("sd")  # fed our embeddings: its own text encoder is not used
    forward = ref.unet.forward

    def per_row(sample, t, encoder_hidden_states=None, **kw):
        keys = [encoder_hidden_states[i:i + 1, :77 if i == 0 else None] for i in range(sample.shape[0])]
        rows = [forward(sample[i:i + 1], t, encoder_hidden_states=k, **kw)[0] for i, k in enumerate(keys)]
        return (torch.cat(rows),)

    ref.unet.forward = per_row
    theirs = ref(prompt_embeds=pos, negative_prompt_embeds=torch.cat([neg, torch.full_like(neg, 9.0)], 1), height=128,
                 width=128, num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(5),
                 output_type="latent").images
    assert float((ours - theirs).abs().max()) <= 1e-5


def test_a1111_comma_backtrack_boundary_and_break_at_the_ends(sd):
    """modules/sd_hijack_clip.py tokenize_line: the words after the last comma move when that comma is at most
    20 tokens back (`len(chunk) - last_comma <= 20`), not 21; BREAK first makes an empty chunk, BREAK last none."""
    tok = sd.pipe.tokenizer
    comma = tok("a,", add_special_tokens=False).input_ids[-1]

    def first_chunk(n_before):  # the comma is token n_before + 1 of the chunk
        text = "fox " * n_before + "fox, " + "fox " * 40
        return clip_chunks(tok, parse(text, "a1111").pieces, "a1111")[0].ids

    moved, kept = first_chunk(54), first_chunk(53)  # the comma at index 55 (20 back) and 54 (21 back)
    assert moved[56] == comma and moved[57:77] == [tok.eos_token_id] * 20
    assert kept[55] == comma and kept[76] == tok.eos_token_id and kept[75] != tok.eos_token_id
    eos = tok.eos_token_id
    assert [c.ids[1] for c in clip_chunks(tok, parse("BREAK fox", "a1111").pieces, "a1111")][0] == eos
    assert len(clip_chunks(tok, parse("BREAK fox", "a1111").pieces, "a1111")) == 2
    assert len(clip_chunks(tok, parse("fox BREAK", "a1111").pieces, "a1111")) == 1
    assert len(clip_chunks(tok, parse("fox BREAK BREAK fox", "a1111").pieces, "a1111")) == 3


def test_a1111_keeps_an_embeddings_vectors_in_one_chunk(sd):
    """tokenize_line: an embedding that does not fit in what is left of the chunk starts the next one."""
    from diffusers.loaders import TextualInversionLoaderMixin

    tok = copy.deepcopy(sd.pipe.tokenizer)
    tok.add_tokens(["<emb>", "<emb>_1", "<emb>_2"])  # a 3-vector embedding as diffusers loads it
    emb = set(tok.convert_tokens_to_ids(["<emb>", "<emb>_1", "<emb>_2"]))

    def where(n):
        text = "fox " * n + "(<emb>:1.2), fox"
        chunks = clip_chunks(tok, parse(text, "a1111").pieces, "a1111",
                             lambda t: TextualInversionLoaderMixin.maybe_convert_prompt(sd.pipe, t, tok))
        return [sum(t in emb for t in c.ids) for c in chunks]

    assert where(60) == [3] and where(70) == [3, 0] and where(74) == [0, 3]


def test_warnings_about_other_uis_syntax_point_at_it(tmp_path):
    """`<lora:…>`, a `[a:b:when]` that is no prompt editing and ComfyUI's `embedding:NAME` are warned about at their
    own column, not at the prompt's start (a long prompt pasted from A1111 holds many words); prompt editing that
    runs is not warned about."""
    out = messages(scene(tmp_path, "a cat <lora:film:0.8>, [cat:dog:0.5] [a:b:half]", "prompt_syntax: a1111\n"))
    at = {m.split("`")[1]: pos for s, pos, m, _ in out if s == "warning"}
    assert at == {"<lora:film:0.8>": "5:18", "[a:b:half]": "5:54"}, out  # at the word that is no number
    out = messages(scene(tmp_path, "a cat, embedding:bad", "prompt_syntax: comfy\n"))
    assert [(s, pos) for s, pos, m, _ in out if "embedding:bad" in m] == [("warning", "5:19")], out

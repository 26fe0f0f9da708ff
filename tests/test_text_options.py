"""Textual-inversion embeddings and CLIP skip on SD and SDXL (``model: {id, embeddings, clip_skip}``).

Without entities a job equals diffusers' own pipeline after ``load_textual_inversion`` (multi-vector, in the
prompt and the negative) or called with ``clip_skip``; the backend is clean again for a plan without them; an
embedding's word in an entity prompt becomes its tokens in that entity's slot of the text (seen by its region
only) and changes nothing else; bad embeddings and clip_skip values are errors at FILE:LINE:COL."""

import copy
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from scenec.runtime.families import load_backend
from scenec.runtime.sampler import run_job
from scenec.runtime.testing import box, sd_plan, tiny_sd_backend
from scenec.spec.errors import PlanError

STEPS = 2
PROMPT, NEGATIVE = "a <cat> in a meadow", "<bad> blurry"


def write(path, tensors: dict) -> dict:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return {"name": path.name, "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def embeddings(tmp_path, family: str, seed: int = 0) -> list[dict]:
    """A 2-vector `<cat>` and a 1-vector `<bad>`, random, in the family's format (SDXL: clip_l and clip_g)."""
    rng = np.random.default_rng(seed)
    out = []
    for token, n in (("<cat>", 2), ("<bad>", 1)):
        if family == "sd":
            t, keys = {"emb_params": rng.standard_normal((n, 32))}, ["emb_params"]
        else:
            keys = ["clip_l", "clip_g"]
            t = {k: rng.standard_normal((n, 32)) for k in keys}
        out.append({**write(tmp_path / f"{token[1:-1]}{seed}.safetensors", t), "token": token, "vectors": n,
                    "keys": keys})
    return out


def backend(family):
    return tiny_sd_backend() if family == "sd" else load_backend("tiny-sdxl", device="cpu", dtype="fp32")


def plan(family, embs=(), clip_skip=None, **kw):
    def edit(d, t):
        if family == "sdxl":
            d["model"] = {**d["model"], "spec": "tiny-sdxl", "family": "sdxl"}
        if embs:
            d["model"]["embeddings"] = list(embs)
        if clip_skip is not None:
            d["model"]["clip_skip"] = clip_skip
    kw.setdefault("width", 128)
    kw.setdefault("height", 128)
    return sd_plan(steps=STEPS, edit=edit, seed=5, **kw)


def latents(be, p):
    return run_job(be, p, p.jobs[0], decode=False).latents


def pipeline(family):
    """diffusers' own pipeline over a second build of the tiny model: nothing of scenec's runtime takes part."""
    if family == "sd":
        from diffusers import StableDiffusionPipeline

        from scenec.runtime.tiny_sd import build_tiny_sd

        pipe = StableDiffusionPipeline(**build_tiny_sd())
    else:
        from diffusers import StableDiffusionXLPipeline

        from scenec.runtime.tiny_sdxl import build_tiny_sdxl

        parts = build_tiny_sdxl()
        parts["tokenizer_2"] = copy.deepcopy(parts["tokenizer"])  # tiny-sdxl shares one; each loads its words
        pipe = StableDiffusionXLPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, **kw):
    kw.setdefault("negative_prompt", NEGATIVE)
    return pipe(PROMPT, height=128, width=128, num_inference_steps=STEPS,
                guidance_scale=7.5, generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_embeddings_match_diffusers_load_textual_inversion(tmp_path, family):
    from safetensors.torch import load_file

    be = backend(family)
    embs = embeddings(tmp_path, family)
    before = latents(be, plan(family, prompt=PROMPT, negative=NEGATIVE))
    ours = latents(be, plan(family, embs, prompt=PROMPT, negative=NEGATIVE))
    ref_pipe = pipeline(family)
    for e in embs:
        if family == "sd":  # the file as diffusers reads it (A1111's single-tensor format)
            ref_pipe.load_textual_inversion(e["path"], token=e["token"])
        else:  # diffusers' SDXL recipe: each tensor into its encoder
            sd = load_file(e["path"])
            ref_pipe.load_textual_inversion(sd["clip_l"], token=e["token"], text_encoder=ref_pipe.text_encoder,
                                            tokenizer=ref_pipe.tokenizer)
            ref_pipe.load_textual_inversion(sd["clip_g"], token=e["token"], text_encoder=ref_pipe.text_encoder_2,
                                            tokenizer=ref_pipe.tokenizer_2)
    ref = call(ref_pipe)
    diff = float((ours - ref).abs().max())
    print(f"{family} embeddings: max |Δ| vs diffusers = {diff:.3g}")
    assert diff <= 1e-5
    assert float((ours - before).abs().max()) > 1e-3  # the embeddings act
    # unloaded for a plan without them: the model as it was loaded, bit for bit
    assert torch.equal(latents(be, plan(family, prompt=PROMPT, negative=NEGATIVE)), before)
    assert len(be.pipe.tokenizer) == len(be.text.kept["tokenizer"][0])


def test_sdxl_pools_at_the_end_token_with_an_encoder_config_of_the_legacy_eos_id(tmp_path):
    """SDXL's text_encoder_2 config says ``eos_token_id: 2`` (from before transformers#24773): CLIP then pools at
    the largest token id, which an embedding's added token is (diffusers#10754), so the pooled vector would be the
    embedding's hidden state, not the end token's (A1111's and ComfyUI's). scenec pools at the end token while
    embeddings are loaded: the images equal those of the same model with the right end id, and the encoder has
    its own setting back once they are unloaded."""
    be = load_backend("tiny-sdxl", device="cpu", dtype="fp32")
    embs = embeddings(tmp_path, "sdxl")
    p, bare = plan("sdxl", embs, prompt=PROMPT, negative=NEGATIVE), plan("sdxl", prompt=PROMPT, negative=NEGATIVE)
    right = latents(be, p)
    latents(be, bare)  # unloads them
    core = be.pipe.text_encoder_2.text_model
    assert core.eos_token_id == be.pipe.tokenizer_2.eos_token_id != 2
    kept, core.eos_token_id = core.eos_token_id, 2  # as SDXL's own config has it
    try:
        be.clear_cache()
        assert torch.equal(latents(be, p), right)  # diffusers' pipeline would pool at `<cat>`
        assert core.eos_token_id != 2
        latents(be, bare)  # unloaded: the model as it was loaded (on CLIP's vocabulary the end id is the largest
        assert core.eos_token_id == 2  # one, so without added words argmax is the end token; tiny's end id is 1)
    finally:
        core.eos_token_id = kept
        be.clear_cache()


class _Shim:
    """diffusers 0.42's SD ``encode_prompt`` with ``clip_skip`` reads ``text_encoder.text_model.final_layer_norm``;
    transformers 5's CLIPTextModel has no ``text_model`` (its layers are its own): the reference pipeline gets
    that one name back, nothing else changes."""

    @staticmethod
    def apply(pipe):
        te = pipe.text_encoder
        if not hasattr(te, "text_model"):
            object.__setattr__(te, "text_model", te)  # a plain attribute: no submodule cycle


@pytest.mark.parametrize("family,skip", [("sd", 2), ("sdxl", 1)])
def test_clip_skip_matches_the_pipeline(family, skip):
    """The pipeline called with ``clip_skip``; its negative encoded by its own ``encode_prompt(..., clip_skip)``:
    scenec skips on every prompt, as A1111 and ComfyUI do, where diffusers 0.42's ``__call__`` encodes the
    negative from the last layer (huggingface/diffusers#13796). tiny-sd's encoder has 2 layers (clip_skip 0 – 2),
    tiny-sdxl's 0 – 1 (SDXL reads from the penultimate)."""
    be = backend(family)
    plain = latents(be, plan(family, prompt=PROMPT, negative=NEGATIVE))
    ours = latents(be, plan(family, clip_skip=skip, prompt=PROMPT, negative=NEGATIVE))
    ref_pipe = pipeline(family)
    _Shim.apply(ref_pipe)
    cpu = torch.device("cpu")
    if family == "sd":
        neg = {"negative_prompt_embeds": ref_pipe.encode_prompt(NEGATIVE, cpu, 1, False, clip_skip=skip)[0]}
    else:
        e, _, pooled, _ = ref_pipe.encode_prompt(prompt=NEGATIVE, device=cpu, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False, clip_skip=skip)
        neg = {"negative_prompt_embeds": e, "negative_pooled_prompt_embeds": pooled}
    diff = float((ours - call(ref_pipe, clip_skip=skip, negative_prompt=None, **neg)).abs().max())
    print(f"{family} clip_skip={skip}: max |Δ| vs diffusers = {diff:.3g}")
    assert diff <= 1e-5
    assert float((ours - plain).abs().max()) > 1e-3


def test_an_embedding_in_an_entity_prompt_is_its_regions_tokens_only(tmp_path):
    """`<cat>` (2 vectors) in the fox's prompt: the fox's slot of the text holds its 2 tokens (the layout counts
    them, its region alone sees them); other vectors under the same token change that slot and nothing else."""
    be = tiny_sd_backend()
    g = (16, 16)
    ents = [{"id": "fox", "prompt": "a <cat> running", "token": box(g, 2, 2, 8, 8)},
            {"id": "tree", "prompt": "a green tree", "token": box(g, 8, 8, 16, 14)}]
    program = [{"op": "denoise", "from": 0, "to": 1, "regional": True, "theta": None, "eta": 0.0}]
    conds, orig = [], be.cond

    def spy(rows):
        conds.append(orig(rows))
        return conds[-1]

    be.cond = spy
    be.attn.probe = []
    try:
        seen = []
        for seed in (0, 1):
            conds.clear()
            be.attn.probe = []
            latents(be, plan("sd", embeddings(tmp_path, "sd", seed), entities=ents, program=program, width=256,
                            height=256))
            seen.append(([c for c in conds], be.attn.probe))
        tok = be.pipe.tokenizer  # `<cat>` loaded: it stands for `<cat> <cat>_1`
        ids = tok(be.pipe.maybe_convert_prompt("a <cat> running", tok)).input_ids
        added = [tok.convert_tokens_to_ids(t) for t in ("<cat>", "<cat>_1")]
    finally:
        del be.cond
        be.attn.probe = None
    (a, probe), (b, _) = seen
    pos_a, pos_b = (max(c, key=lambda x: sum(x.lengths)) for c in (a, b))  # the positive's (the negatives: "")
    n_g, n_fox, n_tree = pos_a.lengths
    assert pos_a.lengths == pos_b.lengths and n_g == 77 and n_fox == len(ids)
    assert [i for i in ids if i in added] == added  # the 2 vectors are 2 tokens of the fox's slot
    fox, tree = slice(n_g, n_g + n_fox), slice(n_g + n_fox, n_g + n_fox + n_tree)
    assert torch.equal(pos_a.seq[:, :n_g], pos_b.seq[:, :n_g])  # the background's text: unchanged
    assert torch.equal(pos_a.seq[:, tree], pos_b.seq[:, tree])  # the other entity's: unchanged
    assert float((pos_a.seq[:, fox] - pos_b.seq[:, fox]).abs().max()) > 1e-2  # the fox's: changed
    a16 = next(r for r in probe if r["n_q"] == 16 * 16 and r["allow"].shape[1] == n_g + n_fox + n_tree)
    region = torch.from_numpy(ents[0]["token"].reshape(-1) > 0)
    assert torch.equal(a16["allow"][:, fox], region[:, None].expand(-1, n_fox))  # only the fox's region sees them


def test_a_token_the_vocabulary_has_fails_the_job_in_one_line_and_leaves_the_model_clean(tmp_path):
    be = tiny_sd_backend()
    before = latents(be, plan("sd", prompt="a meadow"))
    bad = [{**embeddings(tmp_path, "sd")[1], "token": "a"}]  # a word of the tiny tokenizer
    with pytest.raises(PlanError, match="already in tokenizer vocabulary"):
        latents(be, plan("sd", bad, prompt="a meadow"))
    assert torch.equal(latents(be, plan("sd", prompt="a meadow")), before)


def test_an_embedding_file_changed_or_gone_since_compile_fails_alone_and_leaves_the_model_clean(tmp_path):
    """Two embeddings, the second's file changed (other tensor) or removed after the plan was made: the job fails
    in one line, the first embedding, already loaded, is unloaded again, so a plan without embeddings runs on the
    model as loaded and one with the first embedding alone still loads it (diffusers refuses a word it has)."""
    be = tiny_sd_backend()
    before = latents(be, plan("sd", prompt=PROMPT))
    cat, bad = embeddings(tmp_path, "sd")
    alone = latents(be, plan("sd", [cat], prompt=PROMPT))
    n = len(be.text.kept["tokenizer"][0])
    write(tmp_path / "other.safetensors", {"something_else": np.ones((1, 32))})
    changed = {**bad, "path": str(tmp_path / "other.safetensors")}
    gone = {**bad, "path": str(tmp_path / "gone.safetensors")}
    for broken, msg in ((changed, "has no tensor `emb_params`"), (gone, "cannot be read")):
        with pytest.raises(PlanError, match=msg):
            latents(be, plan("sd", [cat, broken], prompt=PROMPT))
        assert len(be.pipe.tokenizer) == n and be.text.loaded == ()
    assert torch.equal(latents(be, plan("sd", prompt=PROMPT)), before)
    assert torch.equal(latents(be, plan("sd", [cat], prompt=PROMPT)), alone)


SCENE = """scenec: 1
model:
  id: {model}
  embeddings:
    - file: emb/bad.safetensors
    - {{file: emb/missing.safetensors}}
    - {{file: emb/wide.safetensors, token: wide}}
    - {{file: emb/xl.safetensors, token: xl}}
    - {{file: emb/bad.safetensors, token: bad}}
    - {{file: emb/two.safetensors, token: two}}
    - {{file: emb/two.safetensors, token: two_1}}
  clip_skip: {skip}
canvas: {{width: 128, height: 128}}
background: {{prompt: "a meadow", negative: "bad"}}
"""


def files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "emb").mkdir(exist_ok=True)
    write(tmp_path / "emb/bad.safetensors", {"emb_params": rng.standard_normal((1, 32))})
    write(tmp_path / "emb/wide.safetensors", {"emb_params": rng.standard_normal((1, 48))})
    write(tmp_path / "emb/xl.safetensors", {k: rng.standard_normal((1, 32)) for k in ("clip_l", "clip_g")})
    write(tmp_path / "emb/two.safetensors", {"emb_params": rng.standard_normal((2, 32))})


def test_bad_embeddings_and_clip_skip_are_located_errors(tmp_path):
    from scenec.compiler.check import validate_file

    files(tmp_path)
    p = tmp_path / "s.yaml"
    p.write_text(SCENE.format(model="tiny-sd", skip=3))
    _, diags = validate_file(p)
    errs = sorted((d.pos.line, d.pos.col, d.message) for d in diags if d.severity == "error")
    want = [(6, 14, "`emb/missing.safetensors` not found"), (7, 14, "is 48 wide; this model's text encoder takes 32"),
            (8, 14, "(this one is SDXL's: `clip_l` and `clip_g`)"), (9, 42, "token `bad` is also embedding 1's"),
            (11, 42, "token `two_1` is also embedding 6's"), (12, 14, "clip_skip 3 is out of range")]
    assert [(line, col) for line, col, _ in errs] == [(line, col) for line, col, _ in want], errs
    for (_, _, got), (_, _, frag) in zip(errs, want):
        assert frag in got, (got, frag)
    r = subprocess.run([sys.executable, "-m", "scenec", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{p.name}:9:42" in r.stdout + r.stderr or "s.yaml:9:42" in r.stdout + r.stderr

    p.write_text(SCENE.format(model="tiny", skip=1))  # Flux: refused at the keys
    _, diags = validate_file(p)
    errs = [(d.pos.line, d.message, d.hint) for d in diags if d.severity == "error"]
    assert [line for line, *_ in errs] == [4, 12]
    assert all("SD and SDXL" in m and "Flux" in m and h for _, m, h in errs)


def test_a_token_with_a_space_is_told_what_a_token_is(tmp_path):
    """A token is one word (`\\S+`): `<cat>` is one. The error says so, not the ids' "lowercase letters, digits…"
    (which `<cat>` is not either)."""
    from scenec.compiler.check import validate_file

    files(tmp_path)
    p = tmp_path / "s.yaml"
    p.write_text('scenec: 1\nmodel: {id: tiny-sd, embeddings: [{file: emb/bad.safetensors, token: "my cat"}]}\n'
                 "canvas: {width: 128, height: 128}\n")
    _, diags = validate_file(p)
    (err,) = [d for d in diags if d.severity == "error"]
    assert (err.pos.line, err.pos.col) == (2, 70), err
    assert "`model.embeddings.0.token` must be one word, without spaces" in err.message
    assert "lowercase" not in err.message + (err.hint or "")


def test_clip_skip_hints_map_the_other_uis_per_family(tmp_path):
    """SD's hidden_states[-(k + 1)] is A1111's "Clip skip k + 1"; SDXL's count starts at the penultimate layer
    (hidden_states[-(k + 2)]): there ComfyUI's "CLIP Set Last Layer" −N is N − 2 and A1111's "Clip skip" does not
    act, so the SD mapping would send an SDXL user one layer too deep."""
    from scenec.compiler.check import validate_file

    hints = {}
    for model in ("tiny-sd", "tiny-sdxl"):
        p = tmp_path / f"{model}.yaml"
        p.write_text(f"scenec: 1\nmodel: {{id: {model}, clip_skip: 9}}\ncanvas: {{width: 128, height: 128}}\n")
        _, diags = validate_file(p)
        (err,) = [d for d in diags if d.severity == "error"]
        assert err.pos.line == 2 and "clip_skip 9 is out of range" in err.message
        hints[model] = err.hint
    assert hints["tiny-sd"] == "A1111's \"Clip skip 2\" is `clip_skip: 1`"
    assert "`clip_skip: N − 2`" in hints["tiny-sdxl"] and "Clip skip 2\" is `clip_skip: 1`" not in hints["tiny-sdxl"]


def test_an_sd_embedding_on_sdxl_and_a_word_of_a_models_vocabulary(tmp_path):
    """On SDXL an embedding needs both encoders' tensors; a model directory's tokenizer files name its words."""
    from scenec.compiler.check import validate_file

    files(tmp_path)
    p = tmp_path / "s.yaml"
    p.write_text("scenec: 1\nmodel: {id: tiny-sdxl, embeddings: [{file: emb/bad.safetensors}]}\n"
                 "canvas: {width: 128, height: 128}\n")
    _, diags = validate_file(p)
    (err,) = [d for d in diags if d.severity == "error"]
    assert err.pos.line == 2 and "`clip_l` and `clip_g`" in err.message
    model = tmp_path / "mymodel"  # a local SD 1.x directory, as far as the compiler reads one
    for sub, name, body in (("", "model_index.json", {"_class_name": "StableDiffusionPipeline"}),
                            ("text_encoder", "config.json", {"hidden_size": 32, "num_hidden_layers": 12}),
                            ("tokenizer", "vocab.json", {"bad": 7, "bad</w>": 8})):
        (model / sub).mkdir(parents=True, exist_ok=True)
        (model / sub / name).write_text(json.dumps(body))
    p.write_text("scenec: 1\nmodel:\n  id: mymodel\n  embeddings: [{file: emb/bad.safetensors}]\n  clip_skip: 11\n"
                 "canvas: {width: 128, height: 128}\n")
    _, diags = validate_file(p)
    (err,) = [d for d in diags if d.severity == "error"]
    assert err.pos.line == 4 and "`bad` is already a word of the model's tokenizer" in err.message


def test_plans_carry_them_by_content_and_rebuild_from_the_resolved_scene(tmp_path):
    from scenec.compiler import compile_scene

    files(tmp_path)
    p = tmp_path / "s.yaml"
    p.write_text("scenec: 1\nmodel: {id: tiny-sd, embeddings: [{file: emb/two.safetensors}], clip_skip: 1}\n"
                 "canvas: {width: 128, height: 128}\nbackground: {prompt: a two meadow}\n")
    doc = compile_scene(p).json
    (e,) = doc["model"]["embeddings"]
    assert (e["token"], e["vectors"], e["keys"], doc["model"]["clip_skip"]) == ("two", 2, ["emb_params"], 1)
    assert "token: two" in doc["scene"]["resolved"] and "clip_skip: 1" in doc["scene"]["resolved"]
    h = doc["jobs"][0]["job_hash"]
    (tmp_path / "moved").mkdir()
    (tmp_path / "emb/two.safetensors").rename(tmp_path / "moved/two.safetensors")
    p.write_text(p.read_text().replace("emb/two", "moved/two"))
    assert compile_scene(p).json["jobs"][0]["job_hash"] == h  # where the file lies changes no image
    write(tmp_path / "moved/two.safetensors", {"emb_params": np.ones((2, 32))})
    assert compile_scene(p).json["jobs"][0]["job_hash"] != h  # its content does
    p.write_text("scenec: 1\nmodel: tiny-sd\ncanvas: {width: 128, height: 128}\n")
    m = compile_scene(p).json["model"]
    assert "embeddings" not in m and "clip_skip" not in m  # plans without them: as before


def test_a_flux_plan_with_text_options_is_refused_by_the_runtime_too():
    """The compiler refuses them on Flux at the key; a hand-made plan that has them fails in one line."""
    from scenec.runtime.testing import make_plan, tiny_backend
    from scenec.spec.errors import Unsupported

    p = make_plan(steps=1, width=64, height=64, edit=lambda d, t: d["model"].update(clip_skip=1))
    with pytest.raises(Unsupported, match="SD and SDXL models only"):
        run_job(tiny_backend(), p, p.jobs[0], decode=False)


def test_a_token_inside_a_longer_prompt_word_is_a_warning(tmp_path):
    """The tokenizer splits an added word out of any word that contains it (diffusers; A1111 matches whole
    words): `bad` in "badger" would bring the embedding into the badger's prompt. Said at that prompt."""
    from scenec.compiler.check import validate_file

    files(tmp_path)
    p = tmp_path / "s.yaml"
    p.write_text("scenec: 1\nmodel: {id: tiny-sd, embeddings: [{file: emb/bad.safetensors}]}\n"
                 "canvas: {width: 128, height: 128}\n"
                 'background: {prompt: "a meadow", negative: "bad, blurry"}\n'
                 "entities:\n"
                 '  - {id: b, prompt: "a Badger digging", shape: {box: [0.1, 0.1, 0.5, 0.5]}}\n')
    _, diags = validate_file(p)
    warns = [(d.pos.line, d.message) for d in diags if d.severity == "warning" and "embedding token" in d.message]
    assert not [d for d in diags if d.severity == "error"]
    assert warns == [(6, "embedding token `bad` is inside the word `Badger`: the tokenizer splits it out of the "
                          "word, so the embedding acts there too")], warns  # the negative's whole word: no warning


def test_text_options_in_scenec_toml_are_refused_at_their_line(tmp_path):
    """`default_model` takes `id`, `config`, `vae` and `lora` (docs/language.md); the error named only `id` and
    `lora`, at scenec.toml:1:1 whatever line set it."""
    from scenec.compiler.check import validate_file

    (tmp_path / "scenec.toml").write_text('# my project\n[project]\ndefault_model = {id = "tiny-sd", clip_skip = 1}\n')
    p = tmp_path / "s.yaml"
    p.write_text("scenec: 1\ncanvas: {width: 64, height: 64}\n")
    _, diags = validate_file(p)
    (err,) = [d for d in diags if d.severity == "error"]
    assert err.pos.file.endswith("scenec.toml") and err.pos.line == 3, err
    assert "takes `id`, `config`, `vae` and `lora`" in err.message, err.message


def test_comfyuis_embedding_name_is_the_scenes_embedding(tmp_path):
    """Under `prompt_syntax: comfy`, ComfyUI's `embedding:NAME` (its file's name, extension optional, weights
    around it) is the token of the scene's embedding with that file: the plan holds the token, no warning, the same
    latents as the scene written with the token; a name of no embedding of the scene stays text, warned."""
    from scenec.compiler import compile_scene
    from scenec.compiler.check import validate_file
    from scenec.runtime.families import load_backend
    from scenec.runtime.sampler import run_job

    files(tmp_path)
    text = """scenec: 1
model: {{id: tiny-sd, embeddings: [{{file: emb/bad.safetensors, token: badtok}}]}}
prompt_syntax: comfy
canvas: {{width: 64, height: 64}}
sampler: {{steps: 2, seed: 1}}
background: {{prompt: "a meadow", negative: "{negative}"}}
"""
    plans = {}
    for name, negative in (("comfy", "(embedding:bad:1.2), embedding:bad.safetensors, embedding:other"),
                           ("token", "(badtok:1.2), badtok, embedding:other")):
        p = tmp_path / f"{name}.yaml"
        p.write_text(text.format(negative=negative))
        _, diags = validate_file(p)
        assert [d.message.split("`")[1] for d in diags if d.severity == "warning"] == ["embedding:other"], list(diags)
        plans[name] = compile_scene(p)
    assert plans["comfy"].prompts == plans["token"].prompts  # the plan holds the token
    be = load_backend("tiny-sd", device="cpu", dtype="fp32")
    a, b = (run_job(be, plans[k], plans[k].jobs[0], decode=False).latents for k in ("comfy", "token"))
    assert torch.equal(a, b)

"""Text options of a plan's model on the CLIP families (SD, SDXL): textual-inversion embeddings and CLIP skip.

Textual inversion (Gal et al. 2022, arXiv 2208.01618) adds a learned word to a tokenizer and its text encoder's
input embeddings. :class:`TextOptions` loads a plan's embeddings (``model.embeddings``,
``spec.plan_text.Embedding``) through diffusers' own ``TextualInversionLoaderMixin.load_textual_inversion`` (the
file read here with safetensors; SDXL's ``clip_l``/``clip_g`` tensors each into its encoder, as diffusers' SDXL
example does), so a multi-vector embedding becomes ``token token_1 …`` in every prompt through the pipeline's
``maybe_convert_prompt``. A backend is reused across plans (a batch build): before it loads another plan's
embeddings it puts back the tokenizers and input-embedding modules it kept from before the first load, so a
plan without embeddings runs on exactly the model it was loaded as. While embeddings are loaded, an encoder whose
config has the legacy ``eos_token_id: 2`` (SDXL's ``text_encoder_2``) pools at the end token, not at the added word
(:func:`_pool_at_eos`).

CLIP skip follows the pipelines' ``encode_prompt``: :func:`hidden` picks the hidden state (SD:
``hidden_states[-(clip_skip + 1)]`` then the final layer norm; SDXL: ``hidden_states[-(clip_skip + 2)]``).
"""

from __future__ import annotations

import copy

import torch

from scenec.spec.errors import PlanError, Unsupported

PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


class TextOptions:
    """The embeddings loaded into one pipeline, and what to put back to unload them."""

    def __init__(self, pipe, n_encoders: int):
        self.pipe = pipe
        self.pairs = PAIRS[:n_encoders]
        self.loaded: tuple = ()  # ((sha256, token), …) now in the tokenizers and encoders
        self.kept: dict[str, tuple] = {}  # tokenizer attribute → (pristine tokenizer, input embeddings, vocab size)
        self.eos: dict[str, int] = {}  # encoder attribute → the legacy eos_token_id (2) it had before a load

    def use(self, embeddings) -> tuple:
        """Make the pipeline hold exactly ``embeddings`` (a plan's ``model.embeddings``); their identity."""
        want = tuple((e.sha256, e.token) for e in embeddings)
        if want == self.loaded:
            return want
        self.restore()
        if want:
            self.loaded = want  # whatever part of them loads before a failure is put back by restore()
            try:
                self._load(embeddings)
            except BaseException:
                self.restore()
                raise
        return want

    def restore(self) -> None:
        """Put back the tokenizers and input embeddings kept before the first load (nothing loaded: no-op)."""
        if not self.loaded:
            return
        for tok_name, te_name in self.pairs:
            if tok_name not in self.kept:  # refused before it was touched (--offload)
                continue
            tok, emb, vocab = self.kept[tok_name]
            te = getattr(self.pipe, te_name)
            te.set_input_embeddings(emb)
            te.config.vocab_size = vocab
            setattr(self.pipe, tok_name, copy.deepcopy(tok))
            if te_name in self.eos:
                getattr(te, "text_model", te).eos_token_id = self.eos.pop(te_name)
        self.loaded = ()

    def _load(self, embeddings) -> None:
        from safetensors.torch import load_file

        pipe = self.pipe
        for tok_name, te_name in self.pairs:
            te = getattr(pipe, te_name)
            if getattr(te, "_hf_hook", None) is not None:
                raise Unsupported("textual-inversion embeddings with --offload are not supported yet: build without "
                                  "--offload")
            if tok_name not in self.kept:
                if tok_name == "tokenizer_2" and pipe.tokenizer_2 is pipe.tokenizer:  # tiny-sdxl shares one
                    pipe.tokenizer_2 = copy.deepcopy(pipe.tokenizer)
                tok = getattr(pipe, tok_name)
                self.kept[tok_name] = (copy.deepcopy(tok), te.get_input_embeddings(), te.config.vocab_size)
            _pool_at_eos(te, getattr(pipe, tok_name), te_name, self.eos)
        try:
            for e in embeddings:
                try:
                    tensors = load_file(e.path)  # safetensors only
                except Exception as err:  # noqa: BLE001 - gone, unreadable or no longer safetensors since compile
                    raise PlanError(f"embedding `{e.name}` cannot be read ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
                for key, (tok_name, te_name) in zip(e.keys, self.pairs):
                    if key not in tensors:
                        raise PlanError(f"embedding `{e.name}` has no tensor `{key}` (the file changed since the "
                                        "plan was compiled?)")
                    # the rows diffusers would add, made here without transformers' mean resizing (a covariance
                    # over the whole vocabulary, for rows that are overwritten next): its resize is then a no-op
                    te, n = getattr(pipe, te_name), len(getattr(pipe, tok_name))
                    te.resize_token_embeddings(n + e.vectors, mean_resizing=False)
                    pipe.load_textual_inversion({e.token: tensors[key]}, token=e.token,
                                                tokenizer=getattr(pipe, tok_name), text_encoder=getattr(pipe, te_name))
        except ValueError as err:  # diffusers': a token the vocabulary has, a width that does not fit (use() unloads)
            first = str(err).splitlines()[0].split(". Please")[0]
            raise PlanError(f"embedding {', '.join(f'`{e.name}`' for e in embeddings)}: {first}") from None
        for _, te_name in self.pairs:
            getattr(pipe, te_name).get_input_embeddings().requires_grad_(False)


def _pool_at_eos(te, tok, te_name: str, kept: dict) -> None:
    """Pool at the end token while embeddings are loaded. A CLIP config with the legacy ``eos_token_id: 2`` (SD 1.x,
    SDXL's ``text_encoder_2``: before transformers#24773) makes ``CLIPTextModel`` pool at the largest token id, the
    end token's only while no word is added: an embedding's added token outranks it, and SDXL's pooled vector would
    be that token's hidden state (diffusers#10754; A1111 and ComfyUI pool at the end token). With the tokenizer's own
    end id it pools at the first end token: for in-vocabulary ids the same position as the argmax."""
    core = getattr(te, "text_model", te)
    end = getattr(tok, "eos_token_id", None)
    if getattr(core, "eos_token_id", None) == 2 and end not in (None, 2) and te_name not in kept:
        kept[te_name] = core.eos_token_id
        core.eos_token_id = end


def hidden(encoder, ids: torch.Tensor, clip_skip: int | None, sdxl: bool) -> torch.Tensor:
    """The text keys of token ``ids`` as the pipelines' ``encode_prompt`` reads them: SD the last hidden state, or
    with ``clip_skip`` ``hidden_states[-(clip_skip + 1)]`` through the final layer norm
    (``StableDiffusionPipeline.encode_prompt``); SDXL ``hidden_states[-(clip_skip + 2)]``, the penultimate
    without it (``StableDiffusionXLPipeline.encode_prompt``)."""
    if sdxl:
        return encoder(ids, output_hidden_states=True).hidden_states[-((clip_skip or 0) + 2)]
    if clip_skip is None:
        return encoder(ids)[0]
    out = encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    # transformers 5's CLIPTextModel holds its layers itself (4.x: under `text_model`, where diffusers looks)
    return getattr(encoder, "text_model", encoder).final_layer_norm(out)


def encode_skipped(pipe, text: str, clip_skip: int, device) -> torch.Tensor:
    """``StableDiffusionPipeline.encode_prompt(text, …, clip_skip=clip_skip)``'s embeddings, computed here: that
    method reads ``text_encoder.text_model``, which transformers 5's ``CLIPTextModel`` no longer has."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    inputs = tok(pipe.maybe_convert_prompt(text, tok), padding="max_length", max_length=tok.model_max_length,
                 truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.to(device) if getattr(te.config, "use_attention_mask", False) else None
    out = te(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
    out = getattr(te, "text_model", te).final_layer_norm(out[-(clip_skip + 1)])
    return out.to(dtype=te.dtype, device=device)


def check_layers(encoder, clip_skip: int | None, sdxl: bool) -> None:
    """A one-line error when ``clip_skip`` reaches past the encoder's layers (the compiler checks the models it
    knows; this catches the others)."""
    if clip_skip is None:
        return
    layers = encoder.config.num_hidden_layers
    most = layers - 1 if sdxl else layers
    if clip_skip > most:
        raise PlanError(f"clip_skip {clip_skip} is out of range for this model's {layers}-layer text encoder "
                        f"(0 – {most})")

"""Weighted prompts and long CLIP prompts (``prompt_syntax: a1111 | comfy``; the parse: spec/prompt_syntax.py).

**Chunks.** CLIP reads 77 tokens. Both UIs encode a longer prompt in chunks of 75 tokens, each between its own
start and end tokens and padded to 77, and concatenate the chunks' hidden states along the sequence (so the
UNet's cross-attention sees 77·k keys). A1111 (``modules/sd_hijack_clip.py``) fills a chunk token by token and,
when it is full, moves the tokens after its last comma (if that comma is at most 20 tokens back) to the next
chunk, and starts a new chunk for a textual-inversion embedding whose vectors do not fit; ``BREAK`` ends a chunk
early. ComfyUI (``comfy/sd1_clip.py``) splits the text into words and moves a word
of fewer than 8 tokens that does not fit whole to the next chunk (longer words are cut). Padding is the
tokenizer's own pad token after the end token, as diffusers pads (SD 1.x: the end token; SD 2.x, SDXL's second
encoder: ``!``), which is also what both UIs feed those encoders.

**Weights** act on the encoder's output, token by token, per chunk:

- a1111 (``EmphasisOriginal``): z ← z · w, then z ← z · mean(z_before) / mean(z) — the chunk's mean restored
  (not where the mean is ~0 or changes sign: there A1111's ratio explodes, and the weights act unscaled);
- comfy (``ClipTokenWeightEncoder.encode_token_weights``): z ← z_empty + (z − z_empty) · w for the tokens whose
  weight is not 1, z_empty the encoding of the empty prompt at the same positions.

A prompt that parses to plain text of at most one chunk is encoded exactly as the pipeline encodes it (the
caller's plain path, on the text with the syntax taken out), so a scene without weights makes the images it
made before. Pooled vectors (SDXL's second encoder, Flux's CLIP) come from the first chunk, unweighted, as both
UIs take them. On Flux the weights act on T5's tokens the same way (one sequence, no chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scenec.spec.errors import Unsupported
from scenec.spec.prompt_syntax import Parsed, Piece, parse

from .textual_inversion import hidden

A1111_COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
MEAN_FLOOR = 1e-3  # a1111: a chunk mean below this fraction of the mean |z| is not restored (emphasize)
COMFY_LONG_WORD = 8  # ComfyUI's max_word_length: a word of this many tokens may be split across chunks


@dataclass
class Chunk:
    ids: list[int]
    weights: list[float]


def _units(tok, ids: list[int]) -> list[list[int]]:
    """``ids`` in A1111's units: a token, or a multi-vector textual-inversion embedding's tokens (diffusers writes
    the word ``w`` as ``w w_1 w_2 …``, added tokens), which A1111 keeps in one chunk (``tokenize_line``)."""
    added = getattr(tok, "added_tokens_encoder", None) or {}
    if not added:
        return [[t] for t in ids]
    names = tok.convert_ids_to_tokens(ids)

    def blank(name: str) -> bool:  # a byte-level BPE's space between added tokens (CLIP's BPE has none)
        return not tok.convert_tokens_to_string([name]).strip()

    out, i = [], 0
    while i < len(ids):
        j = i + 1
        if names[i] in added:
            k = 1
            while True:
                m = j
                while m < len(ids) and blank(names[m]):
                    m += 1
                if m < len(ids) and names[m] == f"{names[i]}_{k}":
                    j, k = m + 1, k + 1
                else:
                    break
        out.append(ids[i:j])
        i = j
    return out


def clip_chunks(tok, pieces: list[Piece], syntax: str, convert=lambda t: t, pad: bool = True) -> list[Chunk]:
    """The chunks of one prompt for a CLIP tokenizer: ``[start, ≤75 tokens, end]`` (+ padding to 77 with ``pad``)."""
    room = tok.model_max_length - 2
    bos, eos = tok.bos_token_id, tok.eos_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos
    comma = tok("a,", add_special_tokens=False).input_ids[-1]  # CLIP's ",</w>", which A1111 looks up
    chunks: list[Chunk] = []
    cur: list[int] = []
    cw: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal cur, cw, last_comma
        fill = room - len(cur) if pad else 0
        chunks.append(Chunk([bos, *cur, eos] + [pad_id] * fill, [1.0, *cw, 1.0] + [1.0] * fill))
        cur, cw, last_comma = [], [], -1

    def ids_of(text: str) -> list[int]:  # CLIP drops the spaces at a piece's ends; a byte-level BPE would not
        text = text.strip()
        return tok(convert(text), add_special_tokens=False).input_ids if text else []

    for p in pieces:
        if p.brk:  # A1111's BREAK: this chunk ends here, padded
            close()
            continue
        if syntax == "comfy":  # word by word; a short word is never split across chunks
            for word in (w for w in p.text.replace("\n", " ").split(" ") if w):
                group = ids_of(word)
                large = len(group) >= COMFY_LONG_WORD
                while group:
                    if len(cur) + len(group) > room:
                        if large:
                            take = room - len(cur)
                            cur += group[:take]
                            cw += [p.weight] * take
                            group = group[take:]
                        close()
                    else:
                        cur += group
                        cw += [p.weight] * len(group)
                        group = []
            continue
        for unit in _units(tok, ids_of(p.text)):
            if unit == [comma]:
                last_comma = len(cur)
            elif len(cur) == room and last_comma != -1 and len(cur) - last_comma <= A1111_COMMA_BACKTRACK:
                keep = last_comma + 1  # the words after the last comma go to the next chunk
                moved, moved_w = cur[keep:], cw[keep:]
                cur, cw = cur[:keep], cw[:keep]
                close()
                cur, cw = moved, moved_w
            if len(cur) == room:
                close()
            if len(cur) + len(unit) > room:  # A1111 never splits an embedding's vectors across chunks
                close()
            cur += unit
            cw += [p.weight] * len(unit)
    if cur or not chunks or syntax == "comfy":
        close()
    return chunks


def emphasize(z: torch.Tensor, weights: list[float], syntax: str, empty: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk's hidden states ``[1, L, D]`` with its tokens' weights applied (see the module docstring)."""
    w = torch.tensor(weights, dtype=torch.float32, device=z.device)
    if bool((w == 1).all()):
        return z
    zf = z.float()
    if syntax == "a1111":
        before = zf.mean()
        zf = zf * w[None, :, None]
        after = zf.mean()
        # A1111 divides by the new mean unguarded; where the mean is ~0 against the values (a layer norm without
        # bias, as in random test models) that ratio explodes, so the restore is skipped there
        if bool(before * after > 0) and bool(before.abs() > MEAN_FLOOR * zf.abs().mean()):
            zf = zf * (before / after)
    else:
        e = empty[:, : z.shape[1]].float()
        zf = torch.where((w != 1)[None, :, None], (zf - e) * w[None, :, None] + e, zf)
    return zf.to(z.dtype)


def needs_weights(parsed: Parsed, chunks: list[Chunk]) -> bool:
    """Whether a prompt must take the weighted path: a weight, a BREAK, or more than one chunk."""
    return parsed.weighted or len(chunks) > 1


@dataclass
class ClipText:
    seq: torch.Tensor  # [1, 77·k (or the real tokens), D]: the chunks' hidden states (both encoders' on SDXL)
    pooled: torch.Tensor | None  # SDXL: the second encoder's projection of the first chunk


def encode_clip(pipe, pairs, text: str, syntax: str, clip_skip: int | None, *, sdxl: bool, pad: bool,
                dtype, device) -> ClipText | str:
    """``text`` through the CLIP encoders of ``pairs`` (tokenizer/encoder attribute names) under ``syntax``:
    the weighted chunks, or the plain text (syntax taken out) when nothing needs them."""
    parsed = parse(text, syntax)
    per = []
    for tok_name, te_name in pairs:
        tok = getattr(pipe, tok_name)
        per.append(clip_chunks(tok, parsed.pieces, syntax, lambda t, tok=tok: pipe.maybe_convert_prompt(t, tok), pad))
    if not needs_weights(parsed, per[0]):
        return parsed.text
    if len({tuple(len(c.ids) for c in chunks) for chunks in per}) > 1:
        raise Unsupported(f"the two text encoders split {parsed.text!r} into different chunks")
    seqs, pooled = [], None
    for (tok_name, te_name), chunks in zip(pairs, per):
        te = getattr(pipe, te_name)
        tok = getattr(pipe, tok_name)
        empty = None
        if syntax == "comfy":
            room = tok.model_max_length - 2
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids = torch.tensor([[tok.bos_token_id, tok.eos_token_id] + [pad_id] * room], device=te.device)
            empty = hidden(te, ids, clip_skip, sdxl)
        outs = []
        for i, c in enumerate(chunks):
            ids = torch.tensor([c.ids], device=te.device)
            if sdxl and te_name == "text_encoder_2" and i == 0:
                out = te(ids, output_hidden_states=True)
                pooled = out[0]
                z = out.hidden_states[-((clip_skip or 0) + 2)]
            else:
                z = hidden(te, ids, clip_skip, sdxl)
            outs.append(emphasize(z, c.weights, syntax, empty))
        seqs.append(torch.cat(outs, 1))
    seq = torch.cat(seqs, -1).to(dtype=dtype, device=device)
    return ClipText(seq, None if pooled is None else pooled.to(dtype=dtype, device=device))


def encode_t5(pipe, text: str, syntax: str, max_sequence_length: int, pad_to: int | None, *, dtype,
              device) -> torch.Tensor | str:
    """Flux's T5 sequence of ``text`` with its weights: the pieces' tokens back to back, cut to
    ``max_sequence_length`` with the end token, padded to ``pad_to`` (``None``: no padding); or the plain text
    when nothing is weighted."""
    parsed = parse(text, syntax)
    if not parsed.weighted:
        return parsed.text
    tok, te = pipe.tokenizer_2, pipe.text_encoder_2
    ids: list[int] = []
    ws: list[float] = []
    for p in parsed.pieces:
        if p.text.strip() and not p.brk:
            t = tok(p.text.strip(), add_special_tokens=False).input_ids
            ids += t
            ws += [p.weight] * len(t)
    ids, ws = ids[: max_sequence_length - 1] + [tok.eos_token_id], ws[: max_sequence_length - 1] + [1.0]
    length = max(len(ids), min(pad_to, max_sequence_length)) if pad_to else len(ids)
    ids += [tok.pad_token_id] * (length - len(ids))
    ws += [1.0] * (length - len(ws))
    z = te(torch.tensor([ids], device=te.device), output_hidden_states=False)[0]
    empty = None
    if syntax == "comfy":
        blank = [tok.eos_token_id] + [tok.pad_token_id] * (length - 1)
        empty = te(torch.tensor([blank], device=te.device), output_hidden_states=False)[0]
    return emphasize(z, ws, syntax, empty).to(dtype=dtype, device=device)

"""The scene's parts (canvas, sampler, background, reference, LoRA, visual, output, attention) of scene
language v1, re-exported by ``scenec.spec.models``; descriptions and examples as in models_shapes.py."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .models_shapes import Node, Shape, Unit

MAX_CANVAS = 8192

Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Canvas(Node):
    width: Annotated[int, Field(ge=16, le=MAX_CANVAS)] = Field(
        description="image width in pixels, a multiple of the model family's canvas multiple (16 Flux, 8 SD)",
        examples=[1024])
    height: Annotated[int, Field(ge=16, le=MAX_CANVAS)] = Field(
        description="image height in pixels, a multiple of the model family's canvas multiple (16 Flux, 8 SD)",
        examples=[768])
    tiling: Literal["none", "x", "y", "both"] = Field(
        "none", description="a seamless texture: the image wraps around, its left edge continuing its right (`x`), "
        "its top its bottom (`y`) or both (A1111's \"Tiling\"): the UNet's and the VAE decoder's convolutions pad "
        "circularly. SD, SDXL", examples=["both"])


class FreeU(Node):
    """FreeU (Si et al. 2023, arXiv 2309.11497): the UNet decoder's backbone and skip features rescaled, as
    diffusers' ``unet.enable_freeu(s1, s2, b1, b2)``."""

    s1: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        description="scale of the first decoder stage's skip features' low frequencies (SD 1.5: 0.9, SDXL: 0.6)",
        examples=[0.9])
    s2: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        description="the same for the second stage (SD 1.5: 0.2, SDXL: 0.4)", examples=[0.2])
    b1: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        description="scale of the first decoder stage's backbone features (SD 1.5: 1.5, SDXL: 1.1)", examples=[1.5])
    b2: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        description="the same for the second stage (SD 1.5: 1.6, SDXL: 1.2)", examples=[1.6])


class Sampler(Node):
    steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="number of sampling steps N; default: the model's", examples=[28])
    guidance: Annotated[float, Field(ge=0.0)] | None = Field(
        None, description="Flux: the guidance embedding; CFG models: the CFG scale. Default: the model's",
        examples=[3.5])
    true_cfg: Annotated[float, Field(ge=1.0)] = Field(
        1.0, description="> 1 runs a second, negative pass and mixes the two (true classifier-free guidance); "
        "only then do negative prompts take effect on Flux", examples=[1.0])
    seed: Seed | Annotated[list[Seed], Field(min_length=1)] = Field(
        0, description="an integer, or a non-empty list: one image per seed", examples=[[1, 2]])
    solver: Literal["flow-euler", "ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-karras",
                    "euler-a", "unipc", "unipc-karras", "dpm++2m-sde", "dpm++2m-sde-karras"] | None = Field(
        None, description="the update rule: Flux `flow-euler`; SD/SDXL `ddim` (every method), DPM-Solver++(2M) "
        "on the model's timestep spacing (`dpm++2m`) or Karras' (`dpm++2m-karras`), its SDE variant with fresh "
        "noise each step (`dpm++2m-sde`, `dpm++2m-sde-karras`: A1111's \"DPM++ 2M SDE\"), Euler on either "
        "(`euler`, `euler-karras`), ancestral Euler (`euler-a`, A1111's \"Euler a\") or UniPC (`unipc`, "
        "`unipc-karras`); all but `ddim` not with `reference`. Default: the family's (flow-euler, ddim)",
        examples=["euler-a"])
    cfg_rescale: Unit = Field(
        0.0, description="SD/SDXL: rescale the CFG output towards the positive prediction's standard deviation by "
        "this share (Lin et al. 2023, arXiv 2305.08891, Eq. 15-16), as diffusers' `guidance_rescale` does, on what "
        "the model predicts (ComfyUI's RescaleCFG rescales v: equivalent on v-prediction models); 0 = off",
        examples=[0.7])
    freeu: FreeU | None = Field(
        None, description="SD/SDXL: FreeU's four factors, as diffusers' `unet.enable_freeu(s1, s2, b1, b2)`; "
        "default: off", examples=[{"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6}])


class Background(Node):
    prompt: str = Field("", description="the global prompt: it acts on every pixel",
                        examples=["a vibrant meadow under a clear blue sky"])
    negative: str = Field("", description="negative prompt of the background, and of every entity or variant "
                          "without its own `negative`", examples=["blurry, low quality"])
    image: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="start from this image (inpainting): only entity regions change",
        examples=["refs/meadow.png"])
    fit: Literal["stretch", "contain", "cover"] = Field(
        "stretch", description="how `image` fills `box`: `stretch` (its aspect ratio not kept), `contain` (whole, "
        "centred; the rest of the canvas is painted: outpainting) or `cover` (cropped to fill)", examples=["contain"])
    box: Annotated[list[Unit], Field(min_length=4, max_length=4)] | None = Field(
        None, description="where `image` goes, `[x0, y0, x1, y1]` as fractions of the canvas; the canvas outside "
        "it is painted by the model, as an entity's region is (outpainting); default: the whole canvas",
        examples=[[0.0, 0.0, 0.5, 1.0]])
    overlay: bool = Field(
        False, description="inpainting and outpainting: paste the image's own pixels back over everything the model "
        "did not paint (the regions' feathered edges blended), as A1111 does, instead of the image through the VAE "
        "(diffusers' and ComfyUI's default)", examples=[True])
    feather: Annotated[float, Field(ge=0.0, le=0.5)] = Field(
        0.03, description="outpainting: how far into the image the painted part blends, as a fraction of min(width, "
        "height) (ComfyUI's Pad Image for Outpainting `feathering`, A1111's mask blur); not on the canvas's own edges",
        examples=[0.05])
    strength: Unit | None = Field(
        None, description="img2img: repaint the whole `image`, starting from it noised to this level (1 = pure "
        "noise, the image ignored; 0 = unchanged); default: none (only entity regions change)", examples=[0.6])
    repaint: Literal["all", "regions"] | None = Field(
        None, description="with `strength`: what it repaints: `all` (img2img, the default) or only the entities' "
        "regions, each starting from the image noised to `strength`, the rest kept exactly (A1111's inpainting with "
        "a denoising strength, masked content \"original\")", examples=["regions"])


class Hires(Node):
    """A second, larger pass (A1111's "Hires. fix"; ComfyUI's upscale → KSampler at a lower denoise): each image is
    made at the canvas, upscaled and repainted at the larger size by img2img with the scene's prompts and regions."""

    scale: Annotated[float, Field(gt=1.0, le=4.0)] = Field(
        2.0, description="the second pass's size: the canvas times this, each side rounded down to the family's "
        "canvas multiple (A1111's \"Upscale by\")", examples=[1.5])
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.5, description="how much the second pass repaints (A1111's \"Denoising strength\", ComfyUI's `denoise`): "
        "it starts from the upscaled image noised to this level", examples=[0.4])
    steps: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="steps the second pass runs, exactly, as in A1111 and ComfyUI (on a schedule of "
        "steps / strength levels); default: the sampler's steps", examples=[15])
    upscaler: Literal["lanczos", "bicubic", "bilinear", "nearest", "latent", "latent-bicubic", "latent-nearest",
                      "latent-nearest-exact"] = Field(
        "lanczos", description="how the first pass is enlarged: the image with a Pillow filter (`lanczos`, `bicubic`, "
        "`bilinear`, `nearest`: A1111's \"Lanczos\", \"Nearest\"), or its latent, not decoded (`latent` = "
        "bilinear, `latent-bicubic`, `latent-nearest`, `latent-nearest-exact`: A1111's \"Latent\" upscalers, "
        "ComfyUI's Upscale Latent; they want a `strength` of 0.5 or more)", examples=["latent"])


class Modulation(Node):
    """SOW attention modulation (scene option; see docs/language.md and docs/references.md)."""

    suppress: Unit = Field(1.0, description="how far condition region → outside scores move towards their row's "
                           "minimum (min–max scaled, DenseDiffusion-style)", examples=[1.0])
    enhance: Unit = Field(1.0, description="how far related region → condition region scores move towards their "
                          "row's maximum", examples=[1.0])
    decay: Annotated[float, Field(ge=0.0, le=1.0)] = Field(0.8, description="multiplier per cycle", examples=[0.8])
    distance: Annotated[float, Field(ge=0.0)] = Field(
        1.0, description="fall-off with distance from the region's centre", examples=[1.0])
    threshold: Unit = Field(0.5, description="the share of attention at which modulation has faded to nothing: it "
                            "scales with how far below it the attention share reaching the condition is",
                            examples=[0.5])


class Reference(Node):
    image: Annotated[str, Field(min_length=1)] = Field(description="the reference image", examples=["refs/face.png"])
    fit: Literal["contain", "cover", "stretch"] = Field(
        "contain", description="how it is placed in the region's bounding box: `contain` (fit inside, aspect kept), "
        "`cover` (fill and crop) or `stretch`", examples=["cover"])
    window: Annotated[list[Unit], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.7, 0.5], description="`[start, end]` noise levels (1 = pure noise: σ on flow "
        "models, t/1000 on DDPM models; start > end) between which the cycles run", examples=[[0.7, 0.5]])
    cycles: Annotated[int, Field(ge=0, le=100)] = Field(10, description="how many times the window is sampled",
                                                        examples=[10])
    init: Literal["seed", "noise"] = Field(
        "seed", description="`seed`: the cycles start from the inverted seed canvas (the reference on grey); "
        "`noise`: sample from noise down to the window first (scene option)", examples=["noise"])
    preserve: Unit | None = Field(0.4, description="noise level of one last replacement of the region; null = none",
                                  examples=[0.4])
    eta: Unit = Field(1.0, description="stochasticity of the steps inside the cycles (COW: 1; scene option)",
                      examples=[1.0])
    eta_after: Unit = Field(0.1, description="stochasticity of the steps after the cycles (COW: 0.1; scene option)",
                            examples=[0.1])
    related: Shape | None = Field(None, description="the guiding region (a shape, never feathered) whose attention "
                                  "is drawn towards the reference", examples=[{"box": [0.35, 0.45, 0.65, 1.0]}])
    modulation: Modulation | Literal[False] = Field(
        default_factory=Modulation,
        description="SOW attention modulation during the cycles; `false` turns it off (scene option)",
        examples=[{"suppress": 1.0, "enhance": 0.8}, False])


class Lora(Node):
    """A LoRA (low-rank adapter): a safetensors file in the project, or a file of a hub repository.

    Formats: diffusers/peft, kohya, xlabs and DiffSynth-Studio (EliGen's own); docs/models.md, LoRAs."""

    file: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a `.safetensors` LoRA, relative to the file that names it, inside the project root; "
        "exactly one of `file` and `repo`", examples=["loras/watercolor.safetensors"])
    repo: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a hub repository (`org/name`) holding the LoRA, read from the local Hugging Face cache "
        "(`hf download REPO FILE` first; never downloaded by scenec)", examples=["someone/film-grain-lora"])
    weight_name: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="the .safetensors file in `repo`; default `pytorch_lora_weights.safetensors`",
        examples=["grain.safetensors"])
    scale: Annotated[float, Field(ge=-16.0, le=16.0)] = Field(
        1.0, description="the delta's multiplier (times the file's alpha/rank); 0 = no LoRA, exactly", examples=[0.8])


class Embedding(Node):
    """A textual-inversion embedding (Gal et al. 2022, arXiv 2208.01618): new words for the text encoders, as
    diffusers' ``load_textual_inversion`` and A1111 load them (docs/models.md, Embeddings). SD and SDXL."""

    file: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a `.safetensors` embedding, relative to the file that names it, inside the project "
        "root: one tensor `[vectors, width]` (SD), or `clip_l` and `clip_g` (SDXL); exactly one of `file` and "
        "`repo`", examples=["embeddings/badhands.safetensors"])
    repo: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a hub repository (`org/name`) holding it, read from the local Hugging Face cache "
        "(`hf download REPO FILE` first; never downloaded by scenec)", examples=["someone/negative-embeddings"])
    weight_name: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="the .safetensors file in `repo`; default `learned_embeds.safetensors` (diffusers')",
        examples=["badhands.safetensors"])
    token: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\S+$")] | None = Field(
        None, description="the word prompts use for it (no spaces); a multi-vector embedding becomes that many "
        "tokens wherever the word appears; default: the file's stem, as A1111 names it", examples=["badhands"])


class ModelSpec(Node):
    """A model with its LoRAs and text options: ``model: {id: sd15, lora: [...], embeddings: [...], clip_skip: 1}``.

    Embeddings and CLIP skip belong to the model, beside its LoRAs, because they change its text encoders for
    every prompt of the scene (the background's, the entities', the negatives) and only fit the encoders they
    were trained for: ``--model`` replaces them with the model."""

    id: Annotated[str, Field(min_length=1)] = Field(
        description="a built-in alias, a model id, a local diffusers directory, or a single-file `.safetensors` "
        "checkpoint of SD 1.x, SD 2.x or SDXL base (A1111's and ComfyUI's, relative to the scene's file)",
        examples=["flux-dev"])
    config: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a single-file checkpoint's diffusers configs (no weights): a local diffusers directory "
        "of the same architecture, a hub id in the local Hugging Face cache, or an alias. Default: the repository "
        "diffusers picks for the file's type (SD 1.x: stable-diffusion-v1-5/stable-diffusion-v1-5). Only with a "
        "`.safetensors` `id`", examples=["sd15"])
    vae: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a VAE replacing the model's (A1111's \"SD VAE\"): a local diffusers AutoencoderKL "
        "directory, a hub id in the local Hugging Face cache, or a single `.safetensors` VAE file, relative to the "
        "scene's file", examples=["madebyollin/sdxl-vae-fp16-fix"])
    lora: list[Lora] = Field(default_factory=list, description="LoRAs applied to the whole image, in order",
                             examples=[[{"file": "loras/watercolor.safetensors", "scale": 0.8}]])
    embeddings: Annotated[list[Embedding], Field(max_length=64)] = Field(
        default_factory=list, description="textual-inversion embeddings whose tokens every prompt may use (SD, "
        "SDXL)", examples=[[{"file": "embeddings/badhands.safetensors", "token": "badhands"}]])
    clip_skip: Annotated[int, Field(ge=0, le=64)] | None = Field(
        None, description="CLIP skip as diffusers' `clip_skip`: the text is read this many layers before the "
        "last (SD: through the final layer norm; SDXL: before the penultimate). On SD, A1111's \"Clip skip N\" is "
        "N − 1 here; on SDXL, ComfyUI's \"CLIP Set Last Layer\" −N is N − 2 and A1111's clip skip is 0; 0 = none. "
        "SD, SDXL; at most the text encoder's layers (SDXL: minus 1)", examples=[1])


class VisualRefine(Node):
    """Test-time refinement of a visual prompt's value tokens (arXiv 2501.01424, §3.4; docs/visual-prompts.md)."""

    steps: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="Adam steps on the value tokens at each sampler step in `at` (each: a forward and backward "
        "pass of the model, a VAE decode and the image encoder)", examples=[3])
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = Field(0.01, description="Adam's learning rate", examples=[0.02])
    at: Annotated[list[Unit], Field(min_length=1, max_length=1000)] = Field(
        description="noise levels (as in `window`) naming the sampler steps before which the tokens are refined: "
        "each names the step whose start is nearest, which must lie inside `window`", examples=[[0.8, 0.6]])


class Visual(Node):
    """An object-level visual prompt (arXiv 2501.01424; docs/visual-prompts.md): the entity's look from an
    image, as extra key/value tokens seen only by the image tokens of the entity's region."""

    image: Annotated[str, Field(min_length=1)] = Field(
        description="the object's image (under the project root; in the plan: transparency on gray 128, kv-mixed "
                    "padded to a gray square, at most 512 px a side)",
        examples=["refs/fox.png"])
    mode: Literal["kv-mixed", "ip-adapter"] = Field(
        "kv-mixed", description="kv-mixed: keys from a coarse adapter, values from a fine one (the paper); "
        "ip-adapter: keys and values from one IP-Adapter (h94's format on SD/SDXL, XLabs' on Flux)",
        examples=["ip-adapter"])
    adapter: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="adapter weights (.safetensors, under the project root) of the mode's kind; kv-mixed: "
        "required except on `tiny`, `tiny-sd`, `tiny-sdxl` (a deterministic random adapter); ip-adapter: always, "
        "with its `image_encoder/` beside it", examples=["adapters/fox.safetensors"])
    scale: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        1.0, description="weight of the visual tokens, 0 – 10; 0 = the scene without it", examples=[0.8])
    window: Annotated[list[Unit], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1.0, 0.0], description="noise levels (1 = pure noise, as in `reference.window`) "
        "between which the visual tokens act: the sampler steps from the one whose starting level is nearest "
        "`first` up to (not including) the one nearest `second`",
        examples=[[1.0, 0.3]])
    refine: VisualRefine | None = Field(
        None, description="refine the value tokens at chosen steps so the region's predicted image matches the "
        "visual prompt's (kv-mixed only); default: none", examples=[{"steps": 3, "lr": 0.01, "at": [0.8]}])


class Control(Node):
    """A ControlNet condition on the whole image (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image
    Diffusion Models", arXiv 2302.05543; docs/controlnet.md): residuals from a ControlNet added to the UNet's."""

    image: Annotated[str, Field(min_length=1)] = Field(
        description="the control image as the ControlNet expects it (edges, depth, pose…), under the project "
        "root; scaled to the canvas", examples=["refs/edges.png"])
    model: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="a diffusers ControlNet for the scene's model (`ControlNetModel` on SD/SDXL, "
        "`FluxControlNetModel` on Flux): a hub id (downloaded beforehand) or a local directory; required except on "
        "`tiny-sd`, `tiny-sdxl`, `tiny` (a deterministic random one)",
        examples=["lllyasviel/control_v11p_sd15_canny"])
    mode: Annotated[int, Field(ge=0)] | None = Field(
        None, description="a Flux Union ControlNet's control type (diffusers' `control_mode`, e.g. 0 canny, 2 depth "
        "on InstantX's Union; its model card lists them); required by a Union ControlNet, refused by others",
        examples=[0])
    scale: Annotated[float, Field(ge=0.0, le=10.0)] = Field(
        1.0, description="weight of its residuals (diffusers' `controlnet_conditioning_scale`); 0 = the scene "
        "without it", examples=[0.8])
    window: Annotated[list[Unit], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [1.0, 0.0], description="noise levels (1 = pure noise) between which it acts: "
        "the sampler steps from the one whose starting level is nearest `first` up to (not including) the one "
        "nearest `second`", examples=[[1.0, 0.4]])
    region: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="an entity's id: the control acts only inside that entity's region (its residuals masked "
        "there, as sd-webui-controlnet's \"effective region mask\"), and not in images without the entity; "
        "default: the whole image", examples=["fox"])


class Output(Node):
    dir: Annotated[str, Field(min_length=1)] = Field(
        "out", description="output directory, relative to the scene file (`scenec build -o DIR` overrides it)",
        examples=["out"])
    name: Annotated[str, Field(min_length=1)] = Field(
        "{scene}-{group}-{variant}-{seed}", description="each image's file name without extension (images are "
        "PNG), with placeholders `{scene}`, `{group}`, `{variant}`, `{seed}`, `{index}` and matrix keys",
        examples=["{scene}-{style}-{seed}"])


class Attention(Node):
    image_self: Literal["open", "restricted"] = Field(
        "open", description="image ↔ image attention: `open` lets all image tokens see each other (EliGen); "
        "`restricted` only tokens sharing a region, and background tokens (outside every region) each other "
        "(InstantX, InvokeAI)", examples=["restricted"])
    blocks: Literal["all", "double", "single"] = Field(
        "all", description="which transformer blocks use the regional mask (Flux: double-stream, single-stream or "
        "both); the others attend plainly", examples=["double"])
    until: Unit = Field(1.0, description="regional masking only while sampling progress t < until; later steps attend "
                        "plainly (1 = always)",
                        examples=[0.75])
    pad_prompts: Annotated[int, Field(ge=1, le=512)] | None = Field(
        None, description="pad each entity prompt to this many tokens (512 matches EliGen exactly); null keeps each "
        "at its real length", examples=[128])

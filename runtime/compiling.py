"""Per-block ``torch.compile`` of a denoiser (``scenec build --compile``): regional compilation.

Only the repeated blocks are compiled (diffusers' ``compile_repeated_blocks``: Flux's double and single
blocks, a UNet's transformer blocks), so compiling costs one block's trace, not the whole model's. A
compiled block specialises on shapes: the text length (bucketed on the FlexAttention path,
``runtime/layout.text_bucket``), the batch and the image size. Recompiles are bounded by
:data:`RECOMPILE_LIMIT` per block (past it dynamo runs the block eagerly, which stays correct) and each
one is logged on stderr with its reason (``torch._logging``'s ``recompiles``).
"""

from __future__ import annotations

import torch

RECOMPILE_LIMIT = 16  # per compiled block: text buckets × batch sizes × image sizes a build meets


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser: its transformer (Flux) or UNet (SD, SDXL)."""
    m = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if m is None:
        raise TypeError(f"{type(pipe).__name__} has neither a transformer nor a UNet")
    return m


def compile_blocks(module: torch.nn.Module, backend: str = "inductor", log: bool = True) -> int:
    """Compile ``module``'s repeated blocks in place; returns how many were wrapped. ``backend``: dynamo's
    (``"eager"`` traces without generating code: the tests count recompiles with it on CPU)."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    else:  # torch < 2.6
        cfg.cache_size_limit = max(cfg.cache_size_limit, RECOMPILE_LIMIT)
    if log:
        torch._logging.set_logs(recompiles=True)
    from .kernels import flex_kernel

    flex_kernel()  # create the compiled kernel before tracing: made lazily inside a block it costs a recompile
    names = set(getattr(module, "_repeated_blocks", None) or ())
    n = 0
    for sub in module.modules():
        if type(sub).__name__ in names:
            sub.compile(backend=backend)
            n += 1
    if n == 0:
        raise TypeError(f"{type(module).__name__} declares no repeated blocks to compile")
    return n

"""Load one GPT2-family replica (our forward over the checkpoint's weights, and its tokenizer) onto one device.

Weights: safetensors when present (read straight onto the device); pickled `.bin` only through
`torch.load(weights_only=True)`. `trust_remote_code` is never enabled unless the caller asks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.replica import Replica
from ..errors import ModelLoadError
from .source import check_model_dir, localize

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


DTYPES = ("float32", "float16", "bfloat16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it, else float16 on GPU, float32 on CPU."""
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def read_weights(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A local checkpoint's floating-point tensors, cast to `dtype` on `device` one at a time (the peak is
    one tensor above the replica). safetensors are read straight onto the device; pickled `.bin` shards only
    through `torch.load(weights_only=True)`."""
    import torch

    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ModelLoadError(f"no weights (*.safetensors or pytorch_model*.bin) in {path}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(f, framework="pt", device=str(device)) as sf:
                for name in sf.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    t = sf.get_tensor(name)
                    if t.is_floating_point():
                        weights[name] = t.to(dtype)
        else:
            for name, t in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items():
                if t.is_floating_point():
                    weights[name] = t.to(device=device, dtype=dtype)
    return weights


def load_replica(
    source: str,
    *,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    storage_options: dict | None = None,
    expected_version: str | None = None,
) -> Replica:
    """Load the model (our GPT2 forward over the checkpoint's weights) and tokenizer onto `device`.

    The weights and the tokenizer are read directly, not through transformers, whose imports alone cost an
    actor seconds of start-up; only a trusted remote-code checkpoint goes through transformers' Auto classes.
    """
    from ..engine.gpt2 import GPT2
    from .tokenizer import GPT2TextTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = localize(source, cache_dir, storage_options, expected_version)
    config = check_model_dir(path, source, trust_remote_code)
    try:
        if trust_remote_code:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=True
            )
            model = GPT2.from_hf(hf.to(dev).requires_grad_(False))
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        else:
            model = GPT2(config, read_weights(path, dev, torch_dtype))
            tokenizer = GPT2TextTokenizer.from_dir(path)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load model from {source}: {type(e).__name__}: {e}") from e

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ModelLoadError(f"tokenizer of {source} has no EOS token; GPT2 models use <|endoftext|>")
    if tokenizer.pad_token_id is None:
        # GPT2 has no pad token. Padding uses EOS ids, but the engine always tracks real lengths (and passes
        # attention masks), so a real <|endoftext|> in a text is never taken for padding.
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s on %s as %s (context %d)", source, dev, torch_dtype, model.max_len)
    return Replica(model, tokenizer, dev, torch_dtype, int(model.max_len), int(eos_id), source)

"""Loading CheXzero checkpoints and running their encoders.

A CheXzero checkpoint is a ``torch.save``-d ``state_dict`` of OpenAI's CLIP architecture. open_clip
builds that architecture from the tensor shapes (so ViT-B/32 and tiny test checkpoints load the
same way) with QuickGELU; we then cast to float32 and load the state dict again, because
open_clip's builder rounds the weights to float16 on the way.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from curator.fileutil import file_sha256  # noqa: F401  (re-exported: curator.model.file_sha256)

log = logging.getLogger(__name__)

# Keys every OpenAI-CLIP ViT state dict has; a file without them is not a CheXzero checkpoint.
REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "text_projection",
    "ln_final.weight",
)
# Scalars that OpenAI's JIT archives carry next to the weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A file that is not a CheXzero (OpenAI CLIP ViT) checkpoint."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and validate a checkpoint file; raise :class:`CheckpointError` with a one-line reason."""
    path = Path(path)
    expected = "a CheXzero checkpoint (torch.save'd state_dict of OpenAI CLIP ViT, keys such as 'visual.conv1.weight')"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; expected {expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, truncated files ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not readable by torch.load ({first[:200]}); expected {expected}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict; expected {expected}")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        key = k[len("module."):] if k.startswith("module.") else k
        if key in _NON_WEIGHT_KEYS:
            continue
        sd[key] = v
    missing = [k for k in REQUIRED_KEYS if k not in sd or not isinstance(sd[k], torch.Tensor)]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; expected {expected}")
    return sd


def build_clip(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An fp32 open_clip CLIP holding exactly the weights of ``sd`` (fp16/fp32 tensors alike)."""
    from open_clip.model import build_model_from_openai_state_dict

    model = build_model_from_openai_state_dict(dict(sd), quick_gelu=True, cast_dtype=None)
    model = model.float()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.eval()


DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU. Asking for CUDA without one is an error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ValueError(f"--device {name!r} is not a device curator can run on: give cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} was asked for, but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return dev


def encode_text_to_eot(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's ``encode_text`` run over the positions up to the last end-of-text token only.

    CheXzero's text transformer (OpenAI CLIP) is causal and pools the features at the end-of-text
    token, the largest id of each row: positions after it cannot change the result, so cutting
    the 77-token context to the longest prompt (a few tokens) gives the same embeddings (to float
    rounding) at a fraction of the cost. Other pooling types use the model's own ``encode_text``.
    """
    mask = getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) != "argmax" or mask is None:
        return model.encode_text(tokens)
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def resolve_devices(name: str | None) -> list[torch.device]:
    """Devices for one model replica each: ``None``/"auto" and "cuda" -> every visible GPU (else the
    CPU), "cuda:1" -> that GPU, "cuda:0,cuda:2" -> those; asking for CUDA without one is an error."""
    if name in (None, "auto", "cuda"):
        if torch.cuda.is_available():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if name == "cuda":
            raise RuntimeError("--device cuda was asked for, but CUDA is not available on this machine")
        return [torch.device("cpu")]
    devices = [resolve_device(part.strip()) for part in str(name).split(",") if part.strip()]
    if not devices:
        raise ValueError(f"--device {name!r} names no device: give cpu, cuda, cuda:N or a list such as cuda:0,cuda:1")
    gpus = [d for d in devices if d.type != "cpu"]  # (cpu,cpu: two replicas on the CPU, as the tests run several)
    if len(set(gpus)) < len(gpus):
        raise ValueError(f"--device {name}: a device is named twice (one model replica runs on each device named)")
    return devices


@dataclass
class Checkpoint:
    """One loaded checkpoint: its identity and its model."""

    path: str
    sha256: str
    model: torch.nn.Module
    device: torch.device
    # fp16 autocast on CUDA (`curator embed --amp`): faster, not CheXzero-exact (probabilities move
    # by up to ~5e-5). Off: float32 on every device, TF32 off, as on the CPU.
    amp: bool = False

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def short_id(self) -> str:
        return self.sha256[:12]

    def replicate(self, device: torch.device) -> "Checkpoint":
        """The same checkpoint, a copy of its model on ``device`` (for one replica per GPU)."""
        import copy

        model = copy.deepcopy(self.model).to(device)
        return Checkpoint(path=self.path, sha256=self.sha256, model=model, device=torch.device(device), amp=self.amp)

    def _autocast(self):
        if self.device.type == "cuda" and self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        if self.device.type == "cuda":
            exact_float32_on_cuda()
        return contextlib.nullcontext()

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (float32, on CPU) of a preprocessed batch (N, 3, H, W)."""
        x = batch.to(self.device, non_blocking=True)
        with self._autocast():
            feats = self.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (float32, on CPU), one row per text."""
        from open_clip.tokenizer import tokenize

        tokens = tokenize(list(texts), context_length=self.context_length).to(self.device)
        with self._autocast():
            feats = encode_text_to_eot(self.model, tokens)
        return F.normalize(feats.float(), dim=-1).cpu()


def exact_float32_on_cuda() -> None:
    """Make CUDA's float32 matrix products and convolutions full float32 (no TF32), for this
    process: cuDNN's convolutions (the patch embedding) default to TF32, whose 10-bit mantissa
    would move the probabilities by ~1e-3. Called before the model runs on a CUDA device without
    ``amp``."""
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def load_checkpoint(path: str | Path, device: str | torch.device | None = None, amp: bool = False) -> Checkpoint:
    """Load one CheXzero-format checkpoint onto ``device`` (default: CUDA if available). ``amp``:
    run it in fp16 autocast on CUDA (not exact; float32 otherwise, and always on the CPU)."""
    path = Path(path)
    sd = read_state_dict(path)
    try:
        model = build_clip(sd)
    except Exception as exc:
        raise CheckpointError(f"{path}: state dict does not fit the OpenAI CLIP ViT architecture ({str(exc).splitlines()[0][:200]})") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model = model.to(dev)
    return Checkpoint(path=str(path.resolve()), sha256=file_sha256(path), model=model, device=dev, amp=amp)


def load_checkpoints(paths: Iterable[str | Path], device: str | None = None, amp: bool = False) -> list[Checkpoint]:
    cks = [load_checkpoint(p, device, amp) for p in paths]
    if cks:
        precision = "fp16 autocast" if amp and cks[0].device.type == "cuda" else "float32"
        log.info("device: %s, %s (%d checkpoint%s)", cks[0].device, precision, len(cks), "" if len(cks) == 1 else "s")
        if amp and cks[0].device.type != "cuda":
            log.warning("--amp applies on CUDA only: the model runs in float32 on %s", cks[0].device)
    return cks


def new_clip(
    embed_dim: int = 512,
    vision_width: int = 768,
    vision_layers: int = 12,
    patch_size: int = 32,
    image_size: int = 224,
    text_width: int = 512,
    text_layers: int = 12,
    context_length: int = 77,
    vocab_size: int = 49408,
) -> torch.nn.Module:
    """A freshly initialised CLIP of CheXzero's architecture family (OpenAI layout, QuickGELU).

    The defaults are ViT-B/32, the published CheXzero model. Widths must be multiples of 64
    (heads = width // 64, as OpenAI's state-dict loader infers them). Its ``state_dict()`` has the
    key layout of a CheXzero checkpoint.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    for name, w in (("vision_width", vision_width), ("text_width", text_width)):
        if w % 64:
            raise ValueError(f"{name}={w} must be a multiple of 64")
    vision_cfg = CLIPVisionCfg(layers=vision_layers, width=vision_width, patch_size=patch_size, image_size=image_size)
    text_cfg = CLIPTextCfg(
        context_length=context_length, vocab_size=vocab_size, width=text_width, heads=text_width // 64, layers=text_layers
    )
    return CLIP(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)

"""CheXzero's zero-shot "softmax" method, as pure functions on embeddings.

For a finding ``f``: ``pos = cos(image, text(positive.format(f)))``,
``neg = cos(image, text(negative.format(f)))`` and ``p = exp(pos) / (exp(pos) + exp(neg))``:
raw cosines, no logit scale. Several phrasings of one finding are averaged as normalised text
vectors and normalised again. An ensemble averages ``p`` over checkpoints.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from curator.prompts import PromptSet

TextEncoder = Callable[[Sequence[str]], torch.Tensor]


def class_embedding(encode_texts: TextEncoder, texts: Sequence[str]) -> torch.Tensor:
    """Mean of the normalised text embeddings of ``texts``, normalised again: shape (D,)."""
    emb = F.normalize(encode_texts(list(texts)).float(), dim=-1)
    return F.normalize(emb.mean(dim=0), dim=-1)


def template_weights(encode_texts: TextEncoder, prompts: PromptSet, template: str) -> torch.Tensor:
    """(D, F) matrix: one column per finding, its phrases formatted with ``template``.

    All texts are encoded in one batch; each finding's column is then :func:`class_embedding`'s
    mean of its normalised phrase vectors, normalised again.
    """
    texts = [template.format(p) for f in prompts.findings for p in f.phrases]
    emb = F.normalize(encode_texts(texts).float(), dim=-1)
    cols, i = [], 0
    for f in prompts.findings:
        n = len(f.phrases)
        cols.append(F.normalize(emb[i : i + n].mean(dim=0), dim=-1))
        i += n
    return torch.stack(cols, dim=1)


def prompt_weights(encode_texts: TextEncoder, prompts: PromptSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative (D, F) weight matrices of a prompt set."""
    return (
        template_weights(encode_texts, prompts, prompts.positive),
        template_weights(encode_texts, prompts, prompts.negative),
    )


def softmax_probabilities(image_emb: np.ndarray | torch.Tensor, pos_w: torch.Tensor, neg_w: torch.Tensor) -> np.ndarray:
    """Probabilities (N, F) of normalised image embeddings (N, D) given the two weight matrices."""
    x = torch.as_tensor(np.asarray(image_emb), dtype=torch.float32)
    pos = x @ pos_w.float()
    neg = x @ neg_w.float()
    # exp(pos) / (exp(pos) + exp(neg)) == sigmoid(pos - neg); computed the reference's way.
    e_pos, e_neg = torch.exp(pos), torch.exp(neg)
    return (e_pos / (e_pos + e_neg)).numpy()


def ensemble(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the members' probabilities."""
    if not probabilities:
        raise ValueError("an ensemble needs at least one member")
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probabilities]), axis=0).astype(np.float32)

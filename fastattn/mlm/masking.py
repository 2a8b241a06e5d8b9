"""BERT's masked-language-model corruption (Devlin et al. 2019, section 3.1).

Each eligible token (not special, not padding) is selected with probability
``mask_prob`` (15% in BERT; MosaicBERT found 30% better); a selected token is
replaced by [MASK] 80% of the time, by a random ordinary token 10%, kept 10%.
Labels hold the original id at selected positions and -100 elsewhere. With
``whole_word`` the selection is drawn per word: all WordPiece pieces of a
selected word are selected together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

IGNORE_INDEX = -100  # label of positions that are not predicted (F.cross_entropy's default ignore_index)


@dataclass
class MaskingConfig:
    mask_prob: float = 0.15
    replace_with_mask: float = 0.8  # share of selected tokens replaced by [MASK]
    replace_with_random: float = 0.1  # share replaced by a random token; the rest is kept
    whole_word: bool = False

    def __post_init__(self):
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.replace_with_mask < 0 or self.replace_with_random < 0 or \
                self.replace_with_mask + self.replace_with_random > 1:
            raise ValueError(f"replace_with_mask ({self.replace_with_mask}) + replace_with_random "
                             f"({self.replace_with_random}) must be within [0, 1]")


def word_start_positions(input_ids: torch.Tensor, continues_word: torch.Tensor) -> torch.Tensor:
    """(B, N) position of the first piece of the word each token belongs to."""
    N = input_ids.shape[1]
    is_start = ~continues_word[input_ids]  # (B, N)
    pos = torch.arange(N, device=input_ids.device).expand_as(input_ids)
    return torch.cummax(torch.where(is_start, pos, 0), dim=1).values


def mask_tokens(input_ids: torch.Tensor, *, eligible: torch.Tensor, mask_id: int, random_ids: torch.Tensor,
                config: MaskingConfig, generator: Optional[torch.Generator] = None,
                continues_word: Optional[torch.Tensor] = None):
    """Corrupt a batch for MLM.

    Args:
        input_ids: (B, N) int64.
        eligible: (B, N) bool, False for special tokens and padding (never masked).
        mask_id: the [MASK] id. random_ids: (R,) int64 ids a random replacement is drawn from.
        continues_word: (vocab,) bool table of "##" pieces; required when ``config.whole_word``.
        generator: CPU generator for reproducible masks (draws on CPU, moved to input_ids' device).
    Returns:
        (inputs, labels), both (B, N) int64: corrupted ids, and original ids at selected positions / -100.
    """
    shape, device = input_ids.shape, input_ids.device
    draw = torch.rand(shape, generator=generator)  # (B, N), uniform
    if config.whole_word:
        if continues_word is None:
            raise ValueError("whole-word masking needs the tokenizer's continues_word table")
        starts = word_start_positions(input_ids.cpu(), continues_word.cpu())
        draw = draw.gather(1, starts)  # every piece takes the draw of its word's first piece
    selected = (draw < config.mask_prob) & eligible.cpu()
    action = torch.rand(shape, generator=generator)  # (B, N): which of the three replacements
    to_mask = selected & (action < config.replace_with_mask)
    to_random = selected & (action >= config.replace_with_mask) & \
        (action < config.replace_with_mask + config.replace_with_random)
    pick = torch.randint(len(random_ids), shape, generator=generator)
    inputs = input_ids.cpu().clone()
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids.cpu()[pick][to_random]
    labels = torch.where(selected, input_ids.cpu(), torch.full_like(inputs, IGNORE_INDEX))
    return inputs.to(device), labels.to(device)

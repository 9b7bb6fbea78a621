"""The GPUs a model may be trained or served on, by name: what serve.cards and `lmsys plan --serve-cards`
accept. A fact table only (no torch): the config schema reads it, so every step's code hash holds it;
the rest of the serving target (dtype rules, serving.json) is lmsys.target."""
from __future__ import annotations

import re

BF16_FROM = (8, 0)           # compute capability from which a card has bf16 tensor cores
# Compute capability of the cards a model is likely served on (NVIDIA's CUDA GPUs table). A card not
# here is refused with the list: add it rather than guess.
CARDS = {"P100": (6, 0), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "A10": (8, 6), "A10G": (8, 6),
         "A40": (8, 6), "L4": (8, 9), "L40S": (8, 9), "H100": (9, 0), "H200": (9, 0)}


def parse_cards(text: str, where: str = "serve.cards") -> tuple[int, str]:
    """'2xT4' -> (2, 'T4'); 'T4' -> (1, 'T4'). Raises ValueError, naming `where`, for a malformed or
    unknown card."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX×]\s*)?([A-Za-z0-9]+)\s*", str(text))
    if not m:
        raise ValueError(f"{where} {text!r}: expected N x CARD, e.g. 2xT4")
    count, name = int(m.group(1) or 1), m.group(2).upper()
    if name not in CARDS:
        raise ValueError(f"{where} {text!r}: unknown card {name!r}; known: {', '.join(CARDS)} (lmsys/cards.py CARDS)")
    if count < 1:
        raise ValueError(f"{where} {text!r}: at least one card")
    return count, name

"""How long predict takes on the cards a submission is scored on (`lmsys plan --serve-cards 2xT4`).

Unmeasured until a serving card is: derived from the student's measured inference rate on
`orchestration.estimate.card` (real tokens/s on the padded, length-sorted path: the path a card
without verified packed kernels takes), rescaled by the serving card's sustained fp16 throughput
over the measured card's sustained bf16 (`estimate.cards`: sustained, not peak). The card's memory
sets the batch: the served weights (GPTQ `quantize.bits` with fp16 group scales; the embedding
stays unquantised in fp16) and the CUDA context come off it, and what is left holds the batch's
activations at text.infer_max_length (one decoder layer's at a time: its hidden-sized and
MLP-sized tensors, and eager attention's scores in fp16 with their fp32 softmax). Each forward
also pays GPTQ's dequantisation (the torch backend's worst case: the quantised weights read, the
fp16 weights written and read back). With TTA the two orders go to separate cards when there are
two (the 1st place's submission), else every card takes an equal share of the forwards.

No torch import.
"""
from __future__ import annotations

import math

from lmsys import token_model
from lmsys.cards import parse_cards


def served_weight_bytes(cfg: dict, figures: dict) -> tuple[float, str]:
    """(bytes, arithmetic) of the served student: GPTQ weights with fp16 scales and packed zeros per
    group when quantize.enabled (else fp16), plus the unquantised fp16 embedding."""
    q, params = cfg["quantize"], float(figures["params_b"]) * 1e9
    emb = float(figures["embedding_params_b"]) * 1e9 * 2
    if q["enabled"]:
        bits, group = int(q["bits"]), int(q["group_size"])
        body = params * bits / 8 + params / group * (2 + bits / 8)
        how = (f"{figures['params_b']} B x {bits} bits (GPTQ) + scales {figures['params_b']} B / {group} x "
               f"{2 + bits / 8:g} B = {body / 1e9:.2f} GB")
    else:
        body = params * 2
        how = f"{figures['params_b']} B x 2 B (fp16) = {body / 1e9:.2f} GB"
    return body + emb, (f"{how}; embedding {figures['embedding_params_b']} B x 2 B (fp16, not quantised) = "
                        f"{emb / 1e9:.2f} GB; {(body + emb) / 1e9:.2f} GB in all")


def row_bytes(shape: dict, tokens: int) -> float:
    """Activation bytes of one row of `tokens` tokens in one decoder layer at fp16: four hidden-sized
    tensors, three MLP-sized ones, and eager attention's scores (2 B) with their fp32 softmax (4 B)."""
    return tokens * (shape["hidden"] * 2 * 4 + shape["intermediate"] * 2 * 3) + shape["heads"] * tokens ** 2 * 6


def serving_estimate(cfg: dict, test_rows: int, cards_text: str) -> dict:
    """Predict's time for `test_rows` rows on the card set, with every step of the arithmetic ("lines").
    Raises KeyError when the card or the student lacks a figure, ValueError on a bad card set."""
    count, card = parse_cards(cards_text, "--serve-cards")
    card = card.lower()                          # the figures table (orchestration.estimate.cards) is lower case
    est = cfg["orchestration"]["estimate"]
    if card not in (est.get("cards") or {}) or not (est["cards"][card] or {}).get("fp16"):
        raise KeyError(f"cards.{card}: no sustained fp16 figure (cards with one: "
                       f"{sorted(k for k, v in (est.get('cards') or {}).items() if (v or {}).get('fp16'))})")
    student = cfg["models"]["student"]
    c, figures = est["cards"][card], (est.get("models") or {}).get(student) or {}
    missing = [f"models.{student}.{k}" for k in ("params_b", "embedding_params_b", "shape", "infer_tok_s") if k not in figures]
    missing += [f"cards.{card}.{k}" for k in ("memory_gib", "bandwidth_gbs") if k not in c]
    missing += ["serve"] if not est.get("serve") else []
    if missing:
        raise KeyError(f"profile {cfg['profile']} has no serving figures: {', '.join(missing)}")
    length, tta = int(cfg["text"]["infer_max_length"]), bool(cfg["predict"]["tta"])
    s = {"card": card, "count": count, "rows": test_rows, "tta": tta, "length": length,
         "limit_s": float(est["serve"]["limit_h"]) * 3600}
    s["weights"], s["weights_how"] = served_weight_bytes(cfg, figures)
    s["free"] = float(c["memory_gib"]) * 2**30 - s["weights"] - float(est["serve"]["cuda_context_gib"]) * 2**30
    s["per_row"] = row_bytes(figures["shape"], length)
    s["fits"] = max(0, math.floor(s["free"] / s["per_row"]))
    s["batch"] = min(int(cfg["predict"]["batch_size"]), s["fits"])
    s["rate"] = float(figures["infer_tok_s"]) * float(c["fp16"]) / float(est["cards"][est["card"]]["bf16"])
    stats = est["tokens"]["competition"]
    s["tokens"] = token_model.mean_tokens(((float(stats["median"]), float(stats["p90"]), 1.0),), length)
    s["per_card"] = math.ceil(test_rows * (2 if tta else 1) / count)
    s["q_bytes"] = s["weights"] - float(figures["embedding_params_b"]) * 1e9 * 2
    s["dequant"] = s["q_bytes"] * 5 / (float(c["bandwidth_gbs"]) * 1e9) if cfg["quantize"]["enabled"] else 0.0
    s["forwards"] = math.ceil(s["per_card"] / s["batch"]) if s["batch"] else 0
    s["seconds"] = (s["per_card"] * s["tokens"] / s["rate"] + s["forwards"] * s["dequant"] + float(est["serve"]["load_s"])
                    if s["batch"] else float("inf"))
    s["lines"] = _arithmetic(s, cfg)
    return s


def _arithmetic(s: dict, cfg: dict) -> list[str]:
    """The serving estimate's steps as text."""
    est = cfg["orchestration"]["estimate"]
    card, base, serve = s["card"], est["card"], est["serve"]
    student = cfg["models"]["student"]
    c, figures = est["cards"][card], (est.get("models") or {}).get(student) or {}
    missing = [f"models.{student}.{k}" for k in ("params_b", "embedding_params_b", "shape", "infer_tok_s") if k not in figures]
    missing += [f"cards.{card}.{k}" for k in ("memory_gib", "bandwidth_gbs") if k not in c]
    missing += ["serve"] if not est.get("serve") else []
    if missing:
        raise KeyError(f"profile {cfg['profile']} has no serving figures: {', '.join(missing)}")
    shape, length = figures["shape"], s["length"]
    split = (f"TTA: the original order on {card} #1, the swapped on {card} #2" if s["tta"] and s["count"] == 2
             else f"{'both orders' if s['tta'] else 'one order'} shared by {s['count']} {card}")
    return [
        f"weights on each {card}: {s['weights_how']}",
        f"memory: {c['memory_gib']} GiB - {s['weights'] / 1e9:.2f} GB weights - {serve['cuda_context_gib']} GiB CUDA "
        f"context = {s['free'] / 1e9:.2f} GB for activations; a {length}-token row needs {length} x ({shape['hidden']} x 8 + "
        f"{shape['intermediate']} x 6) B + {shape['heads']} x {length}^2 x 6 B = {s['per_row'] / 1e9:.2f} GB -> "
        f"{s['fits']} rows at the longest; batch min(predict.batch_size {cfg['predict']['batch_size']}, {s['fits']}) = "
        f"{s['batch']}",
        f"rate: {figures['infer_tok_s']:,} real tokens/s (the {base} bf16 figure of the padded path) x {c['fp16']} / "
        f"{est['cards'][base]['bf16']} ({card} fp16 / {base} bf16 sustained TFLOP/s) = {s['rate']:,.0f} tokens/s a {card} "
        f"= {s['rate'] / s['tokens']:.2f} rows/s at {s['tokens']:.0f} tokens a row",
        f"  {base} rate: {figures.get('source', '(no source)')}",
        f"  {card}: {c.get('source', '(no source)')}",
        f"  {base}: {est['cards'][base].get('source', '(no source)')}",
        f"GPTQ dequantisation a forward (torch backend, worst case): {s['q_bytes'] / 1e9:.2f} GB x (1 read + 2 written + "
        f"2 read) / {c['bandwidth_gbs']} GB/s = {s['dequant']:.2f} s",
        f"per {card}: {s['per_card']:,} forwards ({split}) x {s['tokens']:.0f} tokens / {s['rate']:,.0f} + {s['forwards']:,} "
        f"batches x {s['dequant']:.2f} s + load {serve['load_s']} s = {s['seconds'] / 3600:.2f} h",
    ]


def format_serving(s: dict) -> str:
    """The serving estimate: a header marked unmeasured, the arithmetic, the verdict against the limit."""
    over = s["seconds"] > s["limit_s"]
    lines = [f"serving estimate, unmeasured (derived; no {s['card']} measured): predict {s['rows']:,} test rows on "
             f"{s['count']} x {s['card']}, TTA {'on' if s['tta'] else 'off'}",
             *(f"  {line}" for line in s["lines"])]
    if s["batch"] < 1:
        lines.append(f"  !memory: not one row of the longest fits a {s['card']}")
    lines.append(f"  predict on {s['count']} x {s['card']}: {s['seconds'] / 3600:.2f} h of the {s['limit_s'] / 3600:g} h limit"
                 + (" !over the limit" if over else ""))
    return "\n".join(lines)

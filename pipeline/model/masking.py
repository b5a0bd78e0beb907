"""Conversations -> one padded model batch, with the loss mask of each training stage.

``encode(processor, conversations, add_generation_prompt=False, labels=...)`` renders each
conversation with the chat template, runs the processor once on the whole batch (left padding,
so the same batch also serves ``generate``) and returns ``input_ids``, ``attention_mask``,
``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids`` (only when images are present) and
``labels``:

* ``"none"``: no labels key (generation, scoring).
* ``"response"`` (CoT SFT, Direct SFT): loss on the assistant turns only — the tokens after each
  ``<|im_start|>assistant\\n`` header up to and including its ``<|im_end|>`` (so the model learns to
  stop); the header itself, the system/user turns and the ``\\n`` after ``<|im_end|>`` are -100.
* ``"all_but_visual"`` (VM-CPT): loss on every real token except the visual ones: the image/video
  pads and the ``<|vision_start|>``/``<|vision_end|>`` markers, whether they belong to policy
  images or input images. Policy text, template tokens, query, CoT and answer are all learned.

Padding is always -100. Special-token ids are asked from the tokenizer, never hard-coded, so the
same masks come out of the tiny tokenizer and a real Qwen tokenizer.

Departure from the obvious: the assistant span is found by token ids, not character offsets,
because the processor expands each ``<|image_pad|>`` into N tokens before tokenising, which
breaks offset mapping. This is exact because the response format starts with ``<think>`` or
``\\boxed`` and never with a newline that could merge with the header's ``\\n``.
"""
from __future__ import annotations

from typing import Literal

LabelMode = Literal["none", "response", "all_but_visual"]
IGNORE = -100
VISUAL_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def visual_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISUAL_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def response_labels(input_ids, tokenizer):
    """Labels that keep only assistant-turn tokens (through ``<|im_end|>``)."""
    import torch

    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = torch.full_like(input_ids, IGNORE)
    h = len(header)
    for r, row in enumerate(input_ids.tolist()):
        i = 0
        while i <= len(row) - h:
            if row[i:i + h] == header:
                j = i + h
                while j < len(row) and row[j] != end_id:
                    j += 1
                labels[r, i + h:j + 1] = input_ids[r, i + h:j + 1]
                i = j + 1
            else:
                i += 1
    return labels


def all_but_visual_labels(input_ids, attention_mask, tokenizer):
    """Labels = input ids except visual tokens and padding."""
    import torch

    labels = input_ids.clone()
    vis = torch.tensor(visual_token_ids(tokenizer), dtype=input_ids.dtype)
    labels[torch.isin(input_ids, vis)] = IGNORE
    labels[attention_mask == 0] = IGNORE
    return labels


def render(processor, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Chat-template text of each conversation (image parts become one ``<|image_pad|>`` each)."""
    return [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
            for c in conversations]


def encode(processor, conversations: list[list[dict]], add_generation_prompt: bool = False,
           labels: LabelMode = "none") -> dict:
    """Padded batch for ``model(**batch)`` / ``model.generate(**batch)``; see the module docstring."""
    from pipeline.model.prompts import images_of

    if labels not in ("none", "response", "all_but_visual"):
        raise ValueError(f"labels must be 'none', 'response' or 'all_but_visual', got {labels!r}")
    if add_generation_prompt and labels == "response":
        raise ValueError("labels='response' needs the assistant turn; add_generation_prompt=True has none")
    tok = processor.tokenizer
    tok.padding_side = "left"
    texts = render(processor, conversations, add_generation_prompt)
    images = [img for c in conversations for img in images_of(c)]
    batch = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    batch = dict(batch)
    if labels == "response":
        batch["labels"] = response_labels(batch["input_ids"], tok)
    elif labels == "all_but_visual":
        batch["labels"] = all_but_visual_labels(batch["input_ids"], batch["attention_mask"], tok)
    return batch


def token_count(batch: dict) -> int:
    """Real (non-padding) tokens in a batch: the unit of the tokens/s figures."""
    return int(batch["attention_mask"].sum())

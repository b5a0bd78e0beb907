"""The tiny presets' tokenizer: a Qwen2-compatible byte-level BPE trained offline in ~1 s.

Three things must match Qwen2/Qwen2.5-VL exactly so the same code serves a real checkpoint:

* the normalizer (NFC) and the pre-tokenizer regex: transformers 5 re-imposes them when a folder
  says ``tokenizer_class: Qwen2Tokenizer``; training with anything else silently changes ids
  (recipe pitfall 7);
* the special tokens (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>`` ...): the code never
  hard-codes ids, it asks the tokenizer, so they may sit at 0..13 here and 151643.. in Qwen;
* the chat template's output for image/text content lists (``CHAT_TEMPLATE``), written with
  ``{{- '...\\n' -}}`` literals because Jinja trimming eats newlines after plain text (pitfall 10).

Where this departs from the obvious: the training corpus is generated here from fixed word
lists and templates (CLEVR attributes, "Condition 1.2", "Case 17", tool names, JSON tool calls,
CoT phrasing, generic QA) with a fixed seed. It deliberately does NOT read ``policies/`` or any
dataset, so editing a policy never changes the base model, and it does not read stdlib docstrings,
which differ between Python versions and would make the "deterministic" tokenizer machine-dependent.
"""
from __future__ import annotations

import json
import random

QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2/Qwen2.5-VL special tokens, in Qwen's order (ids 0..13 here).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Added but not special (as in Qwen2.5), so they survive ``skip_special_tokens=True``.
# ``<think>``/``</think>`` are added as whole tokens: the response format starts with them and
# a random model should not have to spell them out of bytes.
EXTRA_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen2-VL style chat template: string or [{"type": "image"|"text"}] content; the default system
# prompt is added when the first message is not a system message (as Qwen's own template does).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}"
    "{{- content['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# ----------------------------------------------------------------------------- corpus

SHAPES = ["cube", "sphere", "cylinder"]
COLORS = ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
SIZES = ["small", "large"]
MATERIALS = ["rubber", "metal"]
ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "material": MATERIALS}
SYLLABLES = ["su", "ri", "nu", "ka", "lo", "me", "ta", "vi", "zo", "pa", "ne", "ru", "mi", "do", "ke", "la"]
TOOLS = ["Calculator", "OCR", "CountGivenObject", "ImageDescription", "GoogleSearch",
         "RegionAttributeDescription", "TextToBbox", "Plot", "MathOCR", "Solver", "DrawBox", "AddText",
         "TextToImage", "ImageStylization"]
ARG_NAMES = ["image", "text", "query", "expression", "attribute", "bbox", "k", "command", "keywords",
             "instruction", "annotation", "position", "color", "top1"]
WORDS = ("the a an of in on at to for with from by and or not no yes is are was be has have this that these "
         "there which what where when how many much any all each every one two three four five six seven eight "
         "nine ten image picture photo object objects scene left right top bottom front behind near next "
         "above below same different other more less than most least number count answer question response "
         "policy rule condition case user profile account credits age tool call version history output "
         "instruction must should may call use return follow check if then else otherwise true false "
         "according given following reasoning step first second third finally therefore so because "
         "person people car dog cat cup table text sign book chart graph plot equation formula price total "
         "color shape size material visible shown contains holds describe identify read find locate").split()


def _policy_name(rng: random.Random) -> str:
    return f"L{rng.randint(1, 6)}-" + "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def _cond_id(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 6)) for _ in range(rng.randint(1, 4)))


def _condition(rng: random.Random) -> str:
    attr = rng.choice(list(ATTRIBUTES))
    val = rng.choice(ATTRIBUTES[attr])
    return rng.choice([f"there is a {val} object", f"the image contains a {val} object",
                       f"any object is {val}", f"there exists an object whose {attr} is {val}"])


def _tool_call(rng: random.Random) -> str:
    tool = rng.choice(TOOLS) + (f"_v{rng.randint(1, 5)}" if rng.random() < 0.6 else "")
    args = {}
    for name in rng.sample(ARG_NAMES, rng.randint(1, 3)):
        if name == "image":
            args[name] = f"image/image_{rng.randint(1, 300)}.jpg"
        elif name in ("bbox", "position"):
            args[name] = "(" + ", ".join(str(rng.randint(0, 999)) for _ in range(4)) + ")"
        elif name == "k":
            args[name] = rng.choice([1, 4])
        else:
            args[name] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
    return json.dumps({"name": tool, "arguments": args}, ensure_ascii=False)


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic training text for the tokenizer: a pure function of ``(n, seed)``.

    Queries and responses come from the pipeline's own builders (one definition of the format)."""
    from pipeline.data.clevr_policy import QUERY
    from pipeline.model.prompts import format_response

    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        name = _policy_name(rng)
        cid = _cond_id(rng)
        case = f"Case {rng.randint(0, 63)}"
        attrs = ", ".join(f"{rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(MATERIALS)} {rng.choice(SHAPES)}"
                          for _ in range(rng.randint(1, 3)))
        profile = {"account_type": rng.choice("ABCD"), "credits": rng.randint(0, 1000), "age": rng.randint(12, 80)}
        out += [
            f"Policy: {name}\n# Condition {cid}: If {_condition(rng)}, go to Condition {_cond_id(rng)}. "
            f"Otherwise, the response is {case}.",
            QUERY.format(name=name),
            format_response(f"Condition {cid} checks whether {_condition(rng)}. The image shows {attrs}. "
                            f"The condition is {rng.choice(['satisfied', 'not satisfied'])}, so I follow "
                            f"Condition {_cond_id(rng)}. The response is {case}.", case),
            f"User profile: {json.dumps(profile)}\nHistory: {_tool_call(rng)} -> "
            + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            format_response(f"The user has account type {profile['account_type']} with {profile['credits']} "
                            f"credits and age {profile['age']}, so the rule selects version {rng.randint(1, 5)}.",
                            _tool_call(rng)),
            "Question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize()
            + f"? Answer: {rng.choice(['yes', 'no', str(rng.randint(0, 99)), rng.choice(COLORS)])}.",
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))).capitalize() + ".",
            f"{rng.randint(0, 9999)} + {rng.randint(0, 999)} = {rng.random() * 1000:.2f}",
        ]
    return out


# ----------------------------------------------------------------------------- build


def build_tokenizer(vocab_size: int = 4096, texts: list[str] | None = None, seed: int = 0,
                    model_max_length: int = 8192):
    """Byte-level BPE with Qwen2's normalizer/pre-tokenizer, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())  # byte-level covers every string: no unk token
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # the added tokens count toward vocab_size, so len(tokenizer) == vocab_size exactly
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(EXTRA_ADDED_TOKENS), special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else corpus(seed=seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",          # Qwen*-VL-Instruct generation stops at <|im_end|>
        pad_token="<|endoftext|>",
        unk_token=None, bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=model_max_length,
        padding_side="left",             # batched generation of a decoder-only model
        chat_template=CHAT_TEMPLATE,
    )
    hf.add_tokens(EXTRA_ADDED_TOKENS)
    return hf

"""Tiny random teachers built from configs and saved in the real on-disk formats, so that the demo and the tests
run the real loading code offline (no download): a LLaVA and a Qwen2-VL captioner (transformers ``save_pretrained``
folders with processor and chat template) and an open_clip model (``open_clip_config.json`` + safetensors, the
layout of a hub repo or ``local-dir:``). Their captions and embeddings are meaningless; the plumbing is real.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["TINY_CLIP_CONFIG", "save_tiny_llava", "save_tiny_open_clip", "save_tiny_qwen2vl"]

# Chat templates in the style of the real models: an image placeholder, the text, then the assistant turn.
LLAVA_TEMPLATE = ("{% for m in messages %}{{ 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' }}"
                  "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} "
                  "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                 "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "user", "assistant"] + [f"w{i}" for i in range(88)]

TINY_CLIP_CONFIG = {"embed_dim": 32,
                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _tokenizer(special: dict):
    """A word-level fast tokenizer over WORDS (ids < 96) plus the model's special tokens at their config ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def save_tiny_llava(folder, seed: int = 0) -> Path:
    """A ~55k-parameter random LLaVA (CLIP vision tower + Llama) with its processor, in ``folder``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
        image_token_index=100, image_seq_length=16, vision_feature_layer=-1)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer({"<image>": 100}), patch_size=8,
                   vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
                   chat_template=LLAVA_TEMPLATE).save_pretrained(folder)
    return folder


def save_tiny_qwen2vl(folder, seed: int = 0) -> Path:
    """A ~115k-parameter random Qwen2-VL with its processor, in ``folder``."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    special = {"<|image_pad|>": 150, "<|video_pad|>": 151, "<|vision_start|>": 152, "<|vision_end|>": 153}
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
                     tokenizer=_tokenizer(special), video_processor=Qwen2VLVideoProcessor(),
                     chat_template=QWEN_TEMPLATE).save_pretrained(folder)
    return folder


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def save_tiny_open_clip(folder, seed: int = 0, config: dict = None) -> Path:
    """A tiny random open_clip model in open_clip's folder format (loadable as the folder or ``local-dir:``)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config or TINY_CLIP_CONFIG
    name = "_med3dinsight_tiny_clip"
    open_clip.factory._MODEL_CONFIGS[name] = cfg  # only to build it; loading goes through the saved folder
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip logs "No pretrained weights loaded" (random on purpose here)
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
        open_clip.factory._MODEL_CONFIGS.pop(name, None)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder

"""The vision-language model (VLM) that writes the captions: :func:`load_vlm` loads any Hugging Face
image-text-to-text model (hub id or local folder) with its processor and checks, before the weights load, that it is
a VLM with a chat template that renders; :class:`VLMError` is the one-line error of the model, prompt or slice input
the captioner cannot use. transformers and huggingface_hub are imported inside the functions.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import Med3DInsightError
from .hub import hub_offline, pickle_files, unsafe_pickle_message


class VLMError(Med3DInsightError):
    """A model, prompt file or input the captioner cannot use; the one-line message names it and the fix."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass
class VLM:
    """A loaded vision-language model: ``name`` as given, its ``processor`` and ``model`` (eval mode)."""
    name: str
    processor: Any
    model: Any

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(dtype, device: str):
    """float32 on CPU and bfloat16 (float16 without bf16 support) on CUDA by default; strings or torch dtypes."""
    if dtype is None:
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise VLMError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'float16' or 'bfloat16'")


def _looks_like_path(model: str) -> bool:
    """A string a user meant as a folder rather than a hub id ("org/name" or "name")."""
    return (model.startswith(("/", ".", "~")) or "\\" in model or model.endswith("/") or model.count("/") > 1
            or bool(re.match(r"^[A-Za-z]:", model)))


def _locate(model: str) -> str:
    """Local folder path or hub id of ``model``; fails at once for a missing folder or an uncached id offline."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VLMError(f"{model} is a file; pass the model folder that holds config.json")
        return str(path)
    if _looks_like_path(model):
        raise VLMError(f"local model folder {model} does not exist; check the path, or pass a hub id such as "
                       f"Qwen/Qwen2-VL-2B-Instruct")
    from huggingface_hub import try_to_load_from_cache
    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # HFValidationError: neither a folder nor a valid repo id
        raise VLMError(f"{model} is neither an existing local folder nor a valid Hugging Face hub id") from None
    if hub_offline() and not isinstance(cached, str):
        # Checked here because transformers would otherwise fail later with a generic connection error.
        raise VLMError(f"{model} is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1), "
                       f"and there is no local folder of that name: download it on a machine with network "
                       f"(hf download {model}) and copy the cache, or pass a local folder path")
    return model


def load_vlm(model: str, *, device: Union[str, torch.device] = "cpu", dtype=None,
             trust_remote_code: bool = False) -> VLM:
    """Load an image-text-to-text model and its processor for captioning.

    Args:
        model: hub id (e.g. ``"Qwen/Qwen2-VL-2B-Instruct"``) or local folder saved with ``save_pretrained``.
        device: where to run it (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: ``None`` (float32 on CPU, bfloat16 on CUDA), ``"auto"`` (the checkpoint's), ``"float32"``,
            ``"float16"``, ``"bfloat16"`` or a torch dtype.
        trust_remote_code: allow the repository's own Python code to run (only for repositories you trust).

    Returns:
        a :class:`VLM` in eval mode on ``device``.

    Raises:
        VLMError: missing folder, uncached id offline, not a VLM, custom code not trusted, no chat template.
    """
    import transformers
    from packaging.version import Version
    from transformers import AutoConfig, AutoProcessor
    try:
        from transformers import AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    except ImportError:
        raise VLMError("transformers is too old for AutoModelForImageTextToText; pip install -U transformers") \
            from None
    torch_dtype = _resolve_dtype(dtype, str(device))
    where = _locate(str(model))
    trust = bool(trust_remote_code)  # an explicit False: transformers would otherwise prompt [y/N] on custom code

    def fail(e: BaseException, what: str) -> VLMError:
        if "trust_remote_code" in str(e):
            return VLMError(f"{model} needs its own custom code to load its {what}; pass --trust-remote-code "
                            f"(trust_remote_code=True) if you trust that repository")
        return VLMError(f"cannot load the {what} of {model} ({type(e).__name__}: {_first_line(e)}); check the "
                        f"model folder's files or download the model again")

    # The config is cheap: check it is a VLM before loading a processor (a CLIP folder has one too) or weights.
    # transformers, tokenizers and safetensors raise many types for damaged files (SafetensorError, Exception from
    # the Rust tokenizer, jinja2 errors...): each stage turns them into one line; MED3DINSIGHT_DEBUG=1 shows the cause
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as e:
        raise fail(e, "config") from None
    except Exception as e:
        raise fail(e, "config") from e
    remote = "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING and not remote:
        raise VLMError(f"{model} is not a vision-language model (its config is {type(config).__name__}); pass an "
                       f"image-text-to-text model such as Qwen2-VL / LLaVA / HuatuoGPT-Vision-7B-Qwen2.5VL")
    try:
        processor = AutoProcessor.from_pretrained(where, trust_remote_code=trust)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail(e, "processor") from None
    except Exception as e:
        raise fail(e, "processor") from e
    if getattr(processor, "image_processor", None) is None:
        raise VLMError(f"{model} has no image processor (AutoProcessor gave {type(processor).__name__}); pass a "
                       f"folder or repo that holds the model's processor files too")
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(processor, "chat_template", None) is None:
        # Some repos keep the template only in tokenizer_config.json; VLM tokenizer templates handle images too.
        processor.chat_template = getattr(tokenizer, "chat_template", None)
    if processor.chat_template is None:
        raise VLMError(f"the processor of {model} has no chat template, so prompts cannot be formatted for it; use "
                       f"the model's instruct/chat variant or add a chat_template.jinja to its folder")
    try:  # a broken template would otherwise fail at the first batch, after the weights loaded
        probe = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]]
        processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2 raises its own types
        raise VLMError(f"the chat template of {model} does not render ({type(e).__name__}: {_first_line(e)}); fix "
                       f"its chat_template.jinja or use the model's original files") from e
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype (the old name warns, later goes).
    dtype_kw = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    try:
        net = AutoModelForImageTextToText.from_pretrained(where, config=config, trust_remote_code=trust,
                                                          **{dtype_kw: torch_dtype})
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a foreign object: nothing ran
        raise VLMError(unsafe_pickle_message(e, pickle_files(_snapshot_folder(where)), str(model))) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        if "Unrecognized configuration class" in str(e):
            raise VLMError(f"{model} is not a vision-language model (its config is {type(config).__name__}); "
                           f"pass an image-text-to-text model such as Qwen2-VL / LLaVA") from None
        raise fail(e, "weights") from None
    except Exception as e:
        raise fail(e, "weights") from e
    return VLM(name=str(model), processor=processor, model=net.to(device).eval())


def _snapshot_folder(where: str) -> Optional[Path]:
    """The folder holding the model's files: the local folder, or the hub id's cached snapshot."""
    if Path(where).is_dir():
        return Path(where)
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(where, "config.json")
    except Exception:  # only used to name a file in an error message
        return None
    return Path(cached).parent if isinstance(cached, str) else None

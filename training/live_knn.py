"""The paper's second finding on the user's dashboard: k-NN top-1 of the frozen probe-layer average, live.

Every `log.knn_every` steps (at the validation steps by default) the trunk embeds a small labelled set: the
token mean of the probe-layer average, in eval mode with bidirectional attention, exactly the feature the probe
uses (training/probe_lib). Held-out images vote by weighted k-NN (cosine, k neighbours, temperature 0.07) among
the bank images. The images are decoded and preprocessed once at start (a few hundred to a few thousand).

Under FSDP2 every rank runs the same small forward (the root's own parameters are gathered with `unshard()`;
each block gathers its own in its pre-forward hook), so no rank is left out of a collective.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from aimcore import PreprocessConfig
from training.probe_lib.data import ImageDataset, load_probe_data
from training.probe_lib.metrics import knn_scores

__all__ = ["LiveKnn"]

logger = logging.getLogger(__name__)


class LiveKnn:
    def __init__(self, path: str, *, img_size: int, per_class: int, k: int, batch_size: int) -> None:
        data = load_probe_data(Path(path), train_per_class=per_class, val_per_class=max(1, per_class // 2))
        prep = PreprocessConfig.for_size(img_size)
        self.num_classes, self.k, self.batch_size = data.num_classes, k, batch_size

        def load(split: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
            items = [split[i] for i in range(len(split))]
            return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])

        self.bank, self.bank_labels = load(ImageDataset(data.train, prep))  # (n, 3, S, S), (n,)
        self.query, self.query_labels = load(ImageDataset(data.val, prep))
        logger.info("live k-NN on %s: %d bank / %d held-out images, %d classes, k=%d",
                    path, len(self.bank), len(self.query), self.num_classes, k)  # fmt: skip

    @torch.no_grad()
    def _features(
        self, trunk: nn.Module, images: torch.Tensor, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        out = []
        for chunk in images.split(self.batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                avg = trunk.features(chunk.to(device), outputs=("probe_average",)).probe_average  # (b, N, D)
            out.append(avg.float().mean(dim=1).cpu())  # (b, D) token mean
        return torch.cat(out)

    def top1(self, root: nn.Module, trunk: nn.Module, device: torch.device, dtype: torch.dtype) -> float:
        """k-NN top-1 (fraction) of `trunk` (the model's aimcore part); `root` is the module FSDP wraps."""
        was_training = root.training
        root.eval()
        unshard = getattr(root, "unshard", None)
        if unshard is not None:  # FSDP2: the root's own parameters (patch embedding, norms) for this forward
            unshard()
        try:
            bank = self._features(trunk, self.bank, device, dtype)
            query = self._features(trunk, self.query, device, dtype)
        finally:
            if unshard is not None:
                root.reshard()
            root.train(was_training)
        votes = knn_scores(bank, self.bank_labels, query, self.num_classes, k=self.k)
        return float((votes.argmax(dim=1) == self.query_labels).float().mean())

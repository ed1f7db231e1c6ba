"""The text side of a LiT model: tokenizer, its own batcher, golden self-check, recipes, zero-shot label cache.

Texts go through a DynamicBatcher of their own (texts and images never share a batch: different towers) that
feeds the same metrics as the image batcher (queue/compute histograms, batch size, drops). A model without a text
tower leaves this disabled: text requests answer 409 `no_text_tower`.

Zero-shot classification (CLIP's recipe): each label is written into every prompt template, each prompt embedded
and L2-normalised, the mean over templates normalised again: one (P,) vector per label. Probabilities are
softmax(logit_scale * image_unit @ labels_unit.T). Label matrices are cached per (labels, templates), LRU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.batching import DynamicBatcher
from service.engine import Engine
from service.errors import InvalidRequestError, ServiceError
from service.metrics import ServiceMetrics
from service.settings import Settings

__all__ = ["DEFAULT_TEMPLATES", "GOLDEN_TEXTS", "NoTextTowerError", "TextInputError", "TextService", "zero_shot_probs"]

logger = logging.getLogger(__name__)

# "a photo of a {}." and the 7-prompt ImageNet ensemble recommended in OpenAI CLIP's prompt-engineering notebook.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# Boot self-check: each text alone (batch 1) vs all of them tiled to the largest batch (the tower must not depend
# on batch-mates or padding), plus a stored reference when the artefact carries one.
GOLDEN_TEXTS = ("a photo of a cat.", "A red running shoe", "café ünïcode 東京", "x", "a " * 200)


class NoTextTowerError(ServiceError):
    http_status = 409
    code = "no_text_tower"


class TextInputError(InvalidRequestError):
    """A text input we refuse (422): `code` names why (too_many_texts, text_too_long, empty_text, ...)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zero_shot_probs(image_vectors: np.ndarray, label_units: np.ndarray, logit_scale: float) -> np.ndarray:
    """(n, P) raw image vectors, (C, P) unit label vectors -> (n, C) float64 probabilities."""
    logits = logit_scale * (_unit(image_vectors.astype(np.float64)) @ label_units.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


class TextService:
    def __init__(self, settings: Settings, engine: Engine, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.backend: Any = None
        self.tokenizer: Any = None
        self.batcher: DynamicBatcher | None = None
        self.golden: dict[str, Any] | None = None
        self.reason = "the served model has no text tower"
        self._labels: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = OrderedDict()
        self._recipes: dict[bool, dict[str, Any]] = {}

    # ----- lifecycle (an Engine.before_ready hook) -----
    async def open(self) -> None:
        backend = getattr(self.engine.backend, "text", None)
        if backend is None:
            return
        info = backend.info
        tok_file = info.extra.get("lit", {}).get("tokenizer")
        if not tok_file:
            self.reason = "the LiT model has no tokenizer files (tokenizer.json or vocab.json + merges.txt)"
            logger.warning("text tower present but %s: set text_tokenizer; text requests answer 409", self.reason)
            return
        from aimcore.tokenizer import TextTokenizer

        tok = TextTokenizer.from_dir(Path(tok_file).parent, context_length=backend.context_length)
        if tok.eos_id != backend.eos_token_id:
            raise RuntimeError(
                f"tokenizer {tok_file} has EOS id {tok.eos_id}, the text tower pools EOS {backend.eos_token_id}"
            )
        self.tokenizer, self.backend = tok, backend
        self.golden = await asyncio.to_thread(self._self_check)
        if not self.golden["ok"]:
            raise RuntimeError(f"text self-check failed: {self.golden['message']}")
        s = self.settings
        self.batcher = DynamicBatcher(
            backend,
            max_batch_size=info.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue=s.max_queue,
            metrics=self.metrics,
        )
        await self.batcher.start()
        logger.info("text tower ready: tokenizer %s, self-check %s", tok_file, self.golden["reference"])

    def _self_check(self) -> dict[str, Any]:
        ids = self.tokenizer(list(GOLDEN_TEXTS))  # (K, L)
        single = np.concatenate([self.backend.infer(row[None])["text_embeds"] for row in ids])  # (K, P)
        reference, where = single, "the text tower at batch 1 (batch consistency)"
        floor = self.settings.golden_min_cosine
        stored_cos = 1.0
        stored = getattr(self.backend, "stored_reference", None)
        if stored is not None:  # an exported text graph: the export's torch fp32 vectors of its parity inputs
            s_ids, s_vecs = stored
            stored_cos = float(np.sum(_unit(self.backend.infer(s_ids)["text_embeds"]) * _unit(s_vecs), axis=1).min())
            where = "stored torch fp32 text vectors (export reference.npz) and batch consistency"
        n = self.backend.info.max_batch_size
        order = np.arange(n) % len(ids)
        t0 = time.perf_counter()
        tiled = self.backend.infer(ids[order])["text_embeds"]
        cos = float(np.sum(_unit(tiled) * _unit(reference[order]), axis=1).min())
        cos = min(cos, stored_cos)
        ok = bool(np.all(np.isfinite(tiled)) and cos >= floor)
        return {
            "ok": ok,
            "reference": where,
            "texts": len(ids),
            "batch_size": n,
            "min_cosine": cos,
            "warmup_s": round(time.perf_counter() - t0, 4),
            "message": "" if ok else f"text_embeds: min cosine {cos:.6f} < {floor}",
        }

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop(self.settings.drain_timeout_s)

    # ----- requests -----
    def require(self) -> DynamicBatcher:
        self.engine.check_serving()
        if self.batcher is None:
            raise NoTextTowerError(f"text inputs need a LiT model with a text tower and tokenizer: {self.reason}")
        return self.batcher

    def check_texts(self, texts: Sequence[Any], what: str = "texts") -> list[str]:
        s = self.settings
        cap, chars = (s.max_labels_per_request if what == "labels" else s.max_texts_per_request), s.max_text_chars
        if not texts:
            raise TextInputError(f"{what} is empty", code="no_texts")
        if len(texts) > cap:
            raise TextInputError(f"{len(texts)} {what} in one request; the limit is {cap}", code="too_many_texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TextInputError(f"{what}[{i}] must be a string", code="invalid_text")
            if len(t) > chars:
                raise TextInputError(f"{what}[{i}] has {len(t)} characters; the limit is {chars}", code="text_too_long")
            if not t.strip():
                raise TextInputError(f"{what}[{i}] is empty (or only whitespace)", code="empty_text")
        return list(texts)

    async def embed(self, texts: Sequence[str], deadline: float) -> tuple[np.ndarray, Any]:
        """(n, P) raw (projected, unnormalised) vectors, through the text batcher; and the batch result."""
        from aimcore.tokenizer import EmptyTextError

        batcher = self.require()
        try:
            ids = self.tokenizer(texts)  # (n, L)
        except EmptyTextError as exc:
            raise TextInputError(str(exc), code="empty_text") from None
        with batcher.admit(len(ids)) as reservation:
            result = await batcher.submit(list(ids), ["text_embeds"], deadline, reservation)
        return np.stack([row["text_embeds"] for row in result.rows]).astype(np.float32), result

    async def label_units(self, labels: Sequence[str], templates: Sequence[str], deadline: float) -> np.ndarray:
        """(C, P) unit vectors of the template ensemble per label, cached per (labels, templates)."""
        key = (tuple(labels), tuple(templates))
        if key in self._labels:
            self._labels.move_to_end(key)
            return self._labels[key]
        prompts = [t.format(label) for label in labels for t in templates]
        vectors = []
        step = self.settings.max_texts_per_request  # one request's worth of prompts per batcher submission
        for i in range(0, len(prompts), step):
            vectors.append((await self.embed(prompts[i : i + step], deadline))[0])
        per_prompt = _unit(np.concatenate(vectors).reshape(len(labels), len(templates), -1))  # (C, T, P)
        units = _unit(per_prompt.mean(axis=1))  # (C, P)
        if self.settings.zero_shot_cache_size:
            self._labels[key] = units
            while len(self._labels) > self.settings.zero_shot_cache_size:
                self._labels.popitem(last=False)
        return units

    @property
    def logit_scale(self) -> float:
        return float(self.backend.info.extra["lit"]["logit_scale"])

    def recipe(self, normalize: bool = True) -> dict[str, Any]:
        """Like Engine.recipe: what made text vectors. Their fingerprint differs from the image tower's, so an
        index refuses text vectors as items (towers never mix) while text queries search image indexes."""
        if normalize in self._recipes:
            return self._recipes[normalize]
        info = self.backend.info
        lit = info.extra["lit"]
        text_recipe = self.text_embedding_recipe()
        recipe = {
            "model_id": info.model_id,
            "model_sha256": str(info.extra.get("weights_sha256") or info.model_sha256),
            "pooling": text_recipe.pooling,
            "normalize": normalize,
            "layers": [lit["text"]["depth"] - 1],
            "norm": "text tower (causal): post_trunk_norm, the first EOS token, then text_projector",
            "dim": lit["projection_dim"],
            "preprocess": dict(text_recipe.preprocess),
            "attention": "causal",
            "backend": info.name,
            "precision": info.precision,
            "fingerprint": text_recipe.fingerprint if normalize else None,
        }
        self._recipes[normalize] = recipe
        return recipe

    def text_embedding_recipe(self) -> Any:
        from service.index.recipe import EmbeddingRecipe

        info = self.backend.info
        lit = info.extra["lit"]
        return EmbeddingRecipe(
            model_sha256=str(info.extra.get("weights_sha256") or info.model_sha256),
            pooling="lit_text",
            dim=int(lit["projection_dim"]),
            attention="causal",
            preprocess={"tokenizer": Path(str(lit["tokenizer"])).name, "context_length": self.tokenizer.context_length},
            model_id=info.model_id,
            backend=info.name,
            precision=info.precision,
        )

    def describe(self) -> dict[str, Any]:
        if self.batcher is None:
            return {"enabled": False, "reason": self.reason}
        return {
            "enabled": True,
            "tokenizer": self.backend.info.extra["lit"]["tokenizer"],
            "context_length": self.tokenizer.context_length,
            "vocab_size": self.tokenizer.vocab_size,
            "logit_scale": self.logit_scale,
            "self_check": self.golden,
            "default_templates": list(DEFAULT_TEMPLATES),
            "cached_label_sets": len(self._labels),
            "recipe": self.recipe(True),
        }

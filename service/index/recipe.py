"""The embedding recipe: which computation produced the vectors of an index (ANCHORS §7, embedding provenance).

Vectors are only comparable when the same weights, pooling, preprocessing and normalisation made them. Every index
stores its recipe; adds and searches must present the same one (as an `EmbeddingRecipe` or its fingerprint).

Identity fields (part of the fingerprint): model_sha256, pooling, dim, normalization, attention, preprocess. The
preprocess dict carries `fidelity: "fast"` for the service's `preprocess_mode=fast` (absent for exact, so exact
recipes keep their fingerprints), so fast and exact vectors never share an index.
Informational fields (recorded, not compared): model_id, backend, precision. fp32 PyTorch and fp16 TensorRT
embeddings of one checkpoint agree to ~1e-3 cosine, far below neighbour gaps, so refusing them would only force
needless rebuilds; the export manifests record the measured parity.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from service.index.errors import RecipeMismatchError
from service.redact import public_name

if TYPE_CHECKING:
    from service.backends.base import BackendInfo

__all__ = ["IDENTITY_FIELDS", "OUTPUT_POOLING", "EmbeddingRecipe", "RecipeLike", "check_recipe"]

IDENTITY_FIELDS = ("model_sha256", "pooling", "dim", "normalization", "attention", "preprocess")
# Backend output name -> pooling name (aimcore.AimModel.embed's names).
OUTPUT_POOLING = {"embedding": "mean", "pooled": "probe"}
# AIMv2-LiT towers (service.backends.lit_backend): the image vector is the backend's "embedding" output; text vectors
# come from the text tower. Distinct poolings, so the two towers' vectors never share an index.
LIT_POOLING_OUTPUT = {"lit_image": "embedding", "lit_text": "text_embeds"}
FINGERPRINT_PREFIX = "aimfp1-"


@dataclass(frozen=True)
class EmbeddingRecipe:
    model_sha256: str
    pooling: str
    dim: int
    normalization: str = "l2"
    attention: str = "bidirectional"
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    model_id: str = ""
    backend: str = ""
    precision: str = ""

    def __post_init__(self) -> None:
        if not self.model_sha256:
            raise ValueError("an embedding recipe needs the model checksum (model_sha256)")
        poolings = [*OUTPUT_POOLING.values(), *LIT_POOLING_OUTPUT]
        if self.pooling not in poolings:
            raise ValueError(f"pooling must be one of {sorted(poolings)}, got {self.pooling!r}")
        if int(self.dim) <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.normalization != "l2":
            # Cosine similarity through inner product on unit vectors is the only metric we serve.
            raise ValueError(f"only 'l2' normalisation is supported, got {self.normalization!r}")
        object.__setattr__(self, "dim", int(self.dim))
        # Informational, and shown to clients (/index, /search, 409 messages): a name, never the build machine's path
        # (indexes built before this rule stored one). Not part of the fingerprint, so nothing else changes.
        object.__setattr__(self, "model_id", public_name(str(self.model_id)))
        object.__setattr__(self, "preprocess", dict(self.preprocess))

    @property
    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    @property
    def fingerprint(self) -> str:
        canon = json.dumps(self.identity, sort_keys=True, separators=(",", ":"), default=list)
        return FINGERPRINT_PREFIX + hashlib.sha256(canon.encode()).hexdigest()[:24]

    @property
    def output(self) -> str:
        """The backend output that carries these vectors ("embedding" or "pooled")."""
        if self.pooling in LIT_POOLING_OUTPUT:
            return LIT_POOLING_OUTPUT[self.pooling]
        return next(o for o, p in OUTPUT_POOLING.items() if p == self.pooling)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["preprocess"] = dict(self.preprocess)
        out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbeddingRecipe:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def from_backend(cls, info: BackendInfo, output: str = "embedding") -> EmbeddingRecipe:
        """The recipe of `output` ("embedding" or "pooled") of a backend.

        An exported artefact's own checksum differs from the weights it came from; a backend that knows the source
        weights' checksum puts it in info.extra["weights_sha256"] so ONNX/TensorRT and PyTorch share one recipe.
        """
        if output not in OUTPUT_POOLING:
            raise ValueError(f"output must be one of {sorted(OUTPUT_POOLING)}, got {output!r}")
        return cls(
            model_sha256=str(info.extra.get("weights_sha256") or info.model_sha256),
            # A LiT backend names its own pooling and width ("embedding" is its projected image vector).
            pooling=info.extra.get("poolings", {}).get(output) or OUTPUT_POOLING[output],
            dim=int(info.extra.get("output_dims", {}).get(output) or info.config.embed_dim),
            preprocess=info.preprocess.to_dict(),
            model_id=info.model_id,
            backend=info.name,
            precision=info.precision,
        )


RecipeLike = EmbeddingRecipe | str


def check_recipe(expected: EmbeddingRecipe, got: RecipeLike, action: str) -> None:
    """Raise RecipeMismatchError unless `got` (a recipe or a fingerprint string) is `expected`'s identity."""
    if isinstance(got, str):
        if got != expected.fingerprint:
            raise RecipeMismatchError(
                f"cannot {action}: vectors carry recipe fingerprint {got!r} but the index was built with "
                f"{expected.fingerprint!r} (model {expected.model_id or expected.model_sha256[:12]}, pooling "
                f"{expected.pooling}, dim {expected.dim}). Embed with the index's model, or rebuild the index",
                expected=expected.to_dict(),
                got={"fingerprint": got},
            )
        return
    if got.identity == expected.identity:
        return
    diffs = [
        f"{k}: index {expected.identity[k]!r} vs {got.identity[k]!r}"
        for k in IDENTITY_FIELDS
        if expected.identity[k] != got.identity[k]
    ]
    raise RecipeMismatchError(
        f"cannot {action}: the embedding recipe differs from the index's ({'; '.join(diffs)}). Embed with the "
        "index's model and pooling, or rebuild the index with `python -m service.index build`",
        expected=expected.to_dict(),
        got=got.to_dict(),
    )

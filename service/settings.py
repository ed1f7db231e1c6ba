"""Service settings: environment variables with the `AIM_` prefix, overridden by command-line flags.

Every field is both `AIM_<NAME>` (e.g. `AIM_MAX_BATCH_SIZE=16`) and `--<name-with-dashes>` (e.g.
`--max-batch-size 16`); flags win over the environment, which wins over the defaults. `python -m service --help`
lists them all with their help text.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["BACKENDS", "Settings", "add_settings_arguments", "settings_from_args"]

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIM_", extra="ignore", validate_default=True)

    # ----- what to serve -----
    model: str | None = Field(
        None,
        description="checkpoint file or folder, export directory (manifest.json), bundled name (aim-demo), released "
        "flavor (aim-600M ...) or Hugging Face id. Unset: aim-demo when bundled, else aim-debug with random weights",
    )
    head: str | None = Field(None, description="separate head weights file (released ..._head_best_layers.pth)")
    probe_layers: str | None = Field(None, description="'best', 'last' or comma-separated block indices")
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = Field(
        "auto", description="auto picks the fastest present and logs why"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="torch backend compute dtype; auto = bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU runs it "
        "natively, else fp32 (the boot self-check still requires cosine >= golden_min_cosine against fp32)",
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for torch/onnxruntime (default: all)")

    # ----- batching -----
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per backend call")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="longest a queued image waits for batch-mates")
    max_queue: int = Field(256, ge=1, description="images admitted but not yet computing; beyond it 429")
    max_queue_wait_s: float = Field(
        1.0,
        ge=0,
        le=600,
        description="refuse (429, before the body is read) when the expected wait of a new request, admitted images "
        "x measured seconds per image, exceeds this (0: only max_queue bounds the queue)",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="default per-request deadline")
    max_request_timeout_s: float = Field(300.0, gt=0, description="cap on the X-Request-Timeout header")

    # ----- input limits -----
    max_body_bytes: int = Field(32 << 20, ge=1024, description="request body cap (JSON base64 or multipart)")
    max_inflight_body_bytes: int = Field(
        128 << 20,
        ge=1024,
        description="request body bytes being received or handled at once, over all requests; a request that would "
        "exceed it is refused with 429 before its body is read (one request alone is always admitted)",
    )
    max_images_per_request: int = Field(32, ge=1, description="images in one request")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height cap, read from the header")
    max_resized_pixels: int = Field(
        16_000_000, ge=1, description="cap after the shorter-side resize (refuses extreme aspect ratios)"
    )
    allowed_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP"], description="Pillow format names, comma-separated"
    )
    jpeg_draft_min_pixels: int = Field(
        2_000_000, ge=0, description="JPEGs above this many pixels decode at a reduced DCT scale (0 = never)"
    )
    decode_workers: int = Field(2, ge=1, le=64, description="threads decoding images")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="nice value added to the decode and compute threads so the event loop (admission, refusals, "
        "answers) gets the CPU first on a busy host; 0 leaves them at the process's priority",
    )
    preprocess_mode: Literal["exact", "fast"] = Field(
        "exact",
        description="exact: the reference transform bit for bit; fast: JPEG DCT draft + one resample of the crop "
        "+ per-batch normalisation (close to, not equal to, exact; recorded in the embedding recipe)",
    )

    # ----- self-check and lifecycle -----
    golden_check: bool = Field(True, description="check outputs against reference outputs before ready")
    golden_min_cosine: float = Field(0.999, gt=0, le=1, description="per-image cosine floor in the self-check")
    drain_grace_s: float = Field(2.0, ge=0, description="on SIGTERM: seconds /readyz answers 503 before closing")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: longest wait for in-flight requests")

    # ----- auth -----
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated keys; once set, state-changing routes need one"
    )
    auth_scope: Literal["mutating", "inference", "all"] = Field(
        "mutating",
        description="routes that need a key once keys are set: mutating (index changes), inference (+ /embed, "
        "/classify, /search), all (every route but /healthz and /readyz)",
    )

    # ----- vector index (FAISS retrieval: /search, /index) -----
    index_path: str | None = Field(
        None,
        description="index directory (python -m service.index build --out ...); created empty for the served model "
        "when absent. Unset: no index, and /search and /index answer 409 no_index",
    )
    index_kind: Literal["flat", "hnsw", "ivf", "ivfpq"] = Field(
        "hnsw",
        description="structure of a NEW index (an existing one keeps its own): hnsw is the benchmark's pick "
        "(docs/BENCHMARKS.md); flat is exact",
    )
    index_pooling: Literal["mean", "probe"] = Field(
        "mean",
        description="which vector the index holds: mean (backend output 'embedding', the builder's --output "
        "embedding) or probe (the head's attention pooling, 'pooled')",
    )
    index_ef_search: int | None = Field(None, ge=1, le=4096, description="HNSW beam width (unset: the index's own)")
    index_nprobe: int | None = Field(None, ge=1, le=65536, description="IVF lists searched (unset: the index's own)")
    index_snapshot_interval_s: float = Field(
        300.0,
        ge=0,
        description="fold the write-ahead log into a snapshot in the background this often (0: only at the core's "
        "size thresholds and on shutdown); a read-only replica checks for a newer snapshot as often",
    )
    index_recall_check_interval_s: float = Field(
        3600.0, ge=0, description="ANN recall@10 self-check on 50 stored vectors this often (0: never)"
    )
    index_read_only: bool = Field(
        False, description="open the index without the writer lock, for replicas serving a writer's snapshot"
    )
    index_max_items_per_request: int = Field(
        1000, ge=1, le=100_000, description="ids or vectors in one /index/items or /search request"
    )

    # ----- protocol adapters: OpenAI /v1/embeddings, KServe v2 (docs/SERVICE.md "Using existing clients") -----
    served_model_name: str | None = Field(
        None, description="the model's name in /v1/models and /v2/models/{name} (unset: its flavor, e.g. aim-demo)"
    )
    url_fetch: bool = Field(
        False, description="let /v1/embeddings inputs be http(s) URLs the server downloads (off: base64 / data URIs)"
    )
    url_fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts URL fetching may reach, comma-separated; '*.example.com' also matches its subdomains",
    )
    url_fetch_allow_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs exempt from the refusal of private, loopback and link-local addresses (an internal image "
        "store); empty: none",
    )
    url_fetch_max_bytes: int = Field(10 << 20, ge=1, description="largest image a URL may return")
    url_fetch_timeout_s: float = Field(5.0, gt=0, le=120, description="longest the downloads of one request take")
    url_fetch_max_redirects: int = Field(3, ge=0, le=10, description="redirects followed (each target re-checked)")

    @field_validator("url_fetch_allow_hosts", "url_fetch_allow_networks", mode="before")
    @classmethod
    def _split_fetch_lists(cls, value: Any) -> Any:
        return _split_list(value) if isinstance(value, str) else value

    @field_validator("url_fetch_allow_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"url_fetch_allow_networks: {net!r} is not a CIDR such as 10.20.0.0/16") from None
        return value

    @model_validator(mode="after")
    def _check_url_fetch(self) -> Settings:
        if self.url_fetch and not self.url_fetch_allow_hosts:
            raise ValueError("url_fetch needs url_fetch_allow_hosts: the hosts images may be downloaded from")
        return self

    # ----- server -----
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (each loads the model)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    switch_interval_ms: float = Field(
        5.0,
        gt=0,
        le=100,
        description="CPython GIL switch interval of the server process; lower hands the GIL back to the event "
        "loop sooner while decode/compute threads run (a latency knob; see docs/BENCHMARKS.md)",
    )

    # ----- speed (issue 13) -----
    autoselect: bool = Field(
        True,
        description="with backend=auto, measure the candidate paths at start (torch fp32/bf16, ONNX exports) and "
        "serve the fastest with cosine >= golden_min_cosine to fp32 that is batch-invariant; pin one with "
        "--backend (and --precision)",
    )
    autoselect_seconds: float = Field(2.0, gt=0, le=120, description="time budget for measuring all candidates")

    # --- text (AIMv2-LiT models: text embeddings, text search, zero-shot classify) and the /ui page ---
    text_tokenizer: str | None = Field(
        None, description="folder with the LiT tokenizer files (default: those beside the checkpoint)"
    )
    max_texts_per_request: int = Field(64, ge=1, le=4096, description="texts (or labels) in one request; beyond: 422")
    max_text_chars: int = Field(1000, ge=1, le=100_000, description="characters per text; beyond: 422")
    max_labels_per_request: int = Field(
        1000, ge=1, le=100_000, description="zero-shot /classify labels (ImageNet: 1000); beyond: 422"
    )
    zero_shot_cache_size: int = Field(64, ge=0, description="label sets whose embeddings /classify keeps")
    ui_enabled: bool = Field(True, description="serve the search page at GET /ui")

    # ----- AIMv2 native resolution (issue 11; service/native.py) -----
    max_patches: int = Field(
        0, ge=0, le=4096, description="native-resolution models: patch cap per image (0: the checkpoint's own)"
    )
    native_buckets: bool = Field(
        True, description="native-resolution models: snap images to a few aspect-ratio grids so they batch"
    )

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = _split_list(value)
        return [str(v).upper() for v in value]

    @field_validator("model", "head", "index_path", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        """`AIM_INDEX_PATH=` (as compose writes an empty variable) means "not set", not the working directory."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return _split_list(value) if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) > max_queue ({self.max_queue}): such a "
                "request could never be admitted; raise max_queue or lower max_images_per_request"
            )
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("request_timeout_s must be <= max_request_timeout_s")
        if self.index_path and self.workers > 1 and not self.index_read_only:
            raise ValueError(
                f"workers={self.workers} with a writable index: only one process may write {self.index_path}; "
                "serve it with one worker, or set index_read_only for replicas"
            )
        return self

    def public_dict(self) -> dict[str, Any]:
        """Settings for /info and logs: API keys reduced to a count."""
        out = self.model_dump(mode="json", exclude={"api_keys"})
        out["api_keys"] = len(self.api_keys)
        return out


def _split_list(value: str) -> list[str]:
    text = value.strip()
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return [part.strip() for part in text.split(",") if part.strip()]


def _scalar_type(annotation: Any) -> Any:
    """The non-None member of an Optional, and the base of Annotated."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else str
    return annotation


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field. Defaults are None so only flags actually given override the environment."""
    group = parser.add_argument_group("settings (each also AIM_<NAME> in the environment)")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _scalar_type(field.annotation)
        help_text = field.description or ""
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(kind) is Literal:
            group.add_argument(flag, choices=[str(c) for c in get_args(kind)], default=None, help=help_text)
        elif kind in (int, float):
            group.add_argument(flag, type=kind, default=None, help=help_text)
        else:  # str and lists (comma-separated)
            group.add_argument(flag, type=str, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace | None = None) -> Settings:
    """Settings from the environment, with the flags that were given on top."""
    given: dict[str, Any] = {}
    if args is not None:
        for name in Settings.model_fields:
            value = getattr(args, name, None)
            if value is not None:
                given[name] = value
    return Settings(**given)

"""Issue 13 over real HTTP (uvicorn on loopback, aim-debug checkpoint, real PNG/JPEG files, a real FAISS index):
the backend chosen by measurement and reported in /info and /metrics, batch-invariant vectors for the chosen
backend, and /analyze answering embedding + classes + neighbours from one forward."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import aimcore
from aimcore.manifest import read_manifest
from service.backends import BUNDLED_CPU_ARTIFACT
from service.backends.autoselect import Candidate, onnx_candidate, select_backend, torch_candidates
from service.settings import Settings
from tests.service.conftest import LiveServer, serve
from tests.service.index_support import AUTH, KEY, b64, metric_samples


@pytest.fixture(scope="module")
def server(debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(
        model=str(debug_checkpoint),
        precision="auto",  # let autoselect measure fp32 and (where native) bf16
        max_wait_ms=20,
        max_batch_size=16,
        index_path=str(tmp_path_factory.mktemp("speed") / "index"),
        api_keys=KEY,
        autoselect_seconds=1.0,
    )
    with serve(settings) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def test_backend_chosen_by_measurement_in_info_and_metrics(client: httpx.Client) -> None:
    backend = client.get("/info").json()["backend"]
    selection = backend["selection"]
    assert selection is not None and selection["max_batch"] == 16
    names = [c["name"] for c in selection["candidates"]]
    assert "torch-fp32" in names
    chosen = next(c for c in selection["candidates"] if c["name"] == selection["chosen"])
    eligible = [c for c in selection["candidates"] if c["eligible"]]
    assert chosen["eligible"] and chosen["invariance"] <= 1e-6
    if len(eligible) > 1:  # timed only when there is a choice (bf16 exists only where it runs natively)
        assert chosen["images_per_s"] > 0 and chosen["images_per_s_b1"] > 0
        assert chosen["images_per_s"] == max(c["images_per_s"] for c in eligible)
    assert f"{backend['name']}-{backend['precision']}" == selection["chosen"]
    assert "measured at start" in backend["why"]
    samples = metric_samples(client.get("/metrics").text)
    key = (
        f'aim_backend_candidate_images_per_second{{batch="16",candidate="{chosen["name"]}",chosen="1",eligible="true"}}'
    )
    assert samples[key] == pytest.approx(chosen["images_per_s"])


def test_vectors_batch_invariant_over_http(
    server: LiveServer, client: httpx.Client, asset_bytes: dict[str, bytes]
) -> None:
    """The same image alone, then amid 15 concurrent other requests (so it shares a batch), gets the same vector."""
    names = sorted(asset_bytes)
    probe = b64(asset_bytes[names[0]])
    alone = np.array(client.post("/embed", json={"images": [probe]}).json()["embeddings"][0])

    async def busy() -> tuple[np.ndarray, list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
            others = [b64(asset_bytes[names[1 + i % (len(names) - 1)]]) for i in range(15)]
            calls = [ac.post("/embed", json={"images": [img]}) for img in [*others[:7], probe, *others[7:]]]
            answers = await asyncio.gather(*calls)
        sizes = [int(r.headers.get("x-batch-size", "0")) for r in answers]
        return np.array(answers[7].json()["embeddings"][0]), sizes

    together, sizes = asyncio.run(busy())
    assert max(sizes) > 1, "the concurrent requests should have been batched together"
    assert np.abs(together - alone).max() <= 1e-6


def test_analyze_one_forward_many_answers(
    server: LiveServer, client: httpx.Client, asset_bytes: dict[str, bytes]
) -> None:
    names = sorted(asset_bytes)
    r = client.post(
        "/index/items",
        files=[("files", (n, asset_bytes[n])) for n in names],
        data={"ids": json.dumps(names)},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    query = b64(asset_bytes[names[2]])
    before = server.engine.batcher.batches_run
    r = client.post(
        "/analyze",
        json={"images": [query], "include": ["embedding", "probe_embedding", "classes", "neighbors"], "k": 3},
    )
    assert r.status_code == 200, r.text
    assert server.engine.batcher.batches_run - before == 1, "one forward for all the answers"
    got = r.json()
    embed = client.post("/embed", json={"images": [query]}).json()
    probe = client.post("/embed", json={"images": [query], "pooling": "probe"}).json()
    classes = client.post("/classify", json={"images": [query], "top_k": 5}).json()
    search = client.post("/search", json={"images": [query], "k": 3}).json()
    np.testing.assert_allclose(got["embedding"], embed["embeddings"], atol=1e-6)
    np.testing.assert_allclose(got["probe_embedding"], probe["embeddings"], atol=1e-6)
    assert got["classes"][0]["indices"] == classes["predictions"][0]["indices"]
    np.testing.assert_allclose(got["classes"][0]["probs"], classes["predictions"][0]["probs"], rtol=1e-5)
    assert got["neighbors"][0]["ids"] == search["results"][0]["ids"] and got["neighbors"][0]["ids"][0] == names[2]
    assert got["recipes"]["embedding"]["fingerprint"] == embed["recipe"]["fingerprint"]
    # Multipart with a comma-separated include, like the other image routes.
    r = client.post("/analyze", files=[("files", ("a.jpg", asset_bytes[names[2]]))], data={"include": "classes"})
    assert r.status_code == 200 and set(r.json()) == {"count", "classes", "recipes", "batch_sizes"}


@pytest.mark.parametrize(
    "body",
    [
        {"images": ["x"], "include": ["colour"]},
        {"images": ["x"], "include": []},
        {"images": [], "include": ["embedding"]},
    ],
)
def test_analyze_bad_requests_are_422(client: httpx.Client, body: dict) -> None:
    r = client.post("/analyze", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"]


def test_autoselect_skips_batch_variant_and_unloadable_candidates() -> None:
    """The bundled int8 export (dynamic activation scales per batch) fails the invariance check on real ONNX
    Runtime; a candidate that cannot load is reported, not fatal; no passing candidate fails the start."""
    settings = Settings(precision="fp32", max_batch_size=8, autoselect_seconds=0.3)
    demo = aimcore.load_model("aim-demo")
    int8 = onnx_candidate(BUNDLED_CPU_ARTIFACT, read_manifest(BUNDLED_CPU_ARTIFACT), settings)

    def broken() -> None:
        raise FileNotFoundError("no such engine")

    cands = [Candidate("tensorrt-fp16", broken), int8, *torch_candidates(demo, settings, "cpu", "aim-demo")]
    chosen, backend, selection = select_backend(cands, demo, settings)
    by_name = {m.name: m for m in selection.measurements}
    assert chosen.name == "torch-fp32" and backend.info.precision == "fp32"
    assert "cannot load" in by_name["tensorrt-fp16"].why and not by_name["tensorrt-fp16"].eligible
    m8 = by_name["onnxruntime-int8"]
    assert m8.min_cosine >= 0.999 and m8.invariance > 1e-6 and not m8.eligible and "batch-invariant" in m8.why
    assert by_name["torch-fp32"].invariance <= 1e-6 and by_name["torch-fp32"].min_cosine > 0.99999
    with pytest.raises(RuntimeError, match="no backend candidate passed"):
        select_backend([int8], demo, settings)


def test_onnx_early_exit_graph_serves_logits_only_batches(
    debug_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`python -m export onnx --probe-graph` writes the probe-layer graph beside the full one, with its own parity;
    the ONNX Runtime backend runs batches without `embedding` on it, with the full graph's answers."""
    from export.__main__ import main as export_main
    from service.backends.onnx_backend import OnnxBackend

    out = tmp_path_factory.mktemp("early") / "onnx"
    args = ["onnx", "--checkpoint", str(debug_checkpoint), "--out", str(out), "--max-batch", "4", "--probe-graph"]
    assert export_main(args) == 0
    probe = read_manifest(out / "probe")
    config = probe.model_config
    assert sorted(probe.outputs) == ["logits", "pooled"] and probe.parity and "skipped" not in probe.parity
    assert probe.runtime["blocks_run"] == max(config.probe_layers) + 1 < config.depth
    backend = OnnxBackend(out, device="cpu")
    early = backend.info.extra["early_exit"]
    assert early["blocks_run"] == probe.runtime["blocks_run"] and early["of_blocks"] == config.depth
    x = np.random.default_rng(0).normal(0, 1, (3, 3, config.img_size, config.img_size)).astype(np.float32)
    full = backend.infer(x, ["embedding", "pooled", "logits"])  # the full graph (embedding asked)

    class FullGraphMustNotRun:
        def run(self, *a: object, **k: object) -> None:
            raise AssertionError("a logits-only batch ran the full graph")

    backend.session = FullGraphMustNotRun()  # type: ignore[assignment]
    got = backend.infer(x, ["logits", "pooled"])
    for name in ("logits", "pooled"):
        np.testing.assert_allclose(got[name], full[name], rtol=1e-4, atol=1e-5, err_msg=name)

"""The served weights' licence: read from the model card or a licence file beside them, the bundled demo's own,
a released family's Hugging Face tag, or said to be unknown (never silently absent)."""

from __future__ import annotations

from pathlib import Path

from aimcore.licence import licence_of


def test_model_card_front_matter_wins(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "---\nlibrary_name: ml-aim\nlicense: other\nlicense_name: apple-amlr\nlicense_link: LICENSE\ntags:\n"
        "- vision\n---\n# AIMv2\nlicense: not-this-one\n"
    )
    (tmp_path / "LICENSE").write_text("some text")
    found = licence_of(str(tmp_path / "model.safetensors"), "aimv2-large-patch14-224", family="aimv2")
    assert found == {"id": "other", "from": "model card (README.md)", "name": "apple-amlr", "link": "LICENSE"}


def test_licence_file_then_nothing(tmp_path: Path) -> None:
    (tmp_path / "LICENCE.txt").write_text("terms")
    assert licence_of(str(tmp_path), "custom")["file"] == "LICENCE.txt"
    empty = tmp_path / "empty"
    empty.mkdir()
    found = licence_of(str(empty), "custom")
    assert found["id"] is None and "check the licence" in found["from"]


def test_bundled_released_and_unknown_sources() -> None:
    assert licence_of(None, "aim-demo")["id"] == "Apache-2.0"
    assert licence_of("apple/aimv2-large-patch14-224", "aimv2-large-patch14-224", family="aimv2")["id"] == "apple-amlr"
    assert licence_of("aimv2-huge-patch14-448", "aimv2-huge-patch14-448", family="aimv2")["id"] == "apple-amlr"
    assert licence_of("someone/their-model", "custom")["id"] is None

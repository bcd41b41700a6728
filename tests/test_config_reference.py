"""docs/config.md is generated from the config dataclasses: stale or undocumented keys fail here."""

from pathlib import Path

from loralab.config_reference import render, undocumented

DOC = Path(__file__).parents[1] / "docs" / "config.md"


def test_every_config_key_has_a_meaning_beside_its_field():
    assert undocumented() == []


def test_docs_config_md_is_current():
    assert DOC.read_text(encoding="utf-8") == render(), \
        "docs/config.md is stale: run `python -m loralab.config_reference > docs/config.md`"

"""Shared fixtures: the real demo documents and small corpora written per test."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_DOCS = REPO / "data" / "demo" / "docs"


@pytest.fixture
def demo_docs() -> Path:
    return DEMO_DOCS


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Twelve documents (English and Japanese) with PII and a near-duplicate paragraph."""
    root = tmp_path / "corpus"
    root.mkdir()
    topics = [
        ("forklift charging", "battery bay", "Charge forklifts only in the ventilated bay"),
        ("visitor badges", "gatehouse", "Visitors collect a paper badge and are escorted"),
        ("cold storage", "freezer hall", "Wear insulated gloves for shifts below freezing"),
        ("night shifts", "control room", "Night leads sign the handover log at six"),
        ("parcel scanning", "sorting line", "Rescan any parcel whose label is torn"),
        ("fire doors", "stairwells", "Fire doors stay closed and are never wedged open"),
        ("chemical storage", "hazmat cage", "Solvents live in the locked yellow cabinet"),
        ("loading docks", "dock levellers", "Chock the trailer wheels before unloading"),
        ("first aid", "medical room", "Refill the kits on the first Monday of the month"),
        ("company cars", "car pool", "Book pool cars a day ahead in the fleet calendar"),
    ]
    contacts = [
        "+81 3-1234-5678",
        "03-2345-6789",
        "090-3456-7890",
        "(555) 123-4567",
        "+81-90-1111-2222",
        "06-6543-2109",
        "080-9876-5432",
        "555-987-6543",
        "+44 20 7946 0958",
        "0120-123-456",
    ]
    for index, (topic, place, rule) in enumerate(topics):
        (root / f"policy-{index}.md").write_text(
            f"# {topic.title()}\n\n## Scope\n\n{rule}. This rule about {topic} applies "
            f"in the {place} for every team on site {index}.\n\n## Contact\n\n"
            f"Questions about {topic} go to {topic.split()[0]}{index}@orvane.example or "
            f"{contacts[index]}.\n",
            encoding="utf-8",
        )
    (root / "経費.md").write_text(
        "# 経費精算\n\n## 期限\n\n出張の経費は帰着後30日以内に精算システムで申請してください。"
        "問い合わせは経理部（電話 090-1234-5678、keiri@orvane.example）まで。\n\n"
        "## 送付先\n\n領収書の原本は〒100-0001 東京都千代田区千代田1-1 の経理部へ郵送します。\n",
        encoding="utf-8",
    )
    (root / "copy-of-policy-3.md").write_text(
        "# Copy\n\n## Scope\n\nNight leads sign the handover log at six sharp. This rule about "
        "night shifts applies in the control room for every team on site 3.\n",
        encoding="utf-8",
    )
    return root

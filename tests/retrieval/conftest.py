"""Shared fixtures: one real MiniLM embedder per session, small real files per test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF (Helvetica text, one line per page) with a correct xref table."""
    objects: list[bytes] = []
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{pid} 0 R" for pid in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_ids[i] + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info_id = None
    if title is not None:
        objects.append(f"<< /Title ({title}) >>".encode())
        info_id = len(objects)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    trailer = f"<< /Size {len(objects) + 1} /Root 1 0 R"
    if info_id:
        trailer += f" /Info {info_id} 0 R"
    out += f"trailer\n{trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


@pytest.fixture(scope="session")
def embedder():
    from retrieval.embedder import Embedder

    return Embedder("bundled")


@pytest.fixture(scope="session")
def token_counter(embedder):
    return embedder.token_counter()


@pytest.fixture
def make_store(tmp_path: Path, embedder) -> Callable:
    from retrieval.config import RetrievalConfig
    from retrieval.store import IndexStore

    def factory(root: Path | None = None, **config) -> IndexStore:
        root = root or tmp_path / "indexes"
        return IndexStore(root, config=RetrievalConfig(root=root, **config), embedder=embedder)

    return factory


@pytest.fixture
def store(make_store):
    return make_store()


KB_FILES = {
    "vpn.md": (
        "# IT handbook\n\n## VPN\n\nInstall the VPN client and sign in with SSO. "
        "Error ERR-4471 means the device certificate expired; renew it in the portal.\n\n"
        "## Printers\n\nPrinters on floor 3 need the driver pack from the software center.\n"
    ),
    "leave.txt": (
        "有給休暇は人事システムから申請します。取得予定日の三営業日前までに申請してください。"
        "上長の承認が必要です。\n"
    ),
    "cafeteria.html": (
        "<html><head><title>Cafeteria</title><style>p {color: red}</style></head><body>"
        "<h1>Cafeteria</h1><p>The cafeteria opens at 8am and lunch is served from noon "
        "until 2pm.</p><script>var x = 'lunch';</script></body></html>"
    ),
    "mathutil.py": (
        'import math\n\n\ndef circle_area(radius):\n    """Area of a circle."""\n'
        "    return math.pi * radius ** 2\n\n\nclass Stack:\n    def __init__(self):\n"
        "        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n"
    ),
}


def write_kb(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name, text in KB_FILES.items():
        (directory / name).write_text(text, encoding="utf-8")
    (directory / "parking.pdf").write_bytes(
        make_pdf(["Parking permits are issued by the facilities team."], title="Parking")
    )
    return directory


@pytest.fixture
def kb_dir(tmp_path: Path) -> Path:
    """A small knowledge base: markdown, Japanese text, HTML, Python and a PDF."""
    return write_kb(tmp_path / "kb")


@pytest.fixture(scope="module")
def kb_index(tmp_path_factory, embedder):
    """One read-only index over the knowledge base, shared by a module's search tests."""
    from retrieval.store import IndexStore

    base = tmp_path_factory.mktemp("shared")
    kb = write_kb(base / "kb")
    store = IndexStore(base / "indexes", embedder=embedder)
    store.build("kb", [kb], progress=False)
    return kb, store.get("kb")


class EmbedSpy:
    """Counts texts that actually go through the model."""

    def __init__(self, embedder, monkeypatch) -> None:
        self.calls: list[list[str]] = []
        original = embedder.embed

        def spy(texts, **kwargs):
            self.calls.append(list(texts))
            return original(texts, **kwargs)

        monkeypatch.setattr(embedder, "embed", spy)

    @property
    def texts(self) -> list[str]:
        return [text for call in self.calls for text in call]


@pytest.fixture
def embed_spy(embedder, monkeypatch) -> EmbedSpy:
    return EmbedSpy(embedder, monkeypatch)

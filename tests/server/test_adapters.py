"""Runtime LoRA adapters over real HTTP: hot swaps under load, validation of bad adapters,
listing, the audit trail and bounded residency.

Everything runs against real servers on the bundled model with real PEFT adapters (made by
`make_adapter`); chat traffic uses the official `openai` client like a chatbot would, admin
calls and error checks use raw httpx. The session server is shared with other test files, so
every adapter made here has a `tadp-` name, and the ones preloaded by conftest are only read.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from ragtune.config import default_home
from ragtune.launcher import start_server
from ragtune.manifest import AdapterManifest
from ragtune.models import resolve_model_dir
from ragtune.models.loader import model_fingerprint
from ragtune.random_adapter import ATTENTION, MLP, make_adapter
from tests.conftest import ADMIN_KEY, API_KEY, BASE_MODEL, SERVER_ENV

P = "tadp"  # prefix of every adapter name and directory this file creates
MESSAGES = [{"role": "user", "content": "Say something surprising."}]
TOKENS = 8  # short answers: enough for adapters to differ, cheap on 2 CPU cores
SHORT = 4  # where only "which version answered" matters (the adapters differ by token 3)
LONG = 12  # streams that must still be running while an admin action lands
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------- helpers
def assert_error(
    response: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    """OpenAI's error shape {"error": {message, type, param, code}} with the given status."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def load(http: httpx.Client, name: str, path: Path | str, **fields) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path), **fields}
    return http.post("/v1/load_lora_adapter", json=body, headers=ADMIN)


def must_load(http: httpx.Client, name: str, path: Path | str, **fields) -> dict:
    response = load(http, name, path, **fields)
    assert response.status_code == 200, response.text
    return response.json()


def unload(http: httpx.Client, name: str, version: str | None = None) -> httpx.Response:
    body = {"lora_name": name} if version is None else {"lora_name": name, "version": version}
    return http.post("/v1/unload_lora_adapter", json=body, headers=ADMIN)


def adapters(http: httpx.Client) -> dict[str, dict]:
    response = http.get("/v1/adapters", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {a["name"]: a for a in response.json()["data"]}


def state(http: httpx.Client) -> dict[str, tuple]:
    """What a failed admin call must not change: names, versions, paths, active, history."""
    return {
        name: (
            a["active_version"],
            tuple(a["previous_versions"]),
            tuple((v["version"], v["path"]) for v in a["versions"]),
        )
        for name, a in adapters(http).items()
    }


def version_info(http: httpx.Client, name: str, version: str) -> dict:
    return next(v for v in adapters(http)[name]["versions"] if v["version"] == version)


def chat(client: openai.OpenAI, model: str, max_tokens: int = TOKENS) -> str:
    response = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=max_tokens
    )
    assert response.model == model
    return response.choices[0].message.content


def chats(client: openai.OpenAI, models: list[str], max_tokens: int = TOKENS) -> list[str]:
    """Several greedy answers at once (one engine batch; answers do not depend on it)."""
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda m: chat(client, m, max_tokens), models))


async def achat(client: openai.AsyncOpenAI, model: str, max_tokens: int = TOKENS) -> str:
    response = await client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=max_tokens
    )
    return response.choices[0].message.content


def copy_adapter(src: Path, dst: Path) -> Path:
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    shutil.copytree(src, dst)
    return dst


def edit_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))
    return directory


def edit_weights(directory: Path, edit) -> Path:
    tensors = load_file(directory / WEIGHTS)
    save_file(edit(dict(tensors)), directory / WEIGHTS)
    return directory


class CreatesFileWhenUnpickled:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Made:
    """Real PEFT adapters made for this file, under the session server's adapter root."""

    root: Path
    outside: Path  # a directory that is not an adapter root
    s1: Path  # r8 attention
    s2: Path  # r8 attention, other weights
    gone: Path  # r4 MLP (unloaded under load)
    new: Path  # r16 on all 7 projections
    r32: Path
    wrong_base: Path  # manifest naming another base model fingerprint


@pytest.fixture(scope="module")
def made(adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Made:
    def build(name: str, rank: int, targets: list[str], seed: int, **kw) -> Path:
        return make_adapter(adapter_root / f"{P}-{name}", rank, targets, seed, scale=0.5, **kw)

    return Made(
        root=adapter_root,
        outside=tmp_path_factory.mktemp("outside-the-roots"),
        s1=build("s1", 8, ATTENTION, 106),
        s2=build("s2", 8, ATTENTION, 102),
        gone=build("gone", 4, MLP, 103),
        new=build("new", 16, ATTENTION + MLP, 104),
        r32=build("r32", 32, ATTENTION, 105),
        wrong_base=build(
            "wrongbase", 8, ATTENTION, 106, manifest_version="v1", fingerprint="f" * 64
        ),
    )


_CREATED: list[str] = []  # adapter names to unload at the end (the server is shared)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as session:
        yield session
        for name in _CREATED:
            unload(session, name)


def track(*names: str) -> None:
    _CREATED.extend(names)


# ------------------------------------------------------------------------- swap under load
@dataclass
class Result:
    model: str
    start: float
    end: float
    status: int
    text: str | None = None
    code: str | None = None


async def running_stream(client: openai.AsyncOpenAI, model: str) -> asyncio.Task[str]:
    """Start a long greedy stream and return once its first token has arrived."""
    started = asyncio.Event()
    task = asyncio.create_task(stream_text(client, model, started))
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raises if the stream failed
    return task


async def stream_text(client: openai.AsyncOpenAI, model: str, started: asyncio.Event) -> str:
    """A long greedy stream; `started` is set once its first token has arrived."""
    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=LONG, stream=True
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            started.set()
    return "".join(parts)


async def test_hot_swaps_under_concurrent_load(server, http, made, async_client):
    """c=8 chat traffic over the base model and 4 adapter names while an admin loads a new
    adapter, re-versions one, activates an older version, rolls back and unloads another:
    no request fails except 404s for the unloaded name once its unload returned, every answer
    is the greedy answer of the version that was active when the request arrived, and streams
    already running when their adapter changes or disappears finish on their original weights.
    """
    swap, gone, new = f"{P}-swap", f"{P}-gone", f"{P}-new"
    track(swap, gone, new)
    must_load(http, swap, made.s1)  # v1
    must_load(http, gone, made.gone)

    fixed = [BASE_MODEL, "alpha", f"{swap}@v1", gone]
    # reference answers, taken before the admin actions (one batch: the engine's greedy
    # output does not depend on batch neighbours, tests/engine/test_batching.py)
    longs = (f"{swap}@v1", gone)
    answers = await asyncio.gather(
        *[achat(async_client, m) for m in fixed], *[achat(async_client, m, LONG) for m in longs]
    )
    ref = dict(zip(fixed, answers[: len(fixed)], strict=True))
    ref_long = dict(zip(longs, answers[len(fixed) :], strict=True))
    assert len(set(ref.values())) == len(ref), f"every model must answer differently: {ref}"

    # more adapters in flight than engine.max_loras (4) LoRA slots: slots are shared too
    rotation = [BASE_MODEL, "alpha", swap, gone]
    picks = itertools.count()
    results: list[Result] = []
    stop = asyncio.Event()
    marks: dict[str, tuple[float, float]] = {}  # admin step -> (issued, returned)

    async def worker() -> None:
        while not stop.is_set():
            model = rotation[next(picks) % len(rotation)]
            start = time.monotonic()
            try:
                text = await achat(async_client, model)
            except openai.APIStatusError as exc:
                results.append(
                    Result(model, start, time.monotonic(), exc.status_code, code=exc.code)
                )
            else:
                results.append(Result(model, start, time.monotonic(), 200, text))

    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as admin:

        async def step(name: str, method: str, path: str, body: dict | None = None) -> dict:
            issued = time.monotonic()
            response = await admin.request(method, path, json=body, headers=ADMIN)
            marks[name] = (issued, time.monotonic())
            assert response.status_code == 200, response.text
            return response.json()

        async def answers_like(model: str, reference: str) -> None:
            a, b = await asyncio.gather(
                achat(async_client, model, SHORT), achat(async_client, reference, SHORT)
            )
            assert a == b, (model, reference)

        async def until(predicate) -> None:
            for _ in range(6000):  # a guard against hanging, not a timing assertion
                if predicate():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("load generator made no progress")

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        try:
            await until(lambda: len(results) >= 1)

            # a new adapter name joins the traffic
            await step(
                "new",
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": new, "lora_path": str(made.new)},
            )
            rotation.append(new)

            # re-version while a stream on the active version (v1) is running
            on_v1 = await running_stream(async_client, swap)
            reply = await step(
                "v2",
                "POST",
                "/v1/load_lora_adapter",
                {"lora_name": swap, "lora_path": str(made.s2), "version": "v2"},
            )
            assert reply["version"] == "v2"
            await answers_like(swap, f"{swap}@v2")

            await step("activate", "POST", f"/v1/adapters/{swap}/activate", {"version": "v1"})
            await answers_like(swap, f"{swap}@v1")
            await step("rollback", "POST", f"/v1/adapters/{swap}/rollback")
            await answers_like(swap, f"{swap}@v2")
            assert await on_v1 == ref_long[f"{swap}@v1"]

            # unload while a stream on it is running; it finishes, new requests get 404
            on_gone = await running_stream(async_client, gone)
            reply = await step("unload", "POST", "/v1/unload_lora_adapter", {"lora_name": gone})
            assert reply["unloaded_versions"] == ["v1"]
            with pytest.raises(openai.NotFoundError) as info:
                await achat(async_client, gone)
            assert info.value.code == "model_not_found"
            assert await on_gone == ref_long[gone]
            unloaded = marks["unload"][1]
            await until(lambda: any(r.model == gone and r.start > unloaded for r in results))
        finally:
            stop.set()
            await asyncio.gather(*workers)

    # the versions that appeared under load, now without load
    ref[new], ref[f"{swap}@v2"], *short = await asyncio.gather(
        achat(async_client, new),
        achat(async_client, f"{swap}@v2"),
        achat(async_client, f"{swap}@v1", SHORT),
        achat(async_client, f"{swap}@v2", SHORT),
    )
    assert short[0] != short[1], "answers_like() above could not tell v1 from v2"
    assert len(set(ref.values())) == len(ref)

    # which version `swap` must answer with between admin steps (None: a step was in flight)
    windows = [
        (-1.0, "v1"),
        (marks["v2"][1], "v2"),
        (marks["activate"][1], "v1"),
        (marks["rollback"][1], "v2"),
    ]
    issues = [marks["v2"][0], marks["activate"][0], marks["rollback"][0], float("inf")]

    def expected_version(r: Result) -> str | None:
        for (opened, version), closes in zip(windows, issues, strict=True):
            if r.start > opened and r.end < closes:
                return version
        return None

    assert len(results) >= 16
    unload_sent, unloaded = marks["unload"]
    for r in results:
        if r.model == gone and r.end > unload_sent:
            # overlapping the unload: a 404 (never the base model's answer), or, if it resolved
            # its adapter before the unload landed, the adapter's own answer; sent after the
            # unload returned: always a 404
            assert r.status in (200, 404), r
            if r.start > unloaded:
                assert r.status == 404, r
            if r.status == 404:
                assert r.code == "model_not_found", r
                continue
        assert r.status == 200, r
        if r.model == swap:
            assert r.text in (ref[f"{swap}@v1"], ref[f"{swap}@v2"]), r
            version = expected_version(r)
            if version is not None:
                assert r.text == ref[f"{swap}@{version}"], (r, version)
        else:
            assert r.text == ref[r.model], r
    assert {r.model for r in results} == {*rotation}
    assert any(r.model == gone and r.status == 404 for r in results)

    listing = adapters(http)
    assert gone not in listing
    assert listing[swap]["active_version"] == "v2"
    assert listing[new]["active_version"] == "v1"
    assert {"alpha", "beta", "gamma"} <= set(listing)


# ------------------------------------------------------------------------------ validation
def _state_dict_keys(directory: Path) -> list[str]:
    return sorted(load_file(directory / WEIGHTS))


def _rename(old: str, new: str):
    def edit(tensors: dict) -> dict:
        return {k.replace(old, new): v for k, v in tensors.items()}

    return edit


def _first_a(edit_tensor):
    def edit(tensors: dict) -> dict:
        key = next(k for k in sorted(tensors) if "q_proj.lora_A" in k)
        tensors[key] = edit_tensor(tensors[key])
        return tensors

    return edit


def _case_pickled(m: Made, d: Path) -> Path:
    d.mkdir()
    shutil.copy(m.s1 / CONFIG, d / CONFIG)
    torch.save(
        {"weights": CreatesFileWhenUnpickled(m.outside / "unpickled-by-server")},
        d / "adapter_model.bin",
    )
    return d


def _case_symlinked_dir(m: Made, d: Path) -> Path:
    d.symlink_to(copy_adapter(m.s1, m.outside / "target-dir"), target_is_directory=True)
    return d


def _case_symlinked_file(m: Made, d: Path) -> Path:
    d.mkdir()
    shutil.copy(m.s1 / CONFIG, d / CONFIG)
    shutil.copy(m.s1 / WEIGHTS, m.outside / "weights.safetensors")
    (d / WEIGHTS).symlink_to(m.outside / "weights.safetensors")
    return d


def _case_truncated(m: Made, d: Path) -> Path:
    copy_adapter(m.s1, d)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    return d


def _case_manifest_file(text: str):
    def case(m: Made, d: Path) -> Path:
        copy_adapter(m.s1, d)
        (d / "ragtune_adapter.json").write_text(text)
        return d

    return case


def _copy_then(*edits):
    def case(m: Made, d: Path) -> Path:
        copy_adapter(m.s1, d)
        for edit in edits:
            edit(d)
        return d

    return case


def _config(**changes):
    return lambda d: edit_config(d, **changes)


def _config_text(text: str):
    return lambda d: (d / CONFIG).write_text(text)


def _weights(edit):
    return lambda d: edit_weights(d, edit)


def _remove(name: str):
    return lambda d: (d / name).unlink()


# name -> (build the bad adapter at the given directory inside the root, or a path string
# computed from Made; a fragment the error message must contain)
BAD_ADAPTERS = {
    "wrong_base_model": (lambda m, d: m.wrong_base, "wrong base model"),
    "target_lm_head": (_copy_then(_config(target_modules=["q_proj", "lm_head"])), "lm_head"),
    "target_embed_tokens": (
        _copy_then(_config(target_modules=["embed_tokens", "v_proj"])),
        "embed_tokens",
    ),
    "target_made_up_module": (
        _copy_then(_config(target_modules=["q_proj", "flux_capacitor"])),
        "flux_capacitor",
    ),
    "weights_for_made_up_module": (
        _copy_then(_weights(_rename("self_attn.q_proj", "self_attn.warp_proj"))),
        "warp_proj",
    ),
    "weights_for_lm_head": (
        _copy_then(
            _weights(lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 576)})
        ),
        "lm_head",
    ),
    "weights_for_layer_99": (_copy_then(_weights(_rename("layers.0.", "layers.99."))), "layers"),
    "weights_of_another_shape": (
        _copy_then(_weights(_first_a(lambda a: a[:, :100].contiguous()))),
        "do not fit",
    ),
    "weights_with_nan": (
        _copy_then(_weights(_first_a(lambda a: torch.full_like(a, float("nan"))))),
        "NaN",
    ),
    "lora_b_missing": (
        _copy_then(_weights(lambda t: {k: v for k, v in t.items() if "lora_B" not in k})),
        "lora_B",
    ),
    "rank_above_max_lora_rank": (lambda m, d: m.r32, "max_lora_rank"),
    "config_rank_disagrees_with_weights": (_copy_then(_config(r=4, lora_alpha=8)), "rank"),
    "rank_not_a_number": (_copy_then(_config(r="eight")), "rank"),
    "alpha_not_a_number": (_copy_then(_config(lora_alpha=[16])), "lora_alpha"),
    "target_modules_not_a_list": (_copy_then(_config(target_modules=7)), "target_modules"),
    "pickled_weights_only": (_case_pickled, "pickled"),
    "missing_config": (_copy_then(_remove(CONFIG)), CONFIG),
    "missing_weights": (_copy_then(_remove(WEIGHTS)), "missing"),
    "truncated_safetensors": (_case_truncated, "corrupted"),
    "garbage_safetensors": (
        _copy_then(lambda d: (d / WEIGHTS).write_bytes(os.urandom(4096))),
        "corrupted",
    ),
    "config_not_json": (_copy_then(_config_text('{"r": 8, "target_modules": [')), "corrupted"),
    "config_not_an_object": (_copy_then(_config_text("[8, 16]")), "object"),
    "manifest_not_json": (_case_manifest_file("{not json"), "ragtune_adapter.json"),
    "manifest_missing_fields": (_case_manifest_file('{"name": "x"}'), "ragtune_adapter.json"),
    "dora": (_copy_then(_config(use_dora=True)), "DoRA"),
    "peft_type_prefix_tuning": (_copy_then(_config(peft_type="PREFIX_TUNING")), "PREFIX_TUNING"),
    "peft_type_loha": (_copy_then(_config(peft_type="LOHA")), "LOHA"),
    "modules_to_save": (_copy_then(_config(modules_to_save=["lm_head"])), "modules_to_save"),
    "lora_bias": (_copy_then(_config(bias="all")), "bias"),
    "symlinked_directory_to_outside": (_case_symlinked_dir, "outside the adapter roots"),
    "symlinked_file_to_outside": (_case_symlinked_file, "links outside"),
    "outside_the_roots": (lambda m, d: copy_adapter(m.s1, m.outside / "copy"), "outside"),
    "dotdot_absolute": (lambda m, d: f"{m.root}/{P}-s2/../{P}-s1", "'..'"),
    "dotdot_relative": (lambda m, d: f"../{m.outside.name}/copy", "'..'"),
    "does_not_exist": (lambda m, d: m.root / f"{P}-no-such-adapter", "not a directory"),
    "a_file_not_a_directory": (lambda m, d: m.s1 / WEIGHTS, "not a directory"),
    "nul_byte_in_path": (lambda m, d: f"{m.s1}\x00evil", "cannot be used"),
    "path_too_long": (lambda m, d: f"{m.root}/{'x' * 5000}", "cannot be used"),
}


@pytest.fixture(scope="module")
def victim(http, made, client) -> tuple[str, str]:
    """An adapter every bad load targets (as its v2): it must keep answering as v1 (checked
    once after all cases, which keeps this file cheap on CPU)."""
    name = f"{P}-victim"
    track(name)
    must_load(http, name, made.s1)
    return name, chat(client, name, 4)


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_bad_adapter_is_refused_and_changes_nothing(case, http, made, victim, client):
    build, fragment = BAD_ADAPTERS[case]
    directory = made.root / f"{P}-bad-{case}"
    path = build(made, directory)
    name, _ = victim
    before = state(http)

    response = load(http, name, path, version="v2")

    error = assert_error(response, 400, code="invalid_adapter")
    assert fragment in error["message"], error
    assert error["param"] in ("lora_path", "lora_name")
    assert state(http) == before
    assert not (made.outside / "unpickled-by-server").exists()


def test_after_the_bad_loads_the_victim_answers_as_before(victim, client):
    name, answer = victim
    assert chats(client, [name, f"{name}@v1"], 4) == [answer, answer]
    with pytest.raises(openai.NotFoundError):
        chat(client, f"{name}@v2", 4)


def test_the_pickle_payload_would_have_run(made, tmp_path):
    """Makes the pickled-weights case meaningful: the same payload does create its marker
    when something unpickles it (here, on purpose, in the test process)."""
    payload = pickle.dumps({"weights": CreatesFileWhenUnpickled(tmp_path / "canary")})
    pickle.loads(payload)  # our own object, never a user file
    assert (tmp_path / "canary").exists()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "has space",
        "a@b",
        "-leading-dash",
        "x" * 65,
        "trailing-newline\n",
        "../up",
        "a/b",
        "ümlaut",
        BASE_MODEL,
    ],
)
def test_invalid_adapter_names_are_refused(name, http, made):
    before = state(http)
    assert_error(load(http, name, made.s1), 400, code="invalid_adapter", param="lora_name")
    assert state(http) == before


@pytest.mark.parametrize("version", ["", "v 1", "v1@x", "v1\n", "../v1", "x" * 65])
def test_invalid_versions_are_refused(version, http, made):
    before = state(http)
    response = load(http, f"{P}-badversion", made.s1, version=version)
    assert_error(response, 400, code="invalid_adapter", param="version")
    assert state(http) == before


def test_same_name_and_version_needs_replace(http, made, client):
    name, other = f"{P}-clash", f"{P}-clash-other"
    track(name, other)
    must_load(http, name, made.s1)
    must_load(http, other, made.s2)
    first, second = chats(client, [name, other])
    assert first != second
    before = state(http)

    error = assert_error(load(http, name, made.s2), 400, code="invalid_adapter", param="lora_name")
    assert "replace" in error["message"]
    error = assert_error(load(http, name, made.s2, version="v1"), 400, param="lora_name")
    assert state(http) == before
    assert chat(client, name) == first

    reply = must_load(http, name, made.s2, replace=True)
    assert reply["version"] == "v1"
    listing = adapters(http)[name]
    assert [v["version"] for v in listing["versions"]] == ["v1"]
    assert listing["versions"][0]["path"] == str(made.s2.resolve())
    assert chats(client, [name, f"{name}@v1"]) == [second, second]


def test_manifest_version_is_used_and_checked(http, made, client):
    name = f"{P}-manifest"
    track(name)
    fingerprint = model_fingerprint(resolve_model_dir("bundled", default_home()), default_home())
    directory = copy_adapter(made.s1, made.root / f"{P}-with-manifest")
    AdapterManifest(
        name=name,
        version="2024-06-01",
        base_model_fingerprint=fingerprint,
        method="lora",
        rank=8,
        target_modules=ATTENTION,
        data_hash="abc123",
    ).write(directory)
    assert must_load(http, name, directory)["version"] == "2024-06-01"
    info = version_info(http, name, "2024-06-01")
    assert info["manifest"]["data_hash"] == "abc123"
    assert info["manifest"]["base_model_fingerprint"] == fingerprint
    # an explicit version wins over the manifest's
    assert must_load(http, name, directory, version="v9")["version"] == "v9"

    bad = copy_adapter(made.s1, made.root / f"{P}-bad-manifest-version")
    AdapterManifest(
        name=name, version="not a version!", base_model_fingerprint=fingerprint, method="lora"
    ).write(bad)
    before = state(http)
    error = assert_error(load(http, name, bad), 400, code="invalid_adapter")
    assert "version" in error["message"]
    assert state(http) == before


def test_rank_pattern_adapter_serves_like_peft(http, made, client, tmp_path):
    """PEFT's rank_pattern gives modules their own ranks; such an adapter must load and answer
    (it used to be accepted and then crash the engine thread when it took a LoRA slot)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(107)
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir("bundled", default_home()), dtype=torch.float32
    )
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 4},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    directory = made.root / f"{P}-rank-pattern"
    get_peft_model(base, config).save_pretrained(directory, safe_serialization=True)
    name = f"{P}-rank-pattern"
    track(name)
    assert must_load(http, name, directory)["version"] == "v1"
    assert version_info(http, name, "v1")["rank"] == 8
    text, base = chats(client, [name, BASE_MODEL])
    assert text and text != base


# ---------------------------------------------------------------------- auth and not-found
ADMIN_ROUTES = [
    ("POST", "/v1/load_lora_adapter", {"lora_name": f"{P}-x", "lora_path": "x"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"}),
    ("GET", "/v1/adapters", None),
    ("POST", "/v1/adapters/alpha/activate", {"version": "v1"}),
    ("POST", "/v1/adapters/alpha/rollback", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_need_the_admin_key(method, path, body, http):
    before = state(http)
    assert_error(http.request(method, path, json=body), 401, code="missing_api_key")
    wrong = {"Authorization": "Bearer not-a-key"}
    assert_error(http.request(method, path, json=body, headers=wrong), 401, code="invalid_api_key")
    error = assert_error(
        http.request(method, path, json=body, headers=CLIENT), 403, code="insufficient_scope"
    )
    assert error["type"] == "permission_error"
    assert state(http) == before


def test_malformed_admin_bodies_are_400(http, made):
    before = state(http)
    for path, body, param in (
        ("/v1/load_lora_adapter", {"lora_path": str(made.s1)}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": f"{P}-m"}, "lora_path"),
        ("/v1/load_lora_adapter", {"lora_name": 5, "lora_path": str(made.s1)}, "lora_name"),
        ("/v1/load_lora_adapter", {"lora_name": f"{P}-m", "lora_path": "x", "bogus": 1}, "bogus"),
        (
            "/v1/load_lora_adapter",
            {"lora_name": f"{P}-m", "lora_path": "x", "replace": "maybe"},
            "replace",
        ),
        ("/v1/adapters/alpha/activate", {}, "version"),
        ("/v1/unload_lora_adapter", {}, "lora_name"),
    ):
        response = http.post(path, json=body, headers=ADMIN)
        assert_error(response, 400, code="invalid_value", param=param)
    headers = {**ADMIN, "Content-Type": "application/json"}
    response = http.post("/v1/load_lora_adapter", content=b"{not json", headers=headers)
    assert_error(response, 400, code="invalid_json")
    assert state(http) == before
    # vLLM clients send lora_int_id; it is accepted and ignored
    name = f"{P}-vllm"
    track(name)
    must_load(http, name, made.s1)
    body = {"lora_name": name, "lora_int_id": 7}
    assert http.post("/v1/unload_lora_adapter", json=body, headers=ADMIN).status_code == 200


def test_unknown_adapters_and_versions_are_404(http, client):
    before = state(http)
    missing = f"{P}-never-loaded"
    for response in (
        unload(http, missing),
        unload(http, "alpha", "v404"),
        http.post(f"/v1/adapters/{missing}/activate", json={"version": "v1"}, headers=ADMIN),
        http.post("/v1/adapters/alpha/activate", json={"version": "v404"}, headers=ADMIN),
        http.post(f"/v1/adapters/{missing}/rollback", headers=ADMIN),
    ):
        assert_error(response, 404, code="adapter_not_found")
    # a known adapter with no earlier version has nothing to roll back to
    assert_error(http.post("/v1/adapters/alpha/rollback", headers=ADMIN), 400, param="lora_name")
    assert state(http) == before

    for model in ("alpha@nope", "alpha@", f"{missing}", f"{missing}@v1", "@v1"):
        with pytest.raises(openai.NotFoundError) as info:
            chat(client, model, 2)
        assert info.value.code == "model_not_found", model
        assert info.value.param == "model"


# -------------------------------------------------------------------------- listing/registry
def test_models_and_adapters_listings(http, made, client):
    name = f"{P}-listed"
    track(name)
    must_load(http, name, made.s1)
    reply = must_load(http, name, made.s2, version="v2", activate=False)
    assert reply["version"] == "v2"

    cards = {m.id: m for m in client.models.list().data}
    assert cards[BASE_MODEL].parent is None
    for model_id in ("alpha", "alpha@v1", name, f"{name}@v1", f"{name}@v2"):
        assert cards[model_id].parent == BASE_MODEL, model_id
    assert cards[name].root == str(made.s1.resolve())  # the active version
    assert cards[f"{name}@v2"].root == str(made.s2.resolve())

    listing = adapters(http)[name]
    assert listing["active_version"] == "v1"  # "activate": false left v1 active
    assert listing["previous_versions"] == []
    v1, v2 = listing["versions"]
    for info, path in ((v1, made.s1), (v2, made.s2)):
        assert info["path"] == str(path.resolve())
        assert info["resident"] is True
        assert info["memory_bytes"] > 0
        assert info["rank"] == 8
        assert info["target_modules"] == sorted(ATTENTION)
        assert info["requests"] == 0 and info["last_used"] is None
    assert v1["memory_bytes"] == v2["memory_bytes"]  # same shapes
    bigger = adapters(http)["beta"]["versions"][0]  # r16 on all 7 projections
    assert bigger["memory_bytes"] > v1["memory_bytes"]

    active, explicit, pinned = chats(client, [name, f"{name}@v2", f"{name}@v1"])
    assert active == pinned != explicit
    v1 = version_info(http, name, "v1")
    v2 = version_info(http, name, "v2")
    assert (v1["requests"], v2["requests"]) == (2, 1)
    assert v1["last_used"] >= v1["loaded_at"] and v2["last_used"] >= v2["loaded_at"]

    # unloading one version keeps the other; the name and its ids follow
    assert unload(http, name, "v2").json()["unloaded_versions"] == ["v2"]
    ids = {m.id for m in client.models.list().data}
    assert {name, f"{name}@v1"} <= ids and f"{name}@v2" not in ids


def test_activate_and_rollback_semantics(http, made, client):
    name = f"{P}-history"
    track(name)
    must_load(http, name, made.s1, activate=False)  # the first version is active anyway
    assert adapters(http)[name]["active_version"] == "v1"
    must_load(http, name, made.s2, version="v2")  # v2 active, v1 previous
    assert adapters(http)[name]["previous_versions"] == ["v1"]
    activate = http.post(f"/v1/adapters/{name}/activate", json={"version": "v1"}, headers=ADMIN)
    assert activate.json() == {"status": "ok", "lora_name": name, "active_version": "v1"}
    assert adapters(http)[name]["previous_versions"] == ["v1", "v2"]
    rollback = http.post(f"/v1/adapters/{name}/rollback", headers=ADMIN)
    assert rollback.json()["active_version"] == "v2"
    rollback = http.post(f"/v1/adapters/{name}/rollback", headers=ADMIN)
    assert rollback.json()["active_version"] == "v1"
    assert_error(http.post(f"/v1/adapters/{name}/rollback", headers=ADMIN), 400)
    assert adapters(http)[name]["active_version"] == "v1"
    # unloading the active version falls back to the previous one... or the remaining one
    must_load(http, name, made.s2, version="v3")
    assert unload(http, name, "v3").status_code == 200
    assert adapters(http)[name]["active_version"] == "v1"
    active, pinned = chats(client, [name, f"{name}@v1"], 4)
    assert active == pinned
    assert unload(http, name).json()["unloaded_versions"] == ["v1", "v2"]
    assert name not in adapters(http)


# ------------------------------------------------------------------------------- audit log
def test_every_admin_action_is_audited_without_the_key(http, made, audit_log):
    name = f"{P}-audited"
    track(name)
    actions = [
        (lambda: load(http, name, made.s1), "load_adapter", "ok", "v1"),
        (lambda: load(http, name, made.root / "nope", version="v2"), "load_adapter", "error", None),
        (
            lambda: http.post(
                f"/v1/adapters/{name}/activate", json={"version": "v9"}, headers=ADMIN
            ),
            "activate_adapter",
            "error",
            "v9",
        ),
        (lambda: load(http, name, made.s2, version="v2"), "load_adapter", "ok", "v2"),
        (
            lambda: http.post(
                f"/v1/adapters/{name}/activate", json={"version": "v1"}, headers=ADMIN
            ),
            "activate_adapter",
            "ok",
            "v1",
        ),
        (
            lambda: http.post(f"/v1/adapters/{name}/rollback", headers=ADMIN),
            "rollback_adapter",
            "ok",
            "v2",
        ),
        (lambda: unload(http, name, "v9"), "unload_adapter", "error", None),
        (lambda: unload(http, name), "unload_adapter", "ok", "v1,v2"),
        (
            lambda: http.post(f"/v1/adapters/{name}/rollback", headers=ADMIN),
            "rollback_adapter",
            "error",
            None,
        ),
    ]
    for call, *_ in actions:
        call()

    text = audit_log.read_text()
    assert ADMIN_KEY not in text and API_KEY not in text
    entries = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    mine = [e for e in entries if e.get("adapter") == name]
    assert [(e["action"], e["result"]) for e in mine] == [(a, r) for _, a, r, _ in actions]
    key_id = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()[:8]
    for entry, (_, _, result, version) in zip(mine, actions, strict=True):
        assert {"time", "key_id", "action", "adapter", "version", "result"} <= set(entry)
        assert datetime.fromisoformat(entry["time"]).tzinfo is not None
        assert entry["key_id"] == key_id
        if version is not None:
            assert entry["version"] == version, entry
        if result == "error":
            assert entry["error"], entry
    preloads = [e for e in entries if e["action"] == "preload_adapter"]
    assert {e["adapter"] for e in preloads} >= {"alpha", "beta", "gamma"}


# ------------------------------------------------------------------------------- residency
@pytest.fixture(scope="module")
def small_server(tmp_path_factory, adapter_root: Path):
    """A second server that keeps at most 2 adapter versions in memory."""
    log = tmp_path_factory.mktemp("small-server") / "server.log"
    env = {
        **SERVER_ENV,
        "RAGTUNE_ADAPTERS__ROOTS": json.dumps([str(adapter_root)]),
        "RAGTUNE_AUDIT_LOG": str(log.parent / "audit.log"),
        "RAGTUNE_ADAPTERS__MAX_CPU_LORAS": "2",
    }
    running = start_server(env, log)
    yield running
    running.stop()


def test_residency_is_bounded_and_evicted_adapters_reload(small_server, http, made, client):
    small = openai.OpenAI(base_url=small_server.v1, api_key=API_KEY, max_retries=0, timeout=120)
    names = ["alpha", "beta", "gamma", f"{P}-s1"]
    paths = [made.root / "alpha", made.root / "beta", made.root / "gamma", made.s1]
    track(f"{P}-s1")
    must_load(http, f"{P}-s1", made.s1)  # the reference answers come from the main server
    reference = dict(zip(names, chats(client, names), strict=True))

    with httpx.Client(base_url=small_server.base_url, timeout=120) as admin:

        def resident() -> set[str]:
            return {
                name for name, a in adapters(admin).items() for v in a["versions"] if v["resident"]
            }

        for name, path in zip(names, paths, strict=True):
            must_load(admin, name, path)
            assert len(resident()) <= 2
        assert resident() == set(names[2:])
        evicted = adapters(admin)["alpha"]["versions"][0]
        assert evicted["memory_bytes"] == 0
        # each call evicts the least recently used: every one of these is a reload
        for name in names:
            assert name not in resident()
            assert chat(small, name) == reference[name], name
            assert name in resident() and len(resident()) <= 2
        assert {n: adapters(admin)[n]["versions"][0]["requests"] for n in names} == dict.fromkeys(
            names, 1
        )
        metrics = admin.get("/metrics", headers=CLIENT).text
        for event, at_least in (("load", 4), ("evict", 6), ("reload", 4)):
            line = f'ragtune_adapter_events_total{{event="{event}",result="ok"}}'
            count = float(next(x for x in metrics.splitlines() if x.startswith(line)).split()[-1])
            assert count >= at_least, (event, count)

        # an evicted version is reloaded only from the very files it was loaded from
        moved = copy_adapter(made.s1, made.root / f"{P}-tamper-inplace")
        linked = copy_adapter(made.s1, made.root / f"{P}-tamper-link")
        must_load(admin, "inplace", moved)
        must_load(admin, "linked", linked)
        must_load(admin, "gamma", paths[2], version="v2")  # evicts both
        must_load(admin, "beta", paths[1], version="v2")
        assert not {"inplace", "linked"} & resident()
        data = (moved / WEIGHTS).read_bytes()  # retrained in place (same bytes even)
        (moved / WEIGHTS).unlink()
        (moved / WEIGHTS).write_bytes(data)
        outside = made.outside / "tamper.safetensors"
        shutil.copy(linked / WEIGHTS, outside)
        (linked / WEIGHTS).unlink()
        (linked / WEIGHTS).symlink_to(outside)
        for name in ("inplace", "linked"):
            request = {"model": name, "messages": MESSAGES, "max_tokens": 2}
            response = admin.post("/v1/chat/completions", json=request, headers=CLIENT)
            assert response.status_code >= 500, response.text
            error = assert_error(response, response.status_code)
            assert str(made.root) not in error["message"]
        # an admin loading it again (from the files now there) makes it answer again
        must_load(admin, "inplace", moved, replace=True)
        assert chat(small, "inplace") == reference[f"{P}-s1"]
        assert_error(load(admin, "linked", linked, replace=True), 400, code="invalid_adapter")
        assert len(resident()) <= 2

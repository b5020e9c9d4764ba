"""`ragtune index ...`: build, add to, delete, list, search and inspect indexes.

Exit codes: 0 success, 1 unknown or unusable index, 2 bad input (name, path, arguments).
Only argparse is imported at module level so `ragtune --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

MODES = ("dense", "bm25", "hybrid")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `index` command and its subcommands to the `ragtune` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--root", help="index directory (default: retrieval.root, else $RAGTUNE_HOME/indexes)"
    )
    common.add_argument("--config", help="YAML config file (default: configs/default.yaml)")

    parser = subparsers.add_parser("index", help="Build and search document indexes (RAG).")
    sub = parser.add_subparsers(dest="index_command", required=True)

    for command, help_text, handler in (
        ("build", "Create or replace an index from files and directories.", _audited(_run_build)),
        ("add", "Add or refresh documents in an existing index.", _audited(_run_add)),
    ):
        cmd = sub.add_parser(command, parents=[common], help=help_text)
        cmd.add_argument("--name", required=True, help="index name")
        cmd.add_argument(
            "--source", required=True, nargs="+", metavar="PATH", help="files or directories"
        )
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")
        cmd.set_defaults(handler=_guard(handler))

    delete = sub.add_parser("delete", parents=[common], help="Delete an index.")
    delete.add_argument("name")
    delete.set_defaults(handler=_guard(_audited(_run_delete)))

    listing = sub.add_parser("list", parents=[common], help="List indexes.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_guard(_run_list))

    search = sub.add_parser("search", parents=[common], help="Search an index.")
    search.add_argument("name")
    search.add_argument("query")
    search.add_argument("--top-k", type=int, default=None, help="hits to return (default 5)")
    search.add_argument("--mode", choices=MODES, default=None, help="default: hybrid")
    search.add_argument("--min-score", type=float, default=None, help="drop weaker hits")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(handler=_guard(_run_search))

    info = sub.add_parser("info", parents=[common], help="Show an index's manifest facts.")
    info.add_argument("name")
    info.set_defaults(handler=_guard(_run_info))


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn retrieval errors into a one-line message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from retrieval.errors import InvalidIndexNameError, RetrievalError

        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        try:
            return handler(args)
        except InvalidIndexNameError as exc:
            print(f"ragtune: error: {exc}", file=sys.stderr)
            return 2
        except RetrievalError as exc:
            print(f"ragtune: error: {exc}", file=sys.stderr)
            return 1

    run.__name__ = handler.__name__
    return run


AUDITED_ACTIONS = {"_run_build": "build_index", "_run_add": "add_to_index"}


def _audited(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Record index changes in the same audit log as the admin API, as `cli:<user>`."""
    action = AUDITED_ACTIONS.get(handler.__name__, "delete_index")

    def run(args: argparse.Namespace) -> int:
        import getpass

        from ragtune.audit import AuditLog
        from ragtune.config import load_settings

        log = AuditLog(load_settings(args.config).audit_path())
        fields: dict[str, Any] = {"index": args.name, "sources": getattr(args, "source", None)}
        who = f"cli:{getpass.getuser()}"
        try:
            code = handler(args)
        except Exception as exc:
            log.record(who, action, "error", error=str(exc), **fields)
            raise
        log.record(who, action, "ok", **fields)
        return code

    run.__name__ = handler.__name__
    return run


def _store(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from ragtune.config import load_settings
    from retrieval.config import RetrievalConfig
    from retrieval.store import IndexStore

    settings = load_settings(args.config)
    config = getattr(settings, "retrieval", None) or RetrievalConfig()
    if args.root:
        config = config.model_copy(update={"root": Path(args.root)})
    elif settings.store.url is not None:  # the shared store (docs/deploy.md)
        return _shared_store(settings)
    return IndexStore.from_config(config, home=settings.home)


def _shared_store(settings: Any) -> Any:
    """Indexes in the store servers share: a remote one is brought up to date in the local
    cache first, and every change is published back (retrieval/mirror.py)."""
    from ragtune.store import open_store
    from retrieval.mirror import IndexMirror
    from retrieval.store import IndexStore

    shared = open_store(settings)
    config = settings.retrieval.model_copy(update={"root": shared.local("indexes")})
    store = IndexStore.from_config(config, home=settings.home)
    if shared.remote:
        mirror = IndexMirror(shared)
        mirror.pull()
        store.on_change = mirror.push
    return store


def _print_report(verb: str, report: Any) -> None:
    print(
        f"{verb} index {report.name!r} ({report.generation}): {report.documents} documents, "
        f"{report.chunks} chunks; added {len(report.added)}, updated {len(report.updated)}, "
        f"unchanged {len(report.unchanged)}, removed {len(report.removed)}; "
        f"embedded {report.embedded_chunks} chunks in {report.seconds:.1f}s"
    )
    for source, reason in report.skipped:
        print(f"skipped {source}: {reason}", file=sys.stderr)


def _run_build(args: argparse.Namespace) -> int:
    report = _store(args).build(args.name, args.source, progress=False if args.quiet else None)
    _print_report("built", report)
    return 0


def _run_add(args: argparse.Namespace) -> int:
    report = _store(args).add(args.name, args.source, progress=False if args.quiet else None)
    _print_report("updated", report)
    return 0


def _run_delete(args: argparse.Namespace) -> int:
    _store(args).delete(args.name)
    print(f"deleted index {args.name!r}")
    return 0


def _run_list(args: argparse.Namespace) -> int:
    from retrieval.errors import IndexUnavailableError

    entries = _store(args).list_indexes()
    if args.json:
        print(
            json.dumps(
                [
                    {"error": str(entry)}
                    if isinstance(entry, IndexUnavailableError)
                    else entry.to_dict()
                    for entry in entries
                ],
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    if not entries:
        print("no indexes")
        return 0
    print(f"{'NAME':<24} {'DOCS':>6} {'CHUNKS':>8} {'DENSE':<6} UPDATED")
    for entry in entries:
        if isinstance(entry, IndexUnavailableError):
            print(f"unavailable: {entry}")
        else:
            print(
                f"{entry.name:<24} {entry.documents:>6} {entry.chunks:>8} {entry.dense:<6} "
                f"{entry.updated_at}"
            )
    return 0


def _run_search(args: argparse.Namespace) -> int:
    store = _store(args)
    top_k = args.top_k if args.top_k is not None else store.config.default_top_k
    mode = args.mode or store.config.default_mode
    hits = store.get(args.name).search(args.query, top_k=top_k, mode=mode, min_score=args.min_score)
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print("no hits")
    for hit in hits:
        heading = " > ".join(hit.heading)
        where = f"{hit.source}" + (f" § {heading}" if heading else "")
        print(f"[{hit.rank}] {hit.score:.4f}  {where}  ({hit.chunk_id}, {hit.start}-{hit.end})")
        snippet = " ".join(hit.text.split())
        print(f"    {snippet[:300]}{'…' if len(snippet) > 300 else ''}")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    info = _store(args).info(args.name)
    print(json.dumps(info.to_dict(), indent=2, ensure_ascii=False))
    return 0

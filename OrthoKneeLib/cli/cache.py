"""The `cache` command: what the feature cache holds, pruning and compaction."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from .common import cache_dir


def cmd_cache(args: argparse.Namespace) -> int:
    from collections import defaultdict

    from ..bundle import Bundle
    from ..featurecache import compact_cache, prune_cache, scan_cache
    from ..progress import TextProgress

    if args.keep_bundle and not args.prune:
        raise InputError(
            None, "--keep-bundle only says what `--prune` keeps.", "Add --prune (and --dry-run to look first)."
        )
    if args.compact and args.prune:
        raise InputError(None, "--compact and --prune are two runs.", "Run `--prune` first, then `--compact`.")
    root = cache_dir(args)
    if args.compact:
        converted, before, after = compact_cache(
            root, dry_run=args.dry_run, progress=TextProgress("compact", unit="entry")
        )
        verb = "would rewrite" if args.dry_run else "rewrote"
        print(
            f"{root}: {verb} the features of {converted} entries in 8 bits: {before / 2**30:.2f} GB -> "
            f"{after / 2**30:.2f} GB{' (estimated)' if args.dry_run else ''}"
        )
        return 0
    kept = {}
    for path in args.keep_bundle or []:
        bundle = Bundle.open(path)
        kept[bundle.hash] = f"{bundle.metadata.get('name')} {bundle.metadata.get('version')} ({path})"
    if args.prune:
        for bundle_hash, name in kept.items():
            print(f"  keeping bundle {bundle_hash[:12]}: {name}")
        removed = prune_cache(root, kept if args.keep_bundle else None, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for entry, reason in removed:
            print(f"  {verb} {entry.path.name} ({entry.bytes / 2**20:.0f} MB): {reason}")
        print(f"{root}: {verb} {len(removed)} entries, {sum(e.bytes for e, _ in removed) / 2**30:.2f} GB")
        return 0
    entries = scan_cache(root)
    if not entries:
        print(f"{root}: no cache entries")
        return 0
    by_bundle: dict[str, list] = defaultdict(list)
    for e in entries:
        by_bundle["stale" if e.stale else (e.bundle_hash or "being written")].append(e)
    print(f"{root}: {len(entries)} entries, {sum(e.bytes for e in entries) / 2**30:.2f} GB")
    for key, group in sorted(by_bundle.items(), key=lambda kv: -sum(e.bytes for e in kv[1])):
        label = key if key in ("stale", "being written") else f"bundle {key[:12]}"
        print(f"  {label}: {len(group)} entries, {sum(e.bytes for e in group) / 2**30:.2f} GB")
        if key == "stale":
            for e in group[:5]:
                print(f"    {e.path.name}: {e.stale}")
            if len(group) > 5:
                print(f"    ... and {len(group) - 5} more")
    if by_bundle.get("stale"):
        print("`orthoknee cache --prune` removes the stale entries; add --keep-bundle B to also remove other bundles'.")
    return 0


def register(sub) -> None:
    """Add this module's commands to the `orthoknee` subcommands."""
    p = sub.add_parser("cache", help="what the feature cache holds; --prune frees what no case or bundle can use")
    p.add_argument("--cache", type=Path, help="feature cache (default $ORTHOKNEE_CACHE or ~/.cache/orthoknee/features)")
    p.add_argument(
        "--prune",
        action="store_true",
        help="remove stale entries (case folder gone, case files changed, interrupted writes)",
    )
    p.add_argument(
        "--keep-bundle",
        type=Path,
        nargs="+",
        metavar="BUNDLE",
        help="with --prune: also remove every entry of a bundle not named here",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="rewrite the float16 features of entries cached before 8-bit features, in place (half the disk)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="with --prune or --compact: say what would change, change nothing"
    )
    p.set_defaults(func=cmd_cache)

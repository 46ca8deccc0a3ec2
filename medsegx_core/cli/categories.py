"""``medsegx categories [--search TEXT] [--level LEVEL] [--json]``: list the anatomy hierarchy.

Without options: the tree, indented by level, tasks grouped where the tree groups them (FreeSurfer families).
With ``--search``: the matching nodes with their paths (fuzzy neighbours when nothing contains the words), and
how the text itself resolves.
"""
from __future__ import annotations

import json
import sys

from ..data.hierarchy import LEVEL_NAMES, LEVEL_TITLES, Node, load_hierarchy
from ..errors import UnknownTermError


def _describe(node: Node) -> dict:
    return {"name": node.name, "level": LEVEL_NAMES[node.level], "index": node.index, "path": list(node.path),
            "medsegdb": node.medsegdb, "labels": list(node.source_labels), "synonyms": list(node.synonyms),
            "group": node.group}


def _tree_lines(node: Node, level_limit: int) -> list[str]:
    lines = [f"{'  ' * node.level}{node.name}" + (f"  [{LEVEL_TITLES[node.level]}]" if node.level < 4 else "")]
    if node.level >= level_limit:
        return lines
    group, first_seen = None, {}
    for child in node.children:
        first_seen.setdefault(child.group, len(first_seen) if child.group else -1)
    for child in sorted(node.children, key=lambda c: first_seen[c.group]):   # stable: tree order within a group
        if child.group and child.group != group:
            group = child.group
            lines.append(f"{'  ' * child.level}-- {group}")
        lines += _tree_lines(child, level_limit)
    return lines


def run(args) -> int:
    hierarchy = load_hierarchy()
    out = sys.stdout
    level_limit = LEVEL_NAMES.index(args.level) if args.level else 4
    if args.search:
        nodes = [n for n in hierarchy.search(args.search) if n.level <= level_limit]
        try:
            resolved = hierarchy.resolve(args.search)
            best = f"{args.search!r} resolves to {resolved.name!r} ({resolved.match}): {' > '.join(resolved.path)}"
        except UnknownTermError as error:
            best = str(error)
        if args.json:
            json.dump({"query": args.search, "resolution": best, "matches": [_describe(n) for n in nodes]}, out,
                      indent=1)
            out.write("\n")
            return 0
        out.write(best + "\n")
        for node in nodes:
            out.write(f"{node.name:45s} {LEVEL_TITLES[node.level]:13s} {' > '.join(node.path[1:-1])}\n")
        out.write(f"{len(nodes)} match(es)\n")
        return 0
    if args.json:
        json.dump({"version": hierarchy.version, "table_rows": hierarchy.table_sizes(),
                   "modalities": [m.name for m in hierarchy.modalities],
                   "nodes": [_describe(n) for n in hierarchy.nodes() if n.level <= level_limit]}, out, indent=1)
        out.write("\n")
        return 0
    out.write(f"anatomy hierarchy version {hierarchy.version}; modalities: "
              f"{', '.join(m.name for m in hierarchy.modalities)}\n")
    out.write("\n".join(_tree_lines(hierarchy.root, level_limit)) + "\n")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("categories", help="list or search the anatomical structures (text prompts)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", metavar="TEXT", help="show the structures matching TEXT and how TEXT resolves")
    parser.add_argument("--level", choices=LEVEL_NAMES[1:], help="list only down to this level")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)

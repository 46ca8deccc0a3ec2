"""The module's keyboard shortcuts: the widget binds each action to its handler, the module's help lists them."""
from __future__ import annotations

#: (action, key sequence, what it does)
SHORTCUTS = (
    ("include", "I", "place include points (click inside the structure)"),
    ("exclude", "E", "place exclude points (click where the result leaks)"),
    ("box", "Shift+B", "draw a box (ROI) around the structure"),
    ("segment", "Ctrl+Return", "segment now (Enter in the structure field does the same)"),
    ("undo", "Z", "undo the last result"),
    ("nextSegment", "N", "start the next segment: clear the clicks, new segment"),
    ("clearPrompts", "C", "clear the clicks"),
    ("cancel", "Escape", "cancel the running request"),
)


def shortcuts_help() -> str:
    """The shortcuts as an HTML list for the module's help text."""
    return "<ul>" + "".join(f"<li><b>{key}</b>: {what}</li>" for _action, key, what in SHORTCUTS) + "</ul>"

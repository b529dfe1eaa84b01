"""`docs/state-machines.md`, generated from the machine declarations (`manage.py machines_doc`)."""

from __future__ import annotations

from fleetops.lib.diagram import mermaid, who
from fleetops.lib.machine import Machine, machines

HEADER = """# State machines

Generated from the declarations in code by `manage.py machines_doc`; do not edit by hand (a test
fails when this page and the code disagree). Each admin detail page draws the same machine with the
object's current state highlighted.

An edge is labelled with the lowest role a person needs to take it; `engine` edges are taken only by
the portal's own processes (the scheduler and system actors, see `fleetops.access.roles`), and
`<role> + engine` edges by both. Every
edge goes through the transition kernel (`fleetops.lib.transition`): a compare-and-set UPDATE
whose allowed from-states come from this declaration, with the audit row in the same transaction.
"""


def render(declared: list[Machine] | None = None) -> str:
    parts = [HEADER]
    for m in declared if declared is not None else machines():
        parts.append(f"\n## `{m.name}`\n")
        if m.description:
            parts.append(f"\n{m.description.strip()}\n")
        finals = ", ".join(f"`{s}`" for s in m.states if s in m.terminal) or "none"
        parts.append(
            f"\nColumn `{m.field}`; starts at `{m.initial}`; final states: {finals}.\n\n"
            f"```mermaid\n{mermaid(m)}\n```\n\n"
            "| from | to | who |\n|---|---|---|\n"
        )
        for e in m.edges:
            parts.append(f"| `{e.source}` | `{e.target}` | {who(e)} |\n")
    return "".join(parts)

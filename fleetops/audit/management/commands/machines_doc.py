"""Write (or `--check`) docs/state-machines.md from the state machine declarations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError, CommandParser

from fleetops.lib.commands import OperatorCommand
from fleetops.lib.machines_doc import render

DOC = Path(settings.BASE_DIR) / "docs" / "state-machines.md"


class Command(OperatorCommand):
    help = "Regenerate docs/state-machines.md from the state machines declared in code."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--check", action="store_true", help="exit non-zero when the page is stale")

    def handle(self, *args: Any, **options: Any) -> None:
        text = render()
        if options["check"]:
            if not DOC.exists() or DOC.read_text() != text:
                raise CommandError(f"{DOC} is stale: run `manage.py machines_doc`")
            self.stdout.write("docs/state-machines.md is current")
            return
        DOC.write_text(text)
        self.stdout.write(f"wrote {DOC}")

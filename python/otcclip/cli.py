"""The `otcclip` command line: one click group, one module per subcommand.

Each subcommand lives in `otcclip.commands.<name>` and is imported only when
invoked, so `otcclip --help` stays fast (no torch import).
"""

from __future__ import annotations

import importlib

import click

_COMMANDS = {
    "match": "Re-pair (or flag) image-caption pairs by OT matching; writes a parquet.",
    "train": "Train CLIP from scratch with a defense against poisoning.",
    "poison": "Build fashion-scenes (or read data) and write a poisoned copy with a manifest.",
    "eval": "Evaluate a checkpoint: zero-shot, linear probe, ASR, retrieval.",
    "demo": "The end-to-end demo on the embedded fashion-scenes data.",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module = importlib.import_module(f"otcclip.commands.{name}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(_COMMANDS.items()))


@click.group(cls=_LazyGroup)
@click.version_option(package_name="otcclip")
def main() -> None:
    """Robust CLIP pre-training against data poisoning (OTCCLIP)."""


if __name__ == "__main__":
    main()

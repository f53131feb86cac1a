"""Checks every command runs on its arguments before any work starts.

A user's mistake in an output path used to surface only after the whole run (minutes
of training or matching), as a traceback, sometimes with part of the results already
written. These turn it into a one-line `click` error before anything is read or written.
"""

from __future__ import annotations

from pathlib import Path

import click

from otcclip.atomic import file_target_problem, same_file


def output_files(outputs: dict[str, Path | None], inputs: dict[str, Path | None]) -> None:
    """Refuse output files that cannot be written, that repeat, or that would replace an input.

    `outputs` / `inputs` map an option name (`--out`) to its path (None: not given).
    """
    given = [(hint, path) for hint, path in outputs.items() if path is not None]
    for i, (hint, path) in enumerate(given):
        problem = file_target_problem(path)
        if problem is not None:
            raise click.BadParameter(problem, param_hint=hint)
        for other_hint, other in given[:i]:
            if same_file(path, other):
                raise click.BadParameter(
                    f"{path} is also {other_hint}: give each output its own file",
                    param_hint=hint,
                )
        for in_hint, source in inputs.items():
            if source is not None and same_file(path, source):
                raise click.BadParameter(
                    f"{path} is the {in_hint} input: writing there would replace it; "
                    "choose another file",
                    param_hint=hint,
                )

"""The exit statuses of ``train.py`` and ``audit.py``: one table, at the end of both
``--help``s, so a script or a CI job reads the same meaning from either."""

from __future__ import annotations

from jsonargparse import DefaultHelpFormatter

#: status -> meaning. 3 is audit.py's alone (train.py never finds anything).
EXIT_STATUS: dict[int, str] = {
    0: "done: the training run finished, or the audit report was written",
    1: "failure: training raised an error, or the audit could not use a checkpoint, "
       "config or device, or could not write --out",
    2: "usage: an unknown, misspelled or abbreviated option, a value outside its choices, "
       "a config that does not fit",
    3: "findings: audit.py --fail_on_findings true wrote the report and it flags a "
       "problem (a confirmed shortcut, a declared cue the model leans on)",
}
#: Interrupted runs, outside the table's four meanings.
INTERRUPTED = ("interrupted: audit.py 130 (Ctrl-C, no report written); train.py 143 "
               "(SIGTERM) or 1 (Ctrl-C), a fit saving interrupted.ckpt first")


def exit_status_help(width: int = 78) -> str:
    """The table as the ``--help`` epilog: one status a line, continuations indented."""
    lines = ["exit status:"]
    rows = [(f"  {status}  ", meaning) for status, meaning in EXIT_STATUS.items()]
    for first, text in [*rows, ("  ", INTERRUPTED)]:
        line = first
        for word in text.split():
            if len(line) + len(word) > width and line != first:
                lines.append(line.rstrip())
                line = " " * len(first)
            line += word + " "
        lines.append(line.rstrip())
    return "\n".join(lines)


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, keeping the line breaks of a text that has some (the exit
    status table); a text without any is wrapped as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)

"""Run the bad-input corpus through the ``mrn`` command line and check every outcome.

For each scenario: the exit status is the expected one; the output names the offending file
and the problem; no traceback; the inputs keep their bytes (sha256 before/after); the failed
case has no output folder and the output folder holds no temporary leftovers; a crafted
pickle's marker file does not exist. Commands run in this process (``mrn_engine.cli.main``),
so one run takes a couple of minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from mrn_engine.badinput.cases import write_bundle
from mrn_engine.badinput.corpus import SCENARIOS, Context, Invocation, Scenario


@dataclass
class Outcome:
    """What one scenario did and which checks failed (``problems`` empty = pass)."""

    name: str
    group: str
    problem: str
    command: str
    exit_code: int
    message: str
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def snapshot(folders: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``folders`` (symlinks followed, loops skipped)."""
    out: dict[str, str] = {}
    for folder in folders:
        seen: set[Path] = set()
        for p in sorted(folder.rglob("*")) if folder.exists() else []:
            real = p.resolve()
            if p.is_file() and real not in seen:
                seen.add(real)
                out[str(p.relative_to(folder.parent))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(args: list[str]) -> tuple[int, str, str | None]:
    """``mrn ARGS`` in this process: (exit status, stdout+stderr, uncaught traceback or None)."""
    from mrn_engine.cli import main

    buf = io.StringIO()
    saved = sys.argv
    sys.argv = ["mrn", *args]
    code, tb = 0, None
    try:
        with (
            contextlib.redirect_stdout(buf),
            contextlib.redirect_stderr(buf),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("default")
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        # recorded, not printed: the same under pytest (which captures warnings) and alone
        for w in caught:
            buf.write(f"warning: {w.message}\n")
    except Exception:  # noqa: BLE001 - an uncaught exception is exactly what we look for
        tb = traceback.format_exc()
        code = 1
    finally:
        sys.argv = saved
    return code, buf.getvalue(), tb


def check(
    inv: Invocation, code: int, text: str, tb: str | None, before: dict[str, str]
) -> list[str]:
    """The failed checks of one invocation."""
    problems = []
    if tb is not None:
        problems.append(f"uncaught exception: {tb.strip().splitlines()[-1]}")
    if "Traceback (most recent call last)" in text:
        problems.append("traceback printed")
    if code != inv.exit_code:
        problems.append(f"exit {code}, expected {inv.exit_code}")
    for s in inv.expect:
        if s not in text:
            problems.append(f"output lacks {s!r}")
    if snapshot(inv.inputs) != before:
        problems.append("an input file changed")
    if inv.out is not None and inv.out.exists():
        hidden = [p.name for p in inv.out.iterdir() if p.name.startswith(".")]
        if hidden:
            problems.append(f"leftovers in the output folder: {hidden}")
        if inv.failed_case and (inv.out / inv.failed_case).exists():
            problems.append(f"output folder of the failed case {inv.failed_case} exists")
    for p in inv.must_not_exist:
        if p.exists():
            problems.append(f"{p.name} was created (code ran)")
    return problems


def _message(text: str, inv: Invocation) -> str:
    """The most telling output line (the one naming the file), for the table."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if inv.expect and inv.expect[0] in ln:
            return ln
    errs = [ln for ln in lines if ln.startswith(("Error", "error", "FAILED", "warning"))]
    return (errs or lines or [""])[0]


def run_scenario(sc: Scenario, workdir: Path, bundle: Path) -> Outcome:
    """Build one scenario in ``workdir/<name>`` and check it."""
    root = workdir / sc.name
    root.mkdir(parents=True)
    inv = sc.build(Context(root, bundle))
    before = snapshot(inv.inputs)
    code, text, tb = run_cli(inv.args)
    problems = check(inv, code, text, tb, before)
    shown = " ".join(a if not a.startswith(str(workdir)) else Path(a).name for a in inv.args)
    message = _message(text, inv).replace(str(root) + "/", "")
    return Outcome(sc.name, sc.group, sc.problem, f"mrn {shown}", code, message, problems)


def run_corpus(names: list[str] | None = None, workdir: str | Path | None = None) -> list[Outcome]:
    """Run (a subset of) the corpus; a temporary folder is used and removed unless given."""
    scenarios = [s for s in SCENARIOS if names is None or s.name in names]
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mrn-badinput-"))
        workdir = Path(workdir)
        bundle = write_bundle(workdir / "_shared_bundle")
        return [run_scenario(s, workdir, bundle) for s in scenarios]


def table(outcomes: list[Outcome]) -> str:
    """Markdown table of the outcomes."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    rows = [
        "| # | scenario | input | exit | message (shortened) | checks |",
        "|---|---|---|---|---|---|",
    ]
    for i, o in enumerate(outcomes, 1):
        msg = o.message if len(o.message) <= 160 else o.message[:157] + "..."
        verdict = "pass" if o.ok else "FAIL: " + "; ".join(o.problems)
        rows.append(
            f"| {i} | {o.group}/{o.name} | {cell(o.problem)} | {o.exit_code} | `{cell(msg)}` "
            f"| {cell(verdict)} |"
        )
    n_ok = sum(o.ok for o in outcomes)
    rows.append(f"\n{n_ok} of {len(outcomes)} scenarios pass.")
    return "\n".join(rows)

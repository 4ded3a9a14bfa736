"""README as a test: every command block is marked, every `sdrt` line in it parses with the real
CLI, the CLI block lists exactly the flags of every subcommand's --help, and the blocks marked
`ci` run, in README's order, on small models (exit status 0 and the files they name).

A block is marked by an HTML comment on the line before it (invisible on GitHub):

    <!-- readme-test: KIND [; set OLD=NEW, OLD=NEW ...] [; files PATH PATH ...] -->

KIND: ci (run here, on the small models below), gpu (needs a GPU), long (too long for CI:
installs, sd15-sized or hour-long runs), no (syntax summaries, not meant to run as written).
`set` replaces words of the block before it runs (placeholders -> the small models); `files`
lists the paths (relative to the walk-through folder) that must exist after the block.
The walk-through folder holds: tiny/ (a random-weight tiny pipeline), work/ (its FP32 export),
in.png and mask.png (64x64), style.safetensors and detail.safetensors (LoRAs for work/)."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
KINDS = ("ci", "gpu", "long", "no")
MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int                      # 1-based line of README where the block starts
    lang: str                      # "" (shell), "python"
    text: str
    kind: str | None = None
    subs: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def where(self) -> str:
        return f"README.md:{self.line}"


def parse_marker(body: str, line: int) -> tuple[str, dict, list]:
    kind, subs, files = None, {}, []
    for i, clause in enumerate(c.strip() for c in body.split(";")):
        word, _, rest = clause.partition(" ")
        if i == 0:
            kind = clause
        elif word == "set":
            for pair in rest.split(","):
                old, eq, new = pair.strip().partition("=")
                assert eq and old, f"README.md:{line}: bad set clause {pair!r}"
                subs[old] = new
        elif word == "files":
            files += rest.split()
        else:
            raise AssertionError(f"README.md:{line}: unknown marker clause {clause!r}")
    assert kind in KINDS, f"README.md:{line}: marker kind {kind!r} is not one of {KINDS}"
    return kind, subs, files


def blocks(text: str | None = None) -> list[Block]:
    """Fenced (```) and indented (4 spaces, after a blank line) code blocks, with their markers."""
    lines = (text if text is not None else README.read_text()).splitlines()
    out, i, marker = [], 0, None
    while i < len(lines):
        m = MARKER.match(lines[i])
        if m:
            marker = (parse_marker(m.group(1), i + 1), i + 1)
            i += 1
            continue
        block = None
        if lines[i].startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            block, end = Block(i + 1, lines[i][3:].strip(), "\n".join(lines[i + 1:j])), j + 1
        elif (lines[i].startswith("    ") and lines[i].strip()
              and (i == 0 or not lines[i - 1].strip() or MARKER.match(lines[i - 1]))):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            block, end = Block(i + 1, "", "\n".join(x[4:] for x in lines[i:j]).strip("\n")), j
        if block is None:
            if lines[i].strip():
                marker = None             # a marker applies to the block right after it
            i += 1
            continue
        if marker is not None:
            (block.kind, block.subs, block.files), _ = marker
        out.append(block)
        marker, i = None, end
    return out


def is_command_block(b: Block) -> bool:
    return b.lang == "python" or any(line.lstrip().startswith(("sdrt ", "python", "pip ", ". .venv"))
                                     for line in b.text.splitlines())


def substituted(b: Block) -> str:
    text = b.text
    for old, new in b.subs.items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(old)}(?![\w-])", new, text)
    return text


def shell_commands(text: str) -> list[str]:
    """The block's command lines, comments after `  #` removed."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def sdrt_invocations(text: str) -> list[list[str]]:
    """argv of every `sdrt ...` command in the text (also inside `a && b`)."""
    out = []
    for line in shell_commands(text):
        for part in line.split("&&"):
            words = shlex.split(part)
            if words and words[0] == "sdrt":
                out.append(words[1:])
    return out


# ---- every block is marked, every sdrt line parses ------------------------------------------------

def test_every_command_block_is_marked():
    unmarked = [b.where() for b in blocks() if is_command_block(b) and b.kind is None]
    assert not unmarked, f"code blocks without a <!-- readme-test: KIND --> marker: {unmarked}"


def test_parser_finds_blocks_and_markers():
    text = ("intro\n\n<!-- readme-test: ci; set WORK_DIR=work, MODEL=tiny; files a.png b/c.json -->\n"
            "```\nsdrt generate WORK_DIR x  # note\n```\n\n<!-- readme-test: no -->\n\n"
            "    sdrt demo\n\nplain text\n\n    sdrt doctor\n")
    bs = blocks(text)
    assert [(b.kind, b.line) for b in bs] == [("ci", 4), ("no", 10), (None, 14)]   # text between unmarks
    assert bs[0].subs == {"WORK_DIR": "work", "MODEL": "tiny"} and bs[0].files == ["a.png", "b/c.json"]
    assert sdrt_invocations(substituted(bs[0])) == [["generate", "work", "x"]]
    with pytest.raises(AssertionError):
        blocks("<!-- readme-test: sometimes -->\n```\nsdrt demo\n```\n")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from sdrt.cli import parser
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_sdrt_line_parses():
    """Each `sdrt` command in a ci, gpu or long block is accepted by the CLI's own parser (a
    renamed or removed flag fails here, also for lines that CI cannot run)."""
    from sdrt.cli import parser
    for b in blocks():
        if b.kind in ("ci", "gpu", "long"):
            for argv in sdrt_invocations(substituted(b)):
                try:
                    parser().parse_args(argv)
                except SystemExit:
                    pytest.fail(f"{b.where()}: `sdrt {' '.join(argv)}` is refused by the CLI's parser")


# ---- README's CLI block against --help -------------------------------------------------------------

def cli_block() -> dict[str, str]:
    """README's CLI block (the first block under '## CLI'): subcommand -> its text."""
    text = README.read_text()
    start = text.index("\n## CLI\n")
    block = next(b for b in blocks(text[start:]))
    out, cmd = {}, None
    for line in block.text.splitlines():
        words = line.split()
        if line.startswith("sdrt ") and len(words) > 1:
            cmd = words[1]
            out[cmd] = out.get(cmd, "") + line
        elif cmd is not None:
            out[cmd] += " " + line
    return out


def flags_of(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_cli_block_lists_every_flag_of_every_subcommand():
    """Derived from argparse, never a hand list: a new subcommand or flag must appear in README's
    CLI block, and a flag README shows must exist."""
    documented = cli_block()
    for name, p in subcommands().items():
        assert name in documented, f"README's CLI block has no `sdrt {name}` line"
        shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", documented[name]))
        assert shown == flags_of(p), (name, "missing from README:", flags_of(p) - shown,
                                      "not in --help:", shown - flags_of(p))
    assert set(documented) <= set(subcommands()) | {"--version"}, set(documented) - set(subcommands())
    assert "--version" in documented


def test_cli_block_defaults_agree_with_the_parser():
    """`[--flag N]` with a number in README's CLI block is that flag's default."""
    for name, p in subcommands().items():
        defaults = {o: a.default for a in p._actions for o in a.option_strings}
        for flag, value in re.findall(r"\[(--[a-z][a-z0-9-]*) (-?[0-9][0-9.]*)\]", cli_block()[name]):
            if isinstance(defaults.get(flag), (int, float)) and not isinstance(defaults[flag], bool):
                assert float(value) == float(defaults[flag]), (name, flag, value, defaults[flag])


def test_help_texts_name_their_defaults_right():
    """A help text that says 'default N' agrees with the parser's default where it has one."""
    for name, p in subcommands().items():
        for a in p._actions:
            m = re.search(r"default (-?[0-9][0-9.]*)", a.help or "")
            if m and isinstance(a.default, (int, float)) and not isinstance(a.default, bool):
                assert float(m.group(1)) == float(a.default), (name, a.option_strings, a.help, a.default)


def test_train_demo_help_names_the_trained_defaults():
    """train-demo's defaults live in export/train_demo.py (DEFAULTS): its help must quote them."""
    from sdrt.export.train_demo import DEFAULTS
    helps = {a.dest: a.help for a in subcommands()["train-demo"]._actions}
    for dest in ("steps", "vae_steps"):
        assert f"default {DEFAULTS[dest]}" in helps[dest], (dest, helps[dest], DEFAULTS[dest])


def test_version():
    import sdrt
    proc = subprocess.run([sys.executable, "-m", "sdrt.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"sdrt {sdrt.__version__}"


# ---- the walk-through: ci blocks run, in README's order ------------------------------------------------

def make_walkthrough_folder(root: Path, tiny_dir: Path, tiny_fp32: Path) -> None:
    from PIL import Image

    from sdrt import manifest as mf
    from sdrt.benchmarks.lora_switch import random_lora
    from sdrt.engine import lora as L
    shutil.copytree(tiny_dir, root / "tiny")
    shutil.copytree(tiny_fp32, root / "work")
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, np.full_like(x, 128)], -1).astype(np.uint8)).save(root / "in.png")
    Image.fromarray(np.where(x >= 32, 255, 0).astype(np.uint8)).save(root / "mask.png")
    targets = {c: mf.load(root / "work")["models"][c]["lora_targets"] for c in L.COMPONENTS}
    random_lora(root / "style.safetensors", targets, 2, False, 0)
    random_lora(root / "detail.safetensors", targets, 2, True, 1)


def run_block(b: Block, cwd: Path) -> None:
    text = substituted(b)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if b.lang == "python":
        code = "from sdrt.engine.pipeline import Pipeline\n" + text
        procs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                                env=env, timeout=600)]
        shown = [text]
    else:
        procs, shown = [], []
        for line in shell_commands(text):
            # `sdrt` as installed with this interpreter (the test venv's console script)
            cmd = re.sub(r"(^|&&\s*)sdrt ", rf"\1{shlex.quote(sys.executable)} -m sdrt.cli ", line)
            procs.append(subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=cwd,
                                        env=env, timeout=600))
            shown.append(line)
            if procs[-1].returncode:
                break
    for proc, line in zip(procs, shown):
        assert proc.returncode == 0, (f"{b.where()}: `{line}` exited {proc.returncode}:\n"
                                      f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    missing = [f for f in b.files if not (cwd / f).exists()]
    assert not missing, f"{b.where()}: README says these appear, they did not: {missing}"


@pytest.mark.slow
def test_walkthrough_ci_blocks_run(tiny_dir, tiny_fp32, tmp_path):
    runnable = [b for b in blocks() if b.kind == "ci"]
    assert len(runnable) >= 8, "the walk-through lost its runnable blocks"
    make_walkthrough_folder(tmp_path, tiny_dir, tiny_fp32)
    for b in runnable:
        run_block(b, tmp_path)

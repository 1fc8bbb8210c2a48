"""The rough edges a newcomer hit, each fixed: inputs without operations, the README's explain
example, file modes, profiles that cannot match the host, the terminal's width, plurals, a
UTF-8 BOM, carriage returns in logs, guest_memfd traces, source line numbers, the layout's
zoom and row limit, shell completion."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from memslot.backends.dual import Divergence
from memslot.cli.main import main
from memslot.cli.render import column_groups
from memslot.harness.replay import describe_divergence
from memslot.units import human_bytes, plural

ROOT = Path(__file__).resolve().parent.parent
BOOT = str(ROOT / "examples" / "vmm-boot.jsonl")
TRACES = ROOT / "examples" / "traces"
HINT = "did you run QEMU with -trace kvm_set_user_memory"
REQUEST = ('{"slot": 0, "flags": 0, "guest_phys_addr": 0, "memory_size": 4096, '
           '"userspace_addr": 0}\n')


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("content", ["", "\n\n", "qemu-system-x86_64: -accel kvm: warning\n"
                                     "VNC server running on ::1:5900\n"])
def test_input_without_operations_says_so(tmp_path: Path, content: str) -> None:
    log = tmp_path / "qemu.log"
    log.write_text(content)
    code, out, err = cli("report", str(log))
    assert code == 0 and err == "" and HINT in out and "findings: none" not in out
    assert "JSON" not in out.split(HINT)[0] or "no memslot JSON line" in out
    code, out, _ = cli("report", "--strict", str(log))
    assert code == 1 and "no-operations" in out
    code, out, _ = cli("replay", str(log))
    assert code == 0 and HINT in out and "0 operations" in out
    assert cli("replay", "--strict", "-q", str(log))[0] == 1
    code, out, _ = cli("replay", "--json", str(log))
    assert code == 0 and HINT in json.loads(out)["notice"]
    code, out, _ = cli("explain", str(log))
    assert code == 0 and HINT in out
    code, out, err = cli("convert", str(log))
    assert code == 0 and out == "" and HINT in err


def test_no_misleading_json_error_without_format(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    log.write_text("qemu-system-x86_64: terminating on signal 15\n")
    code, out, err = cli("replay", str(log))
    assert code == 0 and "malformed JSON" not in out + err
    code, _, err = cli("replay", "--format", "jsonl", str(log))
    assert code == 2 and "malformed JSON" in err  # asked for JSON lines: then it is an error


def test_readme_explain_request_example_matches_the_output() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\n      \$ (memslot explain [^\n]+)\n((?:      [^\n]*\n)+)", readme)
    assert block, "the README shows an explain --request example"
    command = block.group(1).split()[1:]
    shown = [line[6:] for line in block.group(2).splitlines()]
    code, out, _ = cli(*command, env={"COLUMNS": ""})
    assert code == 0 and out.splitlines() == shown


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_respect_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        for args, name in ((["convert", BOOT], "out.jsonl"), (["layout", BOOT], "map.svg")):
            target = tmp_path / name
            assert cli(*args, "-o", str(target))[0] == 0
            assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
            target.chmod(0o640)  # an existing file keeps its mode
            assert cli(*args, "-o", str(target))[0] == 0
            assert stat.S_IMODE(target.stat().st_mode) == 0o640
            target.unlink()
    finally:
        os.umask(old)


@pytest.mark.kvm
def test_backend_both_refuses_a_profile_that_cannot_match(tmp_path: Path) -> None:
    code, out, err = cli("replay", "--backend", "both", "--profile", "arm64", BOOT)
    assert code == 2 and out == ""
    assert err.startswith("memslot: error: --backend both: profile arm64 cannot match this host")
    assert "use --profile detect" in err and err.count("\n") == 1


def test_divergence_of_slot_sets_reads_as_slots() -> None:
    model = [(0, 1, 0x100, 0x10, 0, 0x7F0000000000), (0, 2, 0x200, 0x1, 2, 0x7F0000100000)]
    kernel = [(0, 1, 0x100, 0x10, 0, 0x7F0000000000)]
    text = describe_divergence(Divergence("slot set of address space 0 after CREATE", model,
                                          kernel))
    assert text == ("slot set of address space 0 after CREATE: only the model has 0:2 gfn "
                    "0x200+0x1 flags 0x2 ua 0x7f0000100000; only the kernel has nothing")


def test_output_fits_80_columns() -> None:
    env = {"COLUMNS": "80"}
    for args in (["replay", BOOT], ["report", str(TRACES / "qemu72-q35-ovmf-pflash.trace")],
                 ["report", "--compare", BOOT], ["explain", BOOT]):
        code, out, _ = cli(*args, env=env)
        assert code == 0
        long = [line for line in out.splitlines() if len(line) > 80]
        assert not long, (args, long[:3])
    # without a width (piped, no COLUMNS), lines stay whole for scripts
    code, out, _ = cli("replay", BOOT, env={"COLUMNS": ""})
    assert max(len(line) for line in out.splitlines()) > 100


def test_column_groups_repeat_the_key_column() -> None:
    rows = [["0:1", "a" * 30, "b" * 30, "c" * 30]]
    groups = column_groups(rows, ["slot", "x", "y", "z"], 80)
    assert groups == [[0, 1, 2], [0, 3]]
    assert column_groups(rows, ["slot", "x", "y", "z"], None) == [[0, 1, 2, 3]]


def test_plurals_and_sizes() -> None:
    assert plural(1, "page") == "1 page" and plural(2, "slot") == "2 slots"
    assert plural(0, "slot") == "0 slots"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(-1536) == "-1.5 KiB"
    assert human_bytes(1023) == "1023 B" and human_bytes(1 << 50) == "1.0 PiB"
    assert human_bytes(2 << 20, exact=True) == "2 MiB" and human_bytes(6144, exact=True) \
        == "6 KiB" and human_bytes(100, exact=True) == "0x64"
    code, out, _ = cli("report", str(TRACES / "qemu72-pc-9t-einval.trace"))
    assert code == 0 and " 1 slots" not in out and "1 pages" not in out


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    trace = tmp_path / "bom.jsonl"
    trace.write_bytes(b"\xef\xbb\xbf" + REQUEST.encode())
    code, out, _ = cli("replay", "--json", str(trace))
    assert code == 0 and json.loads(out)["operations"] == 1
    qemu = tmp_path / "bom.trace"
    qemu.write_bytes(b"\xef\xbb\xbfkvm_set_user_memory Slot#0 flags=0x0 gpa=0x0 size=0x1000 "
                     b"ua=0x7f0000000000 ret=0\n")
    code, out, _ = cli("replay", "--json", str(qemu))
    assert code == 0 and json.loads(out)["operations"] == 1


def test_measure_metadata_writes_no_carriage_return_to_a_log(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress goes to a terminal only: a log of stderr gets no carriage return."""
    from memslot.cli import measure_cmd

    def fake_measure(profile: object, sizes: object, repeats: int,
                     progress: object = None) -> list[object]:
        assert callable(progress)
        progress("1 page at gfn 0")
        return []

    monkeypatch.setattr(measure_cmd, "measure", fake_measure)
    code, out, err = cli("measure-metadata", "--profile", "x86_64", "--sizes", "1")
    assert code == 0 and "\r" not in err and "\r" not in out


def test_guest_memfd_trace_replays() -> None:
    """format-qemu9.trace names a recorded guest_memfd fd (27): replay makes its own."""
    code, out, _ = cli("replay", "--json", str(TRACES / "format-qemu9.trace"))
    data = json.loads(out)
    assert code == 0 and data["mismatches"] == 0
    gmem = [s for s in data["steps"] if s["op"].get("guest_memfd") == 27]
    assert [s["errno_name"] for s in gmem] == ["0", "EINVAL"]  # the bind, the bad offset


def test_convert_keeps_source_line_numbers(tmp_path: Path) -> None:
    source = TRACES / "qemu72-pc-migrate.trace"
    out = tmp_path / "m.jsonl"
    assert cli("convert", str(source), "-o", str(out))[0] == 0
    converted = [json.loads(line) for line in out.read_text().splitlines()]
    _, a, _ = cli("replay", "--json", str(source))
    assert [c["line"] for c in converted] == [s["line"] for s in json.loads(a)["steps"]]
    _, b, _ = cli("explain", "--json", str(out), "--at", "L62")
    (e,) = json.loads(b)["explained"]
    assert e["line"] == 62


def test_layout_zoom_row_limit_legend_and_profile(tmp_path: Path) -> None:
    code, out, err = cli("layout", BOOT, "-o", str(tmp_path / "m.svg"), "--max-rows", "100000")
    assert code == 2 and "--max-rows 100000: from 4 to" in err and out == ""
    assert not (tmp_path / "m.svg").exists()
    code, out, _ = cli("layout", "--json", BOOT, "--gpa-range", "0xf0000000-0x100000000")
    rows = json.loads(out)["address_spaces"][0]
    assert rows and all(r["end"] > 0xF0000000 and r["start"] < 1 << 32 for r in rows)
    full = json.loads(cli("layout", "--json", BOOT)[1])["address_spaces"][0]
    assert len(rows) < len(full)
    svg = tmp_path / "g.svg"
    assert cli("layout", BOOT, "-o", str(svg), "--max-rows", "4")[0] == 0
    text = svg.read_text()
    legend = text.split("group of slots")[0]
    assert "#d8c4e6" in legend and "#7b4f9d" in legend  # band and coverage, as drawn


@pytest.mark.kvm
def test_layout_names_the_detected_profile(tmp_path: Path) -> None:
    svg = tmp_path / "d.svg"
    assert cli("layout", BOOT, "-o", str(svg), "--profile", "detect")[0] == 0
    assert re.search(r"profile detected \([a-z0-9_.@-]+\)", svg.read_text())


def test_shell_completion_knows_commands_and_options(tmp_path: Path) -> None:
    code, script, _ = cli("completion", "bash")
    assert code == 0 and "complete" in script
    path = tmp_path / "memslot.bash"
    path.write_text(script)
    probe = (f'source {path}; COMP_WORDS=(memslot rep); COMP_CWORD=1; _shtab_memslot; '
             'echo "${COMPREPLY[@]}"; COMP_WORDS=(memslot replay --json); COMP_CWORD=2; '
             '_shtab_memslot; echo "${COMPREPLY[@]}"')
    proc = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    first, second = proc.stdout.splitlines()
    assert first.split() == ["replay", "report"]
    assert set(second.split()) == {"--json", "--json-lines"}
    assert cli("completion", "zsh")[0] == 0


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_profiles_colour_on_a_terminal_and_fits_the_width(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMSLOT_PLAIN", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "80")
    for no_colour in (False, True):
        if no_colour:
            monkeypatch.setenv("NO_COLOR", "1")
        tty = _Tty()
        with redirect_stdout(tty):
            assert main(["profiles", "--all"]) == 0
        out = tty.getvalue()
        colours = re.findall(r"\x1b\[[0-9;]*3[0-7]m", out)
        assert bool(colours) != no_colour, colours[:3]
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
        assert "x86_64@5.10" in plain and "shadow paging" in plain
        long = [line for line in plain.splitlines() if len(line) > 80]
        assert not long, long[:3]
    # piped: no escape codes; with a width, still within it; without one, whole lines
    code, out, _ = cli("profiles", env={"COLUMNS": "80"})
    assert code == 0 and "\x1b[" not in out and max(map(len, out.splitlines())) <= 80
    code, out, _ = cli("profiles", env={"COLUMNS": ""})
    assert "description" in out.splitlines()[0] and max(map(len, out.splitlines())) > 80

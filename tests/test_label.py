"""`rlhf-kernels label` driven through a pseudo-terminal with scripted key presses:
label, undo, guidelines, skip, quit, resume, a kill mid-session, --stats, training a
reward model on the result, and bad input; then the file's integrity: one writer at a
time, undo of this session's own record only, resume keyed by pair content, a torn
last line, records missing fields, and --stats flagging duplicates and conflicts."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from rlhf_trainer import task  # noqa: E402
from rlhf_trainer.label import KEYS_LINE, stats  # noqa: E402


class Terminal:
    """The label command in a pseudo-terminal 100 columns wide."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the real program
            os.environ.update(COLUMNS="100", LINES="40", TERM="xterm")
            os.execv(sys.executable, [sys.executable, "-m", "rlhf_trainer", "label", *args])
        self.screen = ""

    def expect(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while self.screen.count(text) < count:
            ready, _, _ = select.select([self.fd], [], [], max(deadline - time.time(), 0))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; screen so far:\n{self.screen[-2000:]}")
            try:
                chunk = os.read(self.fd, 4096).decode(errors="ignore")
            except OSError:  # the program exited
                chunk = ""
            if not chunk:
                raise AssertionError(f"program ended before {text!r}; screen:\n{self.screen[-2000:]}")
            self.screen += chunk

    def press(self, key: str) -> None:
        os.write(self.fd, key.encode())

    def wait(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.wait()


@pytest.fixture
def pairs(tmp_path):
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(5):
        prompt = task.sample_prompt(rng)
        # b ends in a repeat, so a != b in the built-in vocabulary (train rm --data below has no --model)
        a, b = task.demonstrate(prompt, rng, 0.9), task.demonstrate(prompt, rng, 0.3) + " a a"
        rows.append({"prompt": prompt, "response_a": a, "response_b": b})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), rows


def _records(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def test_label_undo_skip_quit_and_resume(tmp_path, pairs):
    pairs_path, rows = pairs
    out = str(tmp_path / "prefs.jsonl")
    term = Terminal("--pairs", pairs_path, "--out", out, "--labeler", "ann")
    term.expect(KEYS_LINE)
    assert "prompt 1 of 5" in term.screen and "Response 1" in term.screen and "Response 2" in term.screen
    for count, key in enumerate("13u4", start=2):  # rate, rate, undo that, rate again
        term.press(key)
        term.expect(KEYS_LINE, count)
    assert "Undid the answer to prompt 2" in term.screen
    term.press("g")
    term.expect("Guidelines")
    term.press("t")  # prompt 3: tie
    term.expect(KEYS_LINE, 7)
    term.press("s")  # prompt 4: skip
    term.expect(KEYS_LINE, 8)
    term.press("q")
    term.expect("Run the same command to resume")
    assert term.wait() == 0

    records = _records(out)
    assert [r["prompt_index"] for r in records] == [0, 1, 2, 3]
    first, second, tie, skip = records
    shown = {r["prompt_index"]: (r["response_a"], r["response_b"]) if r["shown_first"] == "a" else
             (r["response_b"], r["response_a"]) for r in records[:3]}  # fmt: skip
    assert first["chosen"] == shown[0][0] and first["strength"] == "better" and first["margin"] == 1.0
    assert second["chosen"] == shown[1][1] and second["preferred_position"] == 2  # the redo after undo: key 4
    assert tie["tie"] and tie["margin"] == 0.0 and skip["skipped"]
    assert all(r["labeler"] == "ann" and r["timestamp"] for r in records)

    term = Terminal("--pairs", pairs_path, "--out", out, "--labeler", "ann")
    term.expect(KEYS_LINE)
    assert "prompt 5 of 5" in term.screen and "labeled so far: 4" in term.screen  # resumed after the skip
    term.press("2")
    term.expect("Done: 1 answers")
    assert term.wait() == 0
    assert _records(out)[-1]["strength"] == "slightly better" and _records(out)[-1]["preferred_position"] == 1


def test_nothing_is_lost_when_killed(tmp_path, pairs):
    pairs_path, _ = pairs
    out = str(tmp_path / "prefs.jsonl")
    term = Terminal("--pairs", pairs_path, "--out", out, "--labeler", "bob")
    term.expect(KEYS_LINE)
    term.press("4")
    term.expect(KEYS_LINE, 2)
    term.kill()
    assert [r["prompt_index"] for r in _records(out)] == [0]
    term = Terminal("--pairs", pairs_path, "--out", out, "--labeler", "bob")
    term.expect(KEYS_LINE)
    assert "prompt 2 of 5" in term.screen
    term.press("q")
    assert term.wait() == 0


def _label_all(pairs_path, out, labeler, keys):
    """The non-terminal path: one key per line on stdin."""
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", "label", "--pairs", pairs_path, "--out", out, "--labeler", labeler],
        input="\n".join(keys) + "\n", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_stats_and_the_file_trains_a_reward_model(tmp_path, pairs):
    pairs_path, _ = pairs
    ann, bob = str(tmp_path / "ann.jsonl"), str(tmp_path / "bob.jsonl")
    _label_all(pairs_path, ann, "ann", "1423t")
    _label_all(pairs_path, bob, "bob", "1423s")
    report = stats([ann, bob])
    assert "labelers: ann, bob" in report and "tie rate:" in report and "position bias:" in report
    # The screen order is random per labeler, so the same keys are not the same choices.
    choice = [{r["prompt"]: "tie" if r.get("tie") else r["chosen"] for r in _records(f) if not r.get("skipped")}
              for f in (ann, bob)]  # fmt: skip
    shared = [p for p in choice[0] if p in choice[1]]
    agreed = sum(choice[0][p] == choice[1][p] for p in shared)
    assert len(shared) == 4
    assert f"agreement between labelers: {agreed / 4:.1%} of 4 shared judgements" in report

    from rlhf_trainer import cli

    assert cli.main(["train", "rm", "--data", ann, "--output", str(tmp_path / "rm"), "--set", "steps=3",
                     "--set", "eval_fraction=0.0"]) == 0  # fmt: skip
    assert os.path.exists(tmp_path / "rm" / "reward_model_hf" / "reward_head.pt")


@pytest.mark.parametrize(
    "content, message",
    [('{"prompt": "a :", "response_a": "a"}\n', "missing string field 'response_b'"), ("\n", "no records")],
)
def test_bad_pairs_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", "label", "--pairs", str(path), "--out", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unreadable_model_path_is_a_one_line_error(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a b :"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", "label", "--prompts", str(prompts), "--model",
         str(tmp_path / "missing"), "--out", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "--model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_label_samples_two_responses_from_a_model(tmp_path):
    from rlhf_trainer import cli

    assert cli.main(["train", "sft", "--output", str(tmp_path / "sft"), "--set", "steps=5"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a c f :"}\n{"prompt": "b d :"}\n')
    out = str(tmp_path / "prefs.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", "label", "--prompts", str(prompts), "--model",
         str(tmp_path / "sft" / "model"), "--out", out, "--labeler", "me", "--max-new-tokens", "6"],
        input="1\n3\n", capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = _records(out)
    assert [r["prompt_index"] for r in records] == [0, 1]
    assert all(len(r["response_a"].split()) <= 6 and len(r["response_b"].split()) <= 6 for r in records)
    assert [r["preferred_position"] for r in records] == [1, 2]


def test_a_second_session_on_one_file_is_refused(tmp_path, pairs):
    pairs_path, rows = pairs
    out = str(tmp_path / "prefs.jsonl")
    first = Terminal("--pairs", pairs_path, "--out", out, "--labeler", "ann")
    first.expect(KEYS_LINE)
    first.press("1")
    first.expect(KEYS_LINE, 2)
    second = subprocess.run(
        [sys.executable, "-m", "rlhf_trainer", "label", "--pairs", pairs_path, "--out", out, "--labeler", "ann"],
        input="1\n1\n1\n", capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert second.returncode == 2 and "another label session" in second.stderr, second.stderr
    for count, key in enumerate("234", start=3):
        first.press(key)
        first.expect(KEYS_LINE, count)
    first.press("1")
    first.expect("Done: 5 answers")
    assert first.wait() == 0
    _label_all(pairs_path, out, "ann", "1")  # the lock is gone with its session: all 5 are done already
    ids = [r["pair_id"] for r in _records(out)]
    assert len(ids) == len(set(ids)) == len(rows)


def test_undo_removes_only_this_sessions_record(tmp_path, pairs):
    pairs_path, rows = pairs
    out = tmp_path / "prefs.jsonl"
    term = Terminal("--pairs", pairs_path, "--out", str(out), "--labeler", "ann")
    term.expect(KEYS_LINE)
    term.press("1")  # prompt 1
    term.expect(KEYS_LINE, 2)
    # another writer (one that ignores the lock) appends the same labeler's answer to prompt 3
    other = {"prompt": rows[2]["prompt"], "prompt_index": 2, "labeler": "ann", "chosen": rows[2]["response_a"],
             "rejected": rows[2]["response_b"], "tie": False, "margin": 1.0}  # fmt: skip
    with open(out, "a") as stream:
        stream.write(json.dumps(other) + "\n")
    term.press("u")
    term.expect(KEYS_LINE, 3)
    assert "Undid the answer to prompt 1." in term.screen
    term.press("q")
    assert term.wait() == 0
    assert _records(out) == [other]


def test_resume_is_keyed_by_pair_content_not_line(tmp_path, pairs):
    pairs_path, rows = pairs
    out = str(tmp_path / "prefs.jsonl")
    _label_all(pairs_path, out, "ann", "14q")  # the first two pairs
    new = {"prompt": "b c :", "response_a": "b c", "response_b": "c c"}
    with open(pairs_path, "w") as stream:  # a pair inserted at the top shifts every line by one
        stream.write("".join(json.dumps(r) + "\n" for r in [new, *rows]))
    _label_all(pairs_path, out, "ann", "2222")
    records = _records(out)
    labeled = sorted((r["prompt"], r["response_a"]) for r in records)
    assert labeled == sorted((r["prompt"], r["response_a"]) for r in [new, *rows])  # each pair exactly once


def test_a_torn_last_line_is_reported_and_dropped(tmp_path, pairs):
    pairs_path, _ = pairs
    out = tmp_path / "prefs.jsonl"
    _label_all(pairs_path, str(out), "ann", "1q")
    with open(out, "a") as stream:
        stream.write('{"prompt": "a b :", "chos')  # a kill in the middle of a write
    assert "incomplete last line" in stats([str(out)])  # --stats skips it and says so
    result = _label_all(pairs_path, str(out), "ann", "4q")
    assert "prefs.jsonl:2: an incomplete last line" in result.stdout
    assert [r["strength"] for r in _records(out)] == ["better", "better"]  # valid JSONL again, the torn line gone


def test_records_missing_fields_do_not_crash_resume_or_stats(tmp_path, pairs):
    pairs_path, rows = pairs
    out = tmp_path / "prefs.jsonl"
    # written by hand or another tool: no prompt_index, pair_id or responses; one without "chosen"
    out.write_text(
        json.dumps({"prompt": rows[0]["prompt"], "chosen": "a", "rejected": "b", "labeler": "ann"}) + "\n"
        + json.dumps({"prompt": rows[1]["prompt"], "labeler": "ann", "tie": False}) + "\n"
    )  # fmt: skip
    result = _label_all(pairs_path, str(out), "ann", "1q")
    assert "prompt 1 of 5" in result.stdout
    report = stats([str(out)])
    assert "malformed: 1 records" in report and "prefs.jsonl:2" in report


def test_stats_reports_duplicates_and_conflicts(tmp_path, pairs):
    pairs_path, _ = pairs
    ann = tmp_path / "ann.jsonl"
    _label_all(pairs_path, str(ann), "ann", "114")  # pairs 1-3
    records = _records(ann)
    same, flipped = dict(records[0]), dict(records[1])  # what two sessions on one file used to write
    flipped["chosen"], flipped["rejected"] = flipped["rejected"], flipped["chosen"]
    with open(ann, "a") as stream:
        stream.write(json.dumps(same) + "\n" + json.dumps(flipped) + "\n")
    report = stats([str(ann)])
    assert "duplicates: 2 records repeat a pair their labeler already answered, over 2 pairs" in report, report
    assert "conflicts: 1 pairs got different answers from the same labeler (" in report and "ann.jsonl:5" in report
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "duplicates: none" in stats([str(clean)]) and "conflicts: none" in stats([str(clean)])

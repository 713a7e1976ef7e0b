"""`rlhf-kernels label`: a terminal tool that turns a person's side-by-side choices
into reward-model and DPO data, and `label --stats` to look at what was collected.

For each prompt two responses are shown (sampled from --model with two seeds, or
read from --pairs), in a random order that is recorded. Keys (seed 004's scale):

    1  Response 1 is better          2  Response 1 is only slightly better
    3  Response 2 is only slightly better          4  Response 2 is better
    t  tie     s  skip     u  undo last     g  guidelines     q  quit

Every answer is appended to --out at once (flushed and fsynced), so nothing is lost
if the program is killed; running it again resumes after the pairs this labeler
already answered (or skipped). A pair is keyed by a hash of its content ("pair_id":
the prompt and the two responses, in either order), not by its line, so editing the
pairs file does not shift the answers. One session at a time writes a file (an
advisory lock on PREFS.jsonl.lock); undo removes only this session's last record; a
last line cut short by a kill is reported and dropped. A record is the trainer's
preference format plus:

    {"prompt", "chosen", "rejected", "strength": "better" | "slightly better" | "tie",
     "tie": bool, "margin": 1.0 | 0.5 | 0.0, "labeler", "timestamp", "pair_id",
     "prompt_index", "shown_first": "a" | "b", "preferred_position": 1 | 2 | null,
     "response_a", "response_b"}

and a skip is {"prompt", "prompt_index", "pair_id", "skipped": true, "labeler", "timestamp"}.
`rlhf-kernels train rm|dpo --data` reads these files directly: skips and ties are
left out, and the reward model uses "margin" as the Bradley-Terry margin.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import dataclass

from .data import DataError

RATINGS = {
    "1": (1, "better"),
    "2": (1, "slightly better"),
    "3": (2, "slightly better"),
    "4": (2, "better"),
}
MARGINS = {"better": 1.0, "slightly better": 0.5, "tie": 0.0}
DEFAULT_GUIDELINES = """Guidelines
- Prefer the response that is more helpful, correct and honest for this prompt.
- Judge the content, not the position: the order on screen is random.
- Use "slightly better" when the difference is small; use tie only when neither is better.
- Skip prompts you cannot judge."""
KEYS_LINE = "[1] R1 better  [2] R1 slightly  [3] R2 slightly  [4] R2 better  [t]ie [s]kip [u]ndo [g]uidelines [q]uit"


def pair_id(prompt: str, a: str, b: str) -> str:
    """The key of a comparison: the same prompt and responses (in either order) are
    the same pair wherever they sit in the pairs file."""
    return hashlib.sha256(json.dumps([prompt, *sorted([a, b])]).encode()).hexdigest()[:16]


@dataclass
class Pair:
    index: int
    prompt: str
    a: str
    b: str

    @property
    def id(self) -> str:
        return pair_id(self.prompt, self.a, self.b)


def record_key(record: dict) -> str | None:
    """The pair a record answers: its pair_id, or one computed from its responses
    (records written before pair_id); None for an older skip, which has neither."""
    if isinstance(record.get("pair_id"), str):
        return record["pair_id"]
    texts = [record.get(field) for field in ("prompt", "response_a", "response_b")]
    return pair_id(*texts) if all(isinstance(t, str) for t in texts) else None


def fail(message: str) -> None:
    """A one-line error and exit status 2."""
    print(f"rlhf-kernels label: error: {message}", file=sys.stderr)
    raise SystemExit(2)


TORN = "an incomplete last line (cut short by a kill?)"


def read_records(path: str, *, torn_tail_ok: bool = False) -> tuple[list[tuple[int, dict]], int | None]:
    """(line number, record) of each JSON object line, and the number of a last line
    cut short by a kill mid-write (only allowed with torn_tail_ok). Any other bad
    line is a one-line error naming file:line."""
    try:
        with open(path, "rb") as source:
            data = source.read()
    except OSError as error:
        fail(f"{path}: cannot read ({error.strerror})")
    lines = data.split(b"\n")
    records, torn = [], None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError
            if torn_tail_ok and number == len(lines) and not data.endswith(b"\n"):
                torn = number
                continue
            if isinstance(error, UnicodeDecodeError):
                fail(f"{path}:{number}: not valid UTF-8 ({error.reason})")
            fail(f"{path}:{number}: not valid JSON ({error.msg})")
        if not isinstance(record, dict):
            fail(f"{path}:{number}: expected a JSON object")
        records.append((number, record))
    return records, torn


def _read_lines(path: str, fields: tuple[str, ...]) -> list[dict]:
    records, _ = read_records(path)
    for number, record in records:
        for field in fields:
            if not isinstance(record.get(field), str):
                fail(f"{path}:{number}: missing string field {field!r}")
    if not records:
        fail(f"{path}: no records")
    return [record for _, record in records]


def pairs_from_file(path: str) -> list[Pair]:
    """--pairs: {"prompt", "response_a", "response_b"} per line."""
    rows = _read_lines(path, ("prompt", "response_a", "response_b"))
    return [Pair(i, r["prompt"], r["response_a"], r["response_b"]) for i, r in enumerate(rows)]


def pairs_from_model(prompts_path: str, model_path: str, *, temperature: float, max_new_tokens: int,
                     seed: int) -> list[Pair]:  # fmt: skip
    """--model: two responses per prompt, sampled with two different seeds."""
    import torch

    from .models import load_causal_lm
    from .sampling import decode_responses, sample_responses

    prompts = [r["prompt"] for r in _read_lines(prompts_path, ("prompt",))]
    try:
        model, tokenizer = load_causal_lm(model_path)
    except (OSError, ValueError) as error:
        fail(f"--model {model_path}: cannot load ({str(error).splitlines()[0]})")
    model.eval()
    pairs = []
    for index, prompt in enumerate(prompts):
        responses = []
        for k in range(2):  # seeded by the prompt's text, not its line: resume finds the same pairs
            digest = hashlib.sha256(f"{seed}:{k}:{prompt}".encode()).hexdigest()
            generator = torch.Generator().manual_seed(int(digest[:15], 16))
            batch = sample_responses(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                     temperature=temperature, generator=generator)  # fmt: skip
            responses.append(decode_responses(tokenizer, batch)[0])
        pairs.append(Pair(index, prompt, *responses))
    return pairs


class OutputFile:
    """The --out file of one session: an exclusive advisory lock (on PREFS.jsonl.lock,
    which survives undo's os.replace of the file itself) refuses a second writer; a
    torn last line is dropped; appends are fsynced; undo removes this session's own
    line, found by its exact text, never another writer's."""

    def __init__(self, path: str):
        self.path = path
        self.lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl  # POSIX; without it (Windows) sessions are not locked

            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError as error:
            os.close(self.lock)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                fail(f"{path} is being written by another label session (it holds {path}.lock); "
                     "wait for it to quit, or label into another --out file")  # fmt: skip
            raise
        self.notes = self._repair()

    def close(self) -> None:
        os.close(self.lock)

    def _repair(self) -> list[str]:
        """Drops a last line cut short by a kill, so the next append starts a new line."""
        if not os.path.exists(self.path):
            return []
        _, torn = read_records(self.path, torn_tail_ok=True)
        with open(self.path, "rb+") as out:
            data = out.read()
            if data and not data.endswith(b"\n"):
                if torn:  # a torn line is cut off
                    out.truncate(data.rfind(b"\n") + 1)
                else:  # a complete line that only lacks its newline gets one
                    out.write(b"\n")
                out.flush()
                os.fsync(out.fileno())
        return [f"{self.path}:{torn}: {TORN} was dropped from the file"] if torn else []

    def done(self, labeler: str) -> set[str]:
        """The pair keys this labeler already answered or skipped."""
        if not os.path.exists(self.path):
            return set()
        records, _ = read_records(self.path)
        return {record_key(r) for _, r in records if r.get("labeler") == labeler} - {None}

    def append(self, record: dict) -> str:
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        return line

    def remove(self, line: str) -> bool:
        """Drops the last occurrence of this exact line (undo); False if it is gone."""
        with open(self.path) as source:
            lines = source.readlines()
        if line not in lines:
            return False
        del lines[len(lines) - 1 - lines[::-1].index(line)]
        temporary = self.path + ".tmp"
        with open(temporary, "w") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        return True


def render(pair: Pair, first: str, second: str, done: int, total: int, labeled: int, width: int) -> str:
    """The screen: progress line, prompt, and the two responses side by side (stacked
    when the terminal is narrower than 100 columns)."""
    rule = "-" * min(width, 120)
    lines = [f"prompt {done + 1} of {total}  (labeled so far: {labeled})", rule, "Prompt:"]
    lines += textwrap.wrap(pair.prompt, width=min(width, 120)) or [""]
    lines.append(rule)
    if width >= 100:
        column = (min(width, 120) - 3) // 2
        left = ["Response 1", *(textwrap.wrap(first, column) or ["(empty)"])]
        right = ["Response 2", *(textwrap.wrap(second, column) or ["(empty)"])]
        for row in range(max(len(left), len(right))):
            a = left[row] if row < len(left) else ""
            b = right[row] if row < len(right) else ""
            lines.append(f"{a:<{column}} | {b}")
    else:
        lines += ["Response 1:", *(textwrap.wrap(first, width) or ["(empty)"]), ""]
        lines += ["Response 2:", *(textwrap.wrap(second, width) or ["(empty)"])]
    lines += [rule, KEYS_LINE]
    return "\n".join(lines)


class KeyReader:
    """One key at a time from a terminal (cbreak mode), or one line at a time otherwise."""

    def __init__(self, stream):
        self.stream = stream
        self.terminal = stream.isatty()
        self.saved = None

    def __enter__(self):
        if self.terminal:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.stream.fileno())
            tty.setcbreak(self.stream.fileno())
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.saved)

    def read(self) -> str:
        if self.terminal:
            return os.read(self.stream.fileno(), 1).decode(errors="ignore")
        line = self.stream.readline()
        return line.strip()[:1] if line else "q"


def label(pairs: list[Pair], out_path: str, labeler: str, guidelines: str, *, seed: int = 0,
          stdin=None, stdout=None) -> int:  # fmt: skip
    """The interactive loop; returns how many answers this session wrote."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    out = OutputFile(out_path)
    try:
        return _session(pairs, out, labeler, guidelines, seed, stdin, stdout)
    finally:
        out.close()


def _session(pairs: list[Pair], out: OutputFile, labeler: str, guidelines: str, seed: int, stdin, stdout) -> int:
    def show(text: str) -> None:
        stdout.write("\n" + text + "\n")
        stdout.flush()

    for note in out.notes:
        show(note)
    done = out.done(labeler)
    queue, queued = [], set()
    for pair in pairs:  # a pair listed twice is asked once
        if pair.id not in done and pair.id not in queued:
            queue.append(pair)
            queued.add(pair.id)
    history: list[str] = []  # the lines this session wrote, for undo
    if not queue:
        show(f"All {len(pairs)} prompts are already labeled by {labeler} in {out.path}.")
        return 0
    labeled_before = len(pairs) - len(queue)
    with KeyReader(stdin) as keys:
        position = 0
        while position < len(queue):
            pair = queue[position]
            order = random.Random(f"{seed}:{labeler}:{pair.id}").random() < 0.5
            shown_first = "a" if order else "b"
            first, second = (pair.a, pair.b) if order else (pair.b, pair.a)
            width = shutil.get_terminal_size((100, 30)).columns
            show(render(pair, first, second, labeled_before + position, len(pairs), labeled_before + len(history),
                        width))  # fmt: skip
            key = keys.read().lower()
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            if key == "q":
                show(f"Saved {len(history)} answers to {out.path}. Run the same command to resume.")
                return len(history)
            if key == "g":
                show(guidelines)
                continue
            if key == "u":
                if not history:
                    show("Nothing to undo in this session.")
                    continue
                line = history.pop()
                position -= 1
                if out.remove(line):
                    show(f"Undid the answer to prompt {queue[position].index + 1}.")
                else:
                    show(f"Your answer to prompt {queue[position].index + 1} is no longer in {out.path}; "
                         "nothing was removed.")  # fmt: skip
                continue
            base = {"prompt": pair.prompt, "prompt_index": pair.index, "pair_id": pair.id, "labeler": labeler,
                    "timestamp": now}  # fmt: skip
            if key == "s":
                record = {**base, "skipped": True}
            elif key == "t":
                record = {**base, "chosen": pair.a, "rejected": pair.b, "strength": "tie", "tie": True,
                          "margin": 0.0, "shown_first": shown_first, "preferred_position": None}  # fmt: skip
            elif key in RATINGS:
                preferred_position, strength = RATINGS[key]
                preferred = first if preferred_position == 1 else second
                other = second if preferred_position == 1 else first
                record = {**base, "chosen": preferred, "rejected": other, "strength": strength, "tie": False,
                          "margin": MARGINS[strength], "shown_first": shown_first,
                          "preferred_position": preferred_position}  # fmt: skip
            else:
                show(f"Unknown key {key!r}. {KEYS_LINE}")
                continue
            if not record.get("skipped"):
                record.update(response_a=pair.a, response_b=pair.b)
            history.append(out.append(record))
            position += 1
    show(f"Done: {len(history)} answers this session, saved to {out.path}.")
    return len(history)


def _answer(record: dict) -> str | None:
    """What a record says about its pair: "skip", "tie", the chosen text, or None
    when it is malformed (an answer without a string "chosen")."""
    if record.get("skipped") is True:
        return "skip"
    if record.get("tie") is True:
        return "tie"
    return record["chosen"] if isinstance(record.get("chosen"), str) else None


def _places(entries: list[tuple[str, str]]) -> str:
    return ", ".join(where for where, _ in entries[:3]) + (" ..." if len(entries) > 3 else "")


def stats(paths: list[str]) -> str:
    """Counts, tie rate, position bias, agreement between labelers on shared pairs,
    and records that repeat (duplicates) or contradict (conflicts) a labeler's own
    earlier answer to the same pair."""
    records, notes, malformed = [], [], []
    for path in paths:
        found, torn = read_records(path, torn_tail_ok=True)
        notes += [f"{path}:{torn}: {TORN} is left out"] if torn else []
        for number, record in found:
            if not isinstance(record.get("prompt"), str) or (_answer(record) is None):
                malformed.append(f"{path}:{number}")
            else:
                records.append((f"{path}:{number}", record))
    if not records and not malformed:
        fail(f"{', '.join(paths)}: no records")
    answered = [r for _, r in records if not r.get("skipped")]
    ties = [r for r in answered if r.get("tie")]
    decided = [r for r in answered if not r.get("tie")]
    first_preferred = sum(1 for r in decided if r.get("preferred_position") == 1)
    labelers = sorted({str(r.get("labeler", "?")) for _, r in records})
    lines = [
        *notes,
        f"files: {len(paths)}  labelers: {', '.join(labelers)}",
        f"records: {len(records)}  answered: {len(answered)}  skipped: {len(records) - len(answered)}",
        f"tie rate: {len(ties) / max(len(answered), 1):.1%}",
        f"position bias: the response shown first was preferred in {first_preferred / max(len(decided), 1):.1%} "
        f"of {len(decided)} decided comparisons (50% = no bias)",
    ]
    if malformed:
        lines.append(f"malformed: {len(malformed)} records without a prompt or a chosen response, left out "
                     f"({', '.join(malformed[:3])}{' ...' if len(malformed) > 3 else ''})")  # fmt: skip
    # One labeler's records per pair, in file order: more than one is a duplicate
    # (e.g. two sessions on one file); different answers among them are a conflict.
    by_labeler_pair: dict[tuple, list[tuple[str, str]]] = defaultdict(list)
    for where, r in records:
        key = record_key(r) or ("prompt", r["prompt"])
        by_labeler_pair[(str(r.get("labeler", "?")), key)].append((where, _answer(r)))
    repeated = {k: v for k, v in by_labeler_pair.items() if len(v) > 1}
    conflicts = {k: v for k, v in repeated.items() if len({answer for _, answer in v}) > 1}
    extra = sum(len(v) - 1 for v in repeated.values())
    if repeated:
        lines.append(f"duplicates: {extra} records repeat a pair their labeler already answered, over "
                     f"{len(repeated)} pairs ({'; '.join(_places(v) for v in list(repeated.values())[:3])})")  # fmt: skip
    else:
        lines.append("duplicates: none")
    if conflicts:
        lines.append(f"conflicts: {len(conflicts)} pairs got different answers from the same labeler "
                     f"({'; '.join(_places(v) for v in list(conflicts.values())[:3])})")  # fmt: skip
    else:
        lines.append("conflicts: none")
    by_pair: dict[object, dict[str, str]] = defaultdict(dict)
    for (name, key), entries in by_labeler_pair.items():
        if entries[-1][1] != "skip":
            by_pair[key][name] = entries[-1][1]  # a labeler's latest answer counts
    agree = total = 0
    for choices in by_pair.values():
        names = sorted(choices)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                total += 1
                agree += choices[names[i]] == choices[names[j]]
    if total:
        lines.append(f"agreement between labelers: {agree / total:.1%} of {total} shared judgements")
    else:
        lines.append("agreement between labelers: no prompt was labeled by two labelers")
    return "\n".join(lines)


def add_label_parser(commands) -> None:
    parser = commands.add_parser("label", help="label pairs of responses side by side into preference data")
    parser.add_argument("--prompts", help="JSONL of {'prompt'} (with --model)")
    parser.add_argument("--out", help="the preference JSONL to append to (resumed if it exists)")
    parser.add_argument("--model", help="a local Hugging Face causal LM to sample two responses from")
    parser.add_argument("--pairs", help="JSONL of {'prompt', 'response_a', 'response_b'}")
    parser.add_argument("--guidelines", help="a text file shown on 'g'")
    parser.add_argument("--labeler", default=os.environ.get("USER", "labeler"))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", nargs="+", metavar="PREFS.jsonl", help="print statistics of labeled files")


def run_label(args) -> int:
    if args.stats:
        print(stats(args.stats))
        return 0
    if not args.out:
        fail("--out PREFS.jsonl is required")
    if bool(args.model) == bool(args.pairs):
        fail("give exactly one of --model (with --prompts) or --pairs")
    guidelines = DEFAULT_GUIDELINES
    if args.guidelines:
        try:
            with open(args.guidelines) as source:
                guidelines = source.read()
        except OSError as error:
            fail(f"--guidelines {args.guidelines}: cannot read ({error.strerror})")
    if args.pairs:
        pairs = pairs_from_file(args.pairs)
    else:
        if not args.prompts:
            fail("--model needs --prompts PROMPTS.jsonl")
        pairs = pairs_from_model(args.prompts, args.model, temperature=args.temperature,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed)  # fmt: skip
    try:
        label(pairs, args.out, args.labeler, guidelines, seed=args.seed)
    except DataError as error:
        fail(str(error))
    return 0
